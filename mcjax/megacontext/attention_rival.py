"""The training-free rival of LensNet: expand the gists the base model itself attends to most.

As InfLLM picks memory blocks by the attention that the current tokens pay to each block's
representative tokens, with no training, this rival scores each entry of a working context
by the attention mass that the queries of the protected tail (the last `tail` entries:
where the question is) put on it, summed over a chosen set of layers and heads. The mass is
read with the gate on gists left out (what the base would read if it could), the hidden
states themselves are computed as the base computes them. The scores then drive the same
focus allocator as LensNet's (`policies.scored_fill`), at the same budget.

`tail_attention` composes the base's per-layer pieces (as `model/kv_cache.py` does) and
returns per layer and query head the summed mass on every entry; `rival_scores` reduces it
to one score per entry: each (layer, head)'s mass is normalised over the entries before the
tail (so a head that looks mostly at the tail still votes), then summed over `layers` (all
when empty).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcjax.megacontext.layout import WorkingContext, rope_positions
from mcjax.model.attention import causal_attention


def tail_attention(model, params, wc: WorkingContext, tail: int, *, gaussian: bool = True, gate=None,
                   positions: str = "global") -> jnp.ndarray:
    """Attention mass of the last `tail` valid entries' queries on each entry of WCs [B, W].

    model/params: the base (GPT or Llama) and its own param tree; gate: the base's read gate
    (bias [L, N], gist bool [B, W]) or None, applied to the hidden states only; positions: the
    entries' RoPE positions (megacontext.positions, `layout.rope_positions`).
    -> f32 [B, L, N, W], summed over the tail queries (each query's row sums to 1).
    """
    b, w = wc.valid.shape
    cos, sin = model.rope(rope_positions(wc, positions), wc.span if gaussian else None)
    x = model.begin(wc.emb)
    idx = wc.valid.sum(-1)[:, None] - tail + jnp.arange(tail)  # [B, tail]
    causal = jnp.arange(w)[None, None, :] <= idx[:, :, None]  # [B, tail, W]
    out = []
    for i, lw in enumerate(model.layer_weights(params)):
        q, k, v = model.attn_in(i, x, lw, cos, sin)
        n, kv, h = q.shape[2], k.shape[2], q.shape[3]
        qt = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)  # [B, tail, N, H]
        qt = qt.reshape(b, tail, kv, n // kv, h)
        logits = jnp.einsum("btkgh,bwkh->bkgtw", qt, k, preferred_element_type=jnp.float32) * h**-0.5
        logits = jnp.where(causal[:, None, None], logits, -jnp.inf)
        out.append(jax.nn.softmax(logits, axis=-1).sum(-2).reshape(b, n, w))
        x = model.attn_out_mlp(x, causal_attention(q, k, v, _kernel(model), None if gate is None else
                                                   (gate[0][i], gate[1])), lw)
    return jnp.stack(out, axis=1)


def _kernel(model) -> str:
    return "cudnn" if model.attention == "cudnn" else "xla"


def rival_scores(mass: jnp.ndarray, wc: WorkingContext, tail: int, layers: tuple[int, ...] = ()) -> jnp.ndarray:
    """Per-entry scores f32 [B, W] from `tail_attention`'s mass [B, L, N, W]: per (layer, head)
    the mass normalised over the valid entries before the tail, summed over `layers` (all
    when empty) and heads. Tail and padding entries score 0."""
    before = wc.valid & (jnp.arange(wc.valid.shape[-1]) < (wc.valid.sum(-1) - tail)[:, None])  # [B, W]
    m = jnp.where(before[:, None, None], mass, 0.0)
    m = m / jnp.maximum(m.sum(-1, keepdims=True), 1e-30)
    if layers:
        m = m[:, jnp.asarray(layers)]
    return m.sum((1, 2))
