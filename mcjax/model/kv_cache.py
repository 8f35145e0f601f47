"""The base GPT with a KV cache: a causal prefill and a cached extension, for streaming decode.

Both are pure functions of the GPT module (for its static fields: depth, head size, dtype,
attention kernel, RoPE base, softcap) and its own param tree (`{"wte", "blocks", "lm_head"}`,
as `GPT.init` makes it), and compute exactly what `GPT.__call__` computes: rms_norm →
layers → rms_norm, RoPE (plain, or Gaussian with spans) at each entry's own position.

A cache holds per layer the keys (after RoPE and QK-norm) and values of W slots,
`KVCache.k[l]`, `.v[l]` [B, N, W, H] in the compute dtype (heads before slots, so a decode
step reads each head's keys as one contiguous [W, H] matrix). Every entry carries its own
position, so a row is valid wherever it sits in the array; which slot holds what, and which
slots a new row may see, is the caller's (the engines in `mcjax/runtime`).

- `prefill`: the GPT over [B, S] entries, causal (padding at the end is never seen by a real
  entry); returns the final hidden states and a cache of S slots. cuDNN attention on GPU,
  as in training.
- `extend`: P new rows attend to the cache under `old_mask` [B, P, W] and to each other under
  `new_mask` [B, P, P] (True = may attend; a row must at least see itself), in one softmax
  over both parts; then they are written to `slots` [B, P] (an out-of-range slot drops
  the row). A decode step is `extend` with P = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcjax.model.gpt import GPT, _attn_in, _attn_out_mlp, _layer, rms_norm, split_layers
from mcjax.model.rope import rope_angles
from mcjax.model.xent import softcap_logits


class KVCache(NamedTuple):
    """Per-layer keys and values: tuples of L arrays [B, N, W, H] (compute dtype)."""

    k: tuple
    v: tuple

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


def empty_cache(gpt: GPT, batch: int, capacity: int) -> KVCache:
    """A zero cache of `capacity` slots for `batch` streams."""
    shape = (batch, gpt.dim // gpt.head_dim, capacity, gpt.head_dim)
    return KVCache(*(tuple(jnp.zeros(shape, gpt.dtype) for _ in range(gpt.depth)) for _ in range(2)))


def embed(gpt: GPT, params, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens int [...] -> embeddings [..., D] in the compute dtype (`GPT.embed`)."""
    return jnp.take(params["wte"], tokens, axis=0).astype(gpt.dtype)


def logits(gpt: GPT, params, hidden: jnp.ndarray) -> jnp.ndarray:
    """Final hidden states [..., D] -> softcapped f32 logits [..., V] (`GPT.logits`)."""
    return softcap_logits(hidden, params["lm_head"].astype(gpt.dtype), gpt.softcap)


def _layers(gpt: GPT, params) -> list[dict[str, jnp.ndarray]]:
    ws = {name: w.astype(gpt.dtype) for name, w in params["blocks"].items()}
    return split_layers(ws, gpt.depth)


def _angles(gpt: GPT, positions, spans):
    return rope_angles(positions, gpt.head_dim, gpt.rope_base, spans)


def _heads_first(x: jnp.ndarray) -> jnp.ndarray:
    """[B, T, N, H] -> [B, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def prefill(gpt: GPT, params, emb: jnp.ndarray, positions: jnp.ndarray, spans: jnp.ndarray | None = None):
    """The GPT over entries emb [B, S, D] at positions [B, S] (spans [B, S]: Gaussian RoPE).

    Returns (final hidden states [B, S, D], KVCache of S slots). Causal: a padded tail is
    computed but never seen by an earlier entry.
    """
    cos, sin = _angles(gpt, positions, spans)
    x = rms_norm(emb.astype(gpt.dtype))
    ks, vs = [], []
    for w in _layers(gpt, params):
        x, k, v = _layer(x, w, cos, sin, head_dim=gpt.head_dim, attention=gpt.attention, remat="none", kv=True)
        ks.append(_heads_first(k))
        vs.append(_heads_first(v))
    return rms_norm(x), KVCache(tuple(ks), tuple(vs))


def cached_attention(q, k, v, k_old, v_old, old_mask, new_mask):
    """One softmax over the cached keys and the new ones.

    q, k, v [B, P, N, H] (new rows); k_old, v_old [B, N, W, H]; old_mask bool [B, P, W];
    new_mask bool [B, P, P]. Logits and softmax in f32 (as XLA's attention), values in
    the compute dtype. -> [B, P, N, H].
    """
    scale = q.shape[-1] ** -0.5
    qh = _heads_first(q)
    lo = jnp.einsum("bnph,bnwh->bnpw", qh, k_old, preferred_element_type=jnp.float32) * scale
    ln = jnp.einsum("bnph,bnqh->bnpq", qh, _heads_first(k), preferred_element_type=jnp.float32) * scale
    scores = jnp.concatenate(
        [jnp.where(old_mask[:, None], lo, -jnp.inf), jnp.where(new_mask[:, None], ln, -jnp.inf)], axis=-1
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    w = k_old.shape[2]
    out = jnp.einsum("bnpw,bnwh->bnph", probs[..., :w], v_old) + jnp.einsum("bnpq,bnqh->bnph", probs[..., w:], _heads_first(v))
    return _heads_first(out)


def extend(
    gpt: GPT,
    params,
    emb: jnp.ndarray,
    positions: jnp.ndarray,
    spans: jnp.ndarray | None,
    cache: KVCache,
    old_mask: jnp.ndarray,
    new_mask: jnp.ndarray,
    slots: jnp.ndarray,
):
    """P new entries emb [B, P, D] at positions [B, P] (spans [B, P] or None) through the GPT
    against `cache`; see the module doc for the masks. Their keys and values are written to
    `slots` int [B, P] after the attention reads the old cache. -> (hidden [B, P, D], cache).
    """
    cos, sin = _angles(gpt, positions, spans)
    x = rms_norm(emb.astype(gpt.dtype))
    rows = jnp.arange(x.shape[0])[:, None]
    ks, vs = [], []
    for layer, w in enumerate(_layers(gpt, params)):
        q, k, v = _attn_in(x, w["wq"], w["wk"], w["wv"], cos, sin, gpt.head_dim)
        y = cached_attention(q, k, v, cache.k[layer], cache.v[layer], old_mask, new_mask)
        x = _attn_out_mlp(x, y, w["wo"], w["w_fc"], w["w_proj"])
        # [B, N, W, H] indexed at (row, :, slot): the new [B, P, N, H] rows land without a transpose
        ks.append(cache.k[layer].at[rows, :, slots].set(k.astype(gpt.dtype), mode="drop"))
        vs.append(cache.v[layer].at[rows, :, slots].set(v.astype(gpt.dtype), mode="drop"))
    return rms_norm(x), KVCache(tuple(ks), tuple(vs))
