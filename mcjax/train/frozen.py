"""Which params train. A pretrained base's own weights are frozen: they live in
`TrainState.frozen`, not in `TrainState.params`, so the optimizer never sees them, no gradient
is computed for them and checkpoints do not copy them (a checkpoint keeps `base_reference`:
the base's path and content hash). Its LoRA adapters ("lora") train with GistNet and LensNet.

The base's sub-tree is `params["gpt"]` in MegaContext training and the whole tree otherwise.
With the GPT nothing is frozen: `split` returns the params as they are and an empty tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mcjax.config import Config, base_model_dir


def _base_key(cfg: Config) -> tuple[str, ...]:
    return ("gpt",) if cfg.megacontext.enabled else ()


def split(params: dict, cfg: Config) -> tuple[dict, dict]:
    """(trainable, frozen) of a full param tree (or of a tree of shardings or boxes like it)."""
    if not cfg.pretrained:
        return params, {}
    key = _base_key(cfg)
    base = params[key[0]] if key else params
    own = {k: v for k, v in base.items() if k != "lora"}
    adapters = {"lora": base["lora"]} if "lora" in base else {}
    if not key:
        return adapters, own
    rest = {k: v for k, v in params.items() if k != key[0]}
    return (rest | {key[0]: adapters} if adapters else rest), {key[0]: own}


def merge(trainable: dict, frozen: dict) -> dict:
    """The full param tree the model applies: `frozen` with `trainable` laid over it."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_frozen(cfg: Config, shardings: dict) -> dict:
    """The base's weights from base_model.path into `shardings` (the frozen tree's), in the
    compute dtype (bf16 on accelerators). {} for the GPT."""
    if not cfg.pretrained:
        return {}
    from mcjax.model.base import build_base, llama_spec
    from mcjax.model.hf_weights import load_llama

    key = _base_key(cfg)
    sh = shardings[key[0]] if key else shardings
    weights = load_llama(base_model_dir(cfg), llama_spec(cfg), sh, build_base(cfg).dtype)
    return {key[0]: weights} if key else weights


def embedding_rms(frozen: dict, cfg: Config) -> jax.Array:
    """RMS over the base's token embedding table: the scale GistNet's gists start at."""
    table = (frozen[_base_key(cfg)[0]] if _base_key(cfg) else frozen)["embed"]
    return jnp.sqrt(jnp.mean(jnp.square(table.astype(jnp.float32))))


def base_reference(cfg: Config) -> dict[str, Any] | None:
    """{"path", "sha256"} of the pretrained base (what a checkpoint keeps instead of a copy);
    None for the GPT. Hashing reads every weight file once."""
    if not cfg.pretrained:
        return None
    from mcjax.model.hf_weights import content_hash

    directory = base_model_dir(cfg)
    return {"path": str(directory.absolute()), "sha256": content_hash(directory)}
