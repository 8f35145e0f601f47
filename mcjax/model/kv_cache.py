"""The base model with a KV cache: a causal prefill and a cached extension, for streaming decode.

Both are pure functions of the base module (the GPT of `gpt.py` or a pretrained Llama of
`llama.py`, for its static fields) and its own param tree, and compute exactly what its
`__call__` computes, composed from the per-layer pieces both modules have (`begin`,
`layer_weights`, `attn_in`, `attn_out_mlp`, `finish`, `rope`): RoPE (plain, or Gaussian with
spans) at each entry's own position.

A cache holds per layer the keys (after RoPE and, for the GPT, QK-norm) and values of W
slots, `KVCache.k[l]`, `.v[l]` [B, K, W, H] in the compute dtype (K key/value heads: the
GPT's N, fewer under grouped-query attention; heads before slots, so a decode step reads each
head's keys as one contiguous [W, H] matrix). Every entry carries its own position, so a row
is valid wherever it sits in the array; which slot holds what, and which slots a new row may
see, is the caller's (the engines in `mcjax/runtime`).

- `prefill`: the model over [B, S] entries, causal (padding at the end is never seen by a
  real entry); returns the final hidden states and a cache of S slots. cuDNN attention on
  GPU, as in training.
- `extend`: P new rows attend to the cache under `old_mask` [B, P, W] and to each other under
  `new_mask` [B, P, P] (True = may attend; a row must at least see itself), in one softmax
  over both parts; then they are written to `slots` [B, P] (an out-of-range slot drops
  the row). The cache rebuilds and ingests use it.
- `decode`: one new entry per stream, the decode step: each layer first writes the entry's
  key and value to its slot, then the entry attends to the cache's first `lengths` slots —
  itself among them — in one pass over the cache (`decode_attention`; no mask array, no
  second softmax part). Both engines keep the slots a token may see a prefix of the cache, so
  the mask is a length per stream.

Both take MegaContext's read gate on gist entries (see `GPT.__call__`'s `gist_gate`): the
per-layer biases [L, N] and which entries are gists — [B, S] for a prefill; the cached
slots [B, W] and the new rows [B, P] for an extension.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcjax.backend import backend
from mcjax.errors import UserError
from mcjax.model.attention import causal_attention, gated_logits
from mcjax.model.decode_kernel import decode_attention_pallas
from mcjax.model.xent import softcap_logits

Base = Any  # GPT or Llama


class KVCache(NamedTuple):
    """Per-layer keys and values: tuples of L arrays [B, K, W, H] (compute dtype)."""

    k: tuple
    v: tuple

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


def empty_cache(model: Base, batch: int, capacity: int) -> KVCache:
    """A zero cache of `capacity` slots for `batch` streams."""
    shape = (batch, model.kv_heads, capacity, model.head_dim)
    return KVCache(*(tuple(jnp.zeros(shape, model.dtype) for _ in range(model.depth)) for _ in range(2)))


# Sibling projections that read the same input: the GPT's, then the Llama family's.
FUSED = {"wqkv": ("wq", "wk", "wv"), "qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def fuse_projections(params) -> dict:
    """A base's params (no LoRA adapters: merged) with each group of `FUSED` projections
    concatenated along their outputs — biases too, where all of a group have one — so a
    layer runs one matmul where it ran two or three. A decode step is bound by its number
    of kernels, not its bytes, and XLA emits each matmul of one token as its own kernel
    (bench/RESULTS.md); `attn_in` / `attn_out_mlp` of both bases read either form. The
    same numbers up to summation order."""
    blocks = dict(params["blocks"])
    for fused, parts in FUSED.items():
        biased = [f"{p}_bias" in blocks for p in parts]
        if not all(p in blocks for p in parts) or any(biased) != all(biased):
            continue
        blocks[fused] = jnp.concatenate([blocks.pop(p) for p in parts], axis=-1)
        if all(biased):
            blocks[f"{fused}_bias"] = jnp.concatenate([blocks.pop(f"{p}_bias") for p in parts], axis=-1)
    return {**params, "blocks": blocks}


def embed(model: Base, params, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens int [...] -> embeddings [..., D] in the compute dtype (`embed`)."""
    return model.embed_tokens(params, tokens)


