"""The decode step's attention as one Pallas (Triton) kernel on GPU: split-K flash decoding
(`runtime.decode_kernel: pallas`; XLA's is the default).

A decode step's query (one per stream and head) reads its cache's first `lengths` slots.
XLA computes that as separate kernels — the logits (a batched matrix-vector product), the
gate and mask, a max, an exp-sum, the weighted sum of values — each one small and launched
per layer. Here one kernel does all of it: the grid is (stream, key/value head, split of
the cache), each program walks its split's slots below `lengths` in blocks of `block_k`
keys with the online softmax (running max m, sum l, unnormalised output o, in f32), and XLA
merges the splits' partial results. A program whose split lies
wholly past `lengths` does no work, so a short cache costs little.

The query heads that share a key/value head (grouped-query attention) are one tile of
`block_h` rows, padded with zeros: the dot products need ≥ 16 rows on the tensor cores.
MegaContext's read gate (a per-head bias toward gist slots) is added to the logits inside
the kernel. Numerics follow `kv_cache.decode_attention` (logits and softmax in f32, values
in the compute dtype); `interpret=True` runs the kernel in Pallas' interpreter (tests, CPU).

Measured on an H100 (d12, W_max 8,192, batch 1; bench/RESULTS.md): the kernel itself takes
14.8 µs per layer and step (the 25 MB of keys and values it reads at about half the HBM peak),
but the split merge adds a handful of small XLA kernels per layer, and the step — launch-bound,
~24 kernels per layer — ends 4 % slower than XLA's attention (0.853 vs 0.819 ms). A kernel
that merges its splits itself, or a fused decode layer, is where it would pay.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_H = 16  # query rows per program: the tensor cores' least


def _splits(w: int, block_k: int) -> int:
    """Splits of a W-slot cache: about 16 (enough programs to fill the GPU at batch 1), each
    a whole number of blocks of `block_k` slots."""
    blocks = w // block_k
    return max(d for d in range(1, min(blocks, 16) + 1) if blocks % d == 0)


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, block_k: int, scale: float, gated: bool):
    from jax.experimental import pallas as pl

    if gated:
        gist_ref, bias_ref, o_ref, m_ref, l_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    split, _ = k_ref.shape
    start = pl.program_id(2) * split
    length = len_ref[()]
    q = q_ref[...]
    bias = bias_ref[...] if gated else None

    def body(i, carry):
        o, m, l = carry
        sl = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        s = jnp.dot(q, k_ref[sl, :].T, preferred_element_type=jnp.float32) * scale  # [block_h, block_k]
        if gated:
            s = s + jnp.where(gist_ref[sl][None, :] != 0, bias[:, None], 0.0)
        seen = (start + i * block_k + jnp.arange(block_k)) < length
        s = jnp.where(seen[None, :], s, 0.7 * jnp.finfo(jnp.float32).min)
        m_next = jnp.maximum(m, s.max(axis=-1))
        c = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[sl, :]
        o = c[:, None] * o + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_next, c * l + p.sum(axis=-1)

    block_h, h = q_ref.shape
    init = (jnp.zeros((block_h, h), jnp.float32), jnp.full((block_h,), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    steps = jnp.clip((length - start + block_k - 1) // block_k, 0, split // block_k)
    o, m, l = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def decode_attention_pallas(q, k_cache, v_cache, lengths, gate=None, *, block_k: int = 128, interpret: bool = False):
    """As `kv_cache.decode_attention`: q [B, N, H]; k_cache, v_cache [B, K, W, H]; lengths int32
    [B] (≥ 1); gate None or (bias f32 [N], gist bool [B, W]). W a multiple of block_k (or
    smaller: one block). -> [B, N, H] in the cache's dtype."""
    from jax.experimental import pallas as pl

    b, n, h = q.shape
    kv, w = k_cache.shape[1], k_cache.shape[2]
    g = n // kv
    if g > BLOCK_H:
        raise ValueError(f"{g} query heads per key/value head: the decode kernel takes at most {BLOCK_H}")
    block_k = min(block_k, w)
    if w % block_k:
        raise ValueError(f"cache of {w} slots: the decode kernel needs a multiple of {block_k}")
    splits = _splits(w, block_k)
    split = w // splits
    qp = jnp.pad(q.reshape(b, kv, g, h), ((0, 0), (0, 0), (0, BLOCK_H - g), (0, 0))).astype(k_cache.dtype)
    gated = gate is not None
    in_specs = [
        pl.BlockSpec((None,), lambda i, k, j: (i,)),
        pl.BlockSpec((None, None, BLOCK_H, h), lambda i, k, j: (i, k, 0, 0)),
        pl.BlockSpec((None, None, split, h), lambda i, k, j: (i, k, j, 0)),
        pl.BlockSpec((None, None, split, h), lambda i, k, j: (i, k, j, 0)),
    ]
    args = [lengths.astype(jnp.int32), qp, k_cache, v_cache]
    if gated:
        bias = jnp.pad(gate[0].astype(jnp.float32).reshape(kv, g), ((0, 0), (0, BLOCK_H - g)))
        in_specs += [pl.BlockSpec((None, split), lambda i, k, j: (i, j)), pl.BlockSpec((None, BLOCK_H), lambda i, k, j: (k, 0))]
        args += [gate[1].astype(jnp.int32), bias]
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, scale=h**-0.5, gated=gated),
        grid=(b, kv, splits),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, None, BLOCK_H, h), lambda i, k, j: (i, k, j, 0, 0)),
            pl.BlockSpec((None, None, None, BLOCK_H), lambda i, k, j: (i, k, j, 0)),
            pl.BlockSpec((None, None, None, BLOCK_H), lambda i, k, j: (i, k, j, 0)),
        ),
        out_shape=(
            jax.ShapeDtypeStruct((b, kv, splits, BLOCK_H, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv, splits, BLOCK_H), jnp.float32),
            jax.ShapeDtypeStruct((b, kv, splits, BLOCK_H), jnp.float32),
        ),
        interpret=interpret,
        name="mcjax_decode_attention",
        **params,
    )(*args)
    # merge the splits: each one's sum and output rescaled to the overall max
    top = jax.lax.optimization_barrier(m.max(axis=2, keepdims=True))
    c = jnp.exp(m - top)
    out = (o * c[..., None]).sum(axis=2) / (l * c).sum(axis=2)[..., None]
    return out[:, :, :g].reshape(b, n, h).astype(v_cache.dtype)
