"""The optimizer of every parameter group, and the learning-rate schedule.

GPT matrices learn with Muon; the embedding and the head with AdamW, their learning
rates scaled by (model_dim / 768)^-½ as in nanochat. In MegaContext training the
GistNet and LensNet params (the "gistnet" and "lensnet" sub-trees) learn with AdamW at
`controller_lr`; a pretrained base's LoRA adapters (its only trainable params, train/frozen.py)
with AdamW at `lora.lr`. Every group follows one schedule:
linear warmup, constant, then a linear warmdown to `final_lr_frac`. The global
gradient norm is clipped first (when `grad_clip` > 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcjax.train.muon import muon


def lr_multiplier(step, total_steps: int, warmup_ratio: float, warmdown_ratio: float, final_frac: float):
    """Schedule multiplier at `step` (0-based; jnp or Python int). nanochat's shape."""
    warmup = round(warmup_ratio * total_steps)
    warmdown = round(warmdown_ratio * total_steps)
    step = jnp.asarray(step, jnp.float32)
    up = (step + 1) / max(warmup, 1)
    down = (total_steps - step) / max(warmdown, 1)
    down = down + (1 - down) * final_frac
    mult = jnp.where(step < warmup, up, 1.0)
    return jnp.where(step > total_steps - warmdown, down, mult)


def param_group(*keys: str) -> str:
    """Which optimizer a parameter belongs to, from the keys of its path in the param tree
    (a plain GPT's tree, or MegaContext's {"gpt", "gistnet", "lensnet"})."""
    if keys[0] in ("gistnet", "lensnet"):
        return "controller"
    top = keys[1] if keys[0] == "gpt" and len(keys) > 1 else keys[0]
    if top == "lora":
        return "lora"
    if top == "wte":
        return "embedding"
    if top == "lm_head":
        return "unembedding"
    return "matrix"


def build_optimizer(cfg) -> optax.GradientTransformation:
    """The optax transformation for `cfg` (an mcjax Config) over the GPT's params."""
    t = cfg.training
    total = cfg.total_steps

    def schedule(base_lr: float):
        return lambda count: base_lr * lr_multiplier(
            count, total, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac
        )

    def muon_momentum(count):
        frac = jnp.minimum(count / max(t.muon_momentum_warmup_steps, 1), 1.0)
        return (1 - frac) * t.muon_momentum_start + frac * t.muon_momentum

    scale = (cfg.model_dim / 768) ** -0.5

    def adamw(lr: float):
        return optax.adamw(
            schedule(lr * scale), b1=t.adam_beta1, b2=t.adam_beta2, eps=1e-10, weight_decay=t.weight_decay
        )

    groups = {
        "matrix": muon(schedule(t.matrix_lr), muon_momentum),
        "embedding": adamw(t.embedding_lr),
        "unembedding": adamw(t.unembedding_lr),
        "controller": optax.adamw(
            schedule(t.controller_lr), b1=0.9, b2=0.95, eps=1e-8, weight_decay=t.weight_decay
        ),
        "lora": optax.adamw(schedule(cfg.lora.lr), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
    }

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: param_group(*(p.key for p in path if hasattr(p, "key"))), params)

    tx = optax.multi_transform(groups, labels)
    if t.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return tx
