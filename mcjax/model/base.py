"""The base model a config describes: the nanochat GPT (`gpt.py`), or a pretrained Llama-family
model from a local HF directory (`llama.py`, shapes from its config.json) with LoRA adapters
when lora.rank > 0. Both have the same interface (embed, head, __call__ over tokens or
embeddings with positions and spans, and the per-layer pieces the KV cache composes)."""

from __future__ import annotations

import functools

from mcjax.config import Config, base_model_dir
from mcjax.model.gpt import build_gpt, resolve
from mcjax.model.hf_config import LlamaSpec, read_spec
from mcjax.model.llama import Llama, LoraSpec


@functools.lru_cache(maxsize=8)
def _spec(directory: str) -> LlamaSpec:
    return read_spec(directory)


def llama_spec(cfg: Config) -> LlamaSpec:
    return _spec(str(base_model_dir(cfg)))


def build_base(cfg: Config):
    """The GPT or the pretrained Llama that `cfg` describes, backend choices resolved."""
    if not cfg.pretrained:
        return build_gpt(cfg)
    m, lo, spec = cfg.base_model, cfg.lora, llama_spec(cfg)
    r = resolve(m.dtype, m.attention, spec.head_dim)
    lora = LoraSpec(lo.rank, lo.alpha, lo.dropout, tuple(lo.targets)) if lo.rank else None
    return Llama(spec=spec, dtype=r.dtype, attention=r.attention, remat=m.remat, lora_spec=lora)