def logits(model: Base, params, hidden: jnp.ndarray) -> jnp.ndarray:
    """Final hidden states [..., D] -> (softcapped) f32 logits [..., V]."""
    return softcap_logits(hidden, model.head_matrix(params), model.softcap)


def _heads_first(x: jnp.ndarray) -> jnp.ndarray:
    """[B, T, N, H] -> [B, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def prefill(model: Base, params, emb: jnp.ndarray, positions: jnp.ndarray, spans: jnp.ndarray | None = None, gate=None):
    """The model over entries emb [B, S, D] at positions [B, S] (spans [B, S]: Gaussian RoPE);
    gate: None or (bias [L, N], gist bool [B, S]).

    Returns (final hidden states [B, S, D], KVCache of S slots). Causal: a padded tail is
    computed but never seen by an earlier entry.
    """
    cos, sin = model.rope(positions, spans)
    x = model.begin(emb)
    kernel = "cudnn" if model.attention == "cudnn" else "xla"
    ks, vs = [], []
    for i, w in enumerate(model.layer_weights(params)):
        q, k, v = model.attn_in(i, x, w, cos, sin)
        y = causal_attention(q, k, v, kernel, None if gate is None else (gate[0][i], gate[1]))
        x = model.attn_out_mlp(x, y, w)
        ks.append(_heads_first(k))
        vs.append(_heads_first(v))
    return model.finish(params, x), KVCache(tuple(ks), tuple(vs))


def cached_attention(q, k, v, k_old, v_old, old_mask, new_mask, gate=None):
    """One softmax over the cached keys and the new ones; gate: None or (bias f32 [N], gist
    bool [B, W] of the cached slots, gist bool [B, P] of the new rows).

    q [B, P, N, H], k, v [B, P, K, H] (new rows; N a multiple of K: query head n reads
    key/value head n // (N/K)); k_old, v_old [B, K, W, H]; old_mask bool [B, P, W];
    new_mask bool [B, P, P]. Logits and softmax in f32 (as XLA's attention), values in
    the compute dtype. -> [B, P, N, H].
    """
    b, p, n, h = q.shape
    kv = k_old.shape[1]
    scale = h**-0.5
    qh = _heads_first(q).reshape(b, kv, n // kv, p, h)
    lo = jnp.einsum("bkgph,bkwh->bkgpw", qh, k_old, preferred_element_type=jnp.float32) * scale
    ln = jnp.einsum("bkgph,bkqh->bkgpq", qh, _heads_first(k), preferred_element_type=jnp.float32) * scale
    if gate is not None:
        lo, ln = gated_logits(lo, gate[0], gate[1]), gated_logits(ln, gate[0], gate[2])
    scores = jnp.concatenate(
        [jnp.where(old_mask[:, None, None], lo, -jnp.inf), jnp.where(new_mask[:, None, None], ln, -jnp.inf)], axis=-1
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    w = k_old.shape[2]
    out = jnp.einsum("bkgpw,bkwh->bkgph", probs[..., :w], v_old) + jnp.einsum(
        "bkgpq,bkqh->bkgph", probs[..., w:], _heads_first(v)
    )
    return _heads_first(out.reshape(b, n, p, h))


def decode_attention(q, k_cache, v_cache, lengths, gate=None):
    """One query per stream over its cache's first `lengths` slots: q [B, N, H]; k_cache,
    v_cache [B, K, W, H] (query head n reads key/value head n // (N/K)); lengths int32 [B];
    gate: None or (bias f32 [N], gist bool [B, W] of the slots). Logits and softmax in f32,
    values in the compute dtype, as `cached_attention`. -> [B, N, H]."""
    b, n, h = q.shape
    kv, w = k_cache.shape[1], k_cache.shape[2]
    qh = q.reshape(b, kv, n // kv, 1, h)
    logits = jnp.einsum("bkgph,bkwh->bkgpw", qh, k_cache, preferred_element_type=jnp.float32) * h**-0.5
    if gate is not None:
        logits = gated_logits(logits, gate[0], gate[1])
    seen = jnp.arange(w)[None, :] < lengths[:, None]  # [B, W]
    probs = jax.nn.softmax(jnp.where(seen[:, None, None, None], logits, -jnp.inf), axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgpw,bkwh->bkgph", probs, v_cache).reshape(b, n, h)


def decode_kernel_for(choice: str, model: Base, capacity: int) -> str:
    """The decode attention that runtime.decode_kernel `choice` (xla, pallas) means for `model`
    and a cache of `capacity` slots: "xla", "pallas" on GPU, "pallas_interpret" (Pallas'
    interpreter) elsewhere. UserError where the kernel does not apply (more than 16 query
    heads per key/value head, or a capacity of 128 or more that is not a multiple of 128)."""
    if choice == "xla":
        return "xla"
    groups = model.num_query_heads // model.kv_heads
    if groups > 16 or (capacity % 128 and capacity >= 128):
        raise UserError(f"runtime.decode_kernel pallas takes ≤ 16 query heads per key/value head and W_max a multiple "
                        f"of 128: this base has {groups}, W_max is {capacity}")
    return "pallas" if backend() == "gpu" else "pallas_interpret"


def decode(model: Base, params, emb: jnp.ndarray, positions: jnp.ndarray, cache: KVCache, slots: jnp.ndarray,
           lengths: jnp.ndarray, gate=None, kernel: str = "xla"):
    """One decode step: a new entry per stream, emb [B, 1, D] at positions [B, 1] (raw: no
    spans), through the model against `cache`; each layer writes the entry's key and value to
    `slots` int [B] (in range), then the entry attends to the slots [0, lengths) [B], itself
    among them. gate: None or (bias [L, N], gist bool [B, W] of the slots after the write).
    kernel: the attention's (`decode_kernel_for`): "xla" (`decode_attention`), "pallas" (the
    `decode_kernel` module's) or "pallas_interpret" (that kernel in Pallas' interpreter).
    -> (hidden [B, 1, D], cache)."""
    attend = decode_attention
    if kernel != "xla":
        attend = functools.partial(decode_attention_pallas, interpret=kernel == "pallas_interpret")
    cos, sin = model.rope(positions, None)
    x = model.begin(emb)
    rows = jnp.arange(x.shape[0])
    ks, vs = [], []
    for layer, w in enumerate(model.layer_weights(params)):
        q, k, v = model.attn_in(layer, x, w, cos, sin)
        ks.append(cache.k[layer].at[rows, :, slots].set(k[:, 0].astype(model.dtype)))
        vs.append(cache.v[layer].at[rows, :, slots].set(v[:, 0].astype(model.dtype)))
        g = None if gate is None else (gate[0][layer], gate[1])
        y = attend(q[:, 0], ks[-1], vs[-1], lengths, g)
        x = model.attn_out_mlp(x, y[:, None], w)
    return model.finish(params, x), KVCache(tuple(ks), tuple(vs))


def extend(
    model: Base,
    params,
    emb: jnp.ndarray,
    positions: jnp.ndarray,
    spans: jnp.ndarray | None,
    cache: KVCache,
    old_mask: jnp.ndarray,
    new_mask: jnp.ndarray,
    slots: jnp.ndarray,
    gate=None,
):
    """P new entries emb [B, P, D] at positions [B, P] (spans [B, P] or None) through the model
    against `cache`; see the module doc for the masks. Their keys and values are written to
    `slots` int [B, P] after the attention reads the old cache. gate: None or (bias [L, N],
    gist bool [B, W] of the cache's slots, gist bool [B, P] of the new entries).
    -> (hidden [B, P, D], cache).
    """
    cos, sin = model.rope(positions, spans)
    x = model.begin(emb)
    rows = jnp.arange(x.shape[0])[:, None]
    ks, vs = [], []
    for layer, w in enumerate(model.layer_weights(params)):
        q, k, v = model.attn_in(layer, x, w, cos, sin)
        g = None if gate is None else (gate[0][layer], gate[1], gate[2])
        y = cached_attention(q, k, v, cache.k[layer], cache.v[layer], old_mask, new_mask, g)
        x = model.attn_out_mlp(x, y, w)
        # [B, K, W, H] indexed at (row, :, slot): the new [B, P, K, H] rows land without a transpose
        ks.append(cache.k[layer].at[rows, :, slots].set(k.astype(model.dtype), mode="drop"))
        vs.append(cache.v[layer].at[rows, :, slots].set(v.astype(model.dtype), mode="drop"))
    return model.finish(params, x), KVCache(tuple(ks), tuple(vs))
