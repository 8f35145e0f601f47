"""Vocabulary head + logit softcap + cross-entropy without storing fp32 logits.

For a d12 model at batch 32 × 2048 tokens and a 65,536 vocabulary the fp32 logits alone
are 17 GB, before their gradient. `token_nll` is a `custom_vjp` that walks the tokens in
chunks and keeps, per chunk, either

- `mode="fused"`: the gradient of each token's NLL w.r.t. its logits, in the compute
  dtype (bf16 on accelerators: 2 bytes per logit, half the fp32 logits), computed in the
  forward pass; the backward is then two matmuls and never recomputes a logit, or
- `mode="recompute"`: nothing per logit; the backward recomputes each chunk's logits
  once (one extra head matmul) — the least memory.

Reductions (max, log-sum-exp, softmax) are in fp32 in both modes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def softcap_logits(h: jnp.ndarray, w: jnp.ndarray, softcap: float) -> jnp.ndarray:
    """f32 logits `softcap · tanh(h·w / softcap)` (plain h·w when softcap is 0). [..., D] -> [..., V]."""
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return softcap * jnp.tanh(z / softcap) if softcap else z


def token_nll(
    h: jnp.ndarray,
    w: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    softcap: float,
    chunk_tokens: int = 0,
    mode: str = "fused",
) -> jnp.ndarray:
    """Per-token NLL of `targets` under softcapped logits h·w.

    h [N, D] and w [D, V] in the compute dtype; targets int [N], each in [0, V).
    chunk_tokens: tokens per chunk (0 = all at once). Returns f32 [N].
    Masking is the caller's: multiply the result by a mask (its gradient is then zero).
    """
    if mode not in ("fused", "recompute"):
        raise ValueError(f"token_nll mode must be 'fused' or 'recompute', got {mode!r}")
    n = h.shape[0]
    chunk = n if chunk_tokens <= 0 or chunk_tokens >= n else chunk_tokens
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
    nll = _nll(h, w, targets.astype(jnp.int32), float(softcap), chunk, mode)
    return nll[:n]


# With a softcap c the logits lie in (−c, c), so exp(z − c) needs no running max: it stays
# in [e^(−2c), 1], far from f32 underflow while 2c < ~160. Larger caps use the row max.
_CAP_SHIFT_MAX = 40.0


def _logits_dtype(h_dtype):
    """The dtype the head matmul writes: the compute dtype (bf16 logits, as nanochat's autocast),
    accumulated in f32 by the matmul unit; reductions run in f32 on top of it."""
    import os

    if os.environ.get("MCJAX_XENT_LOGITS", "") == "f32":
        return jnp.float32
    return h_dtype


def _cap(z, softcap):
    """Softcapped f32 logits from raw logits of any float dtype."""
    z = z.astype(jnp.float32)
    return softcap * jnp.tanh(z / softcap) if softcap else z


def _chunk_lse(hc, w, tc, softcap):
    """One chunk: raw logits z [c, V] (compute dtype), nll [c] and log-sum-exp [c] (f32)."""
    z = jnp.dot(hc, w, preferred_element_type=_logits_dtype(hc.dtype))
    zc = _cap(z, softcap)
    if softcap and softcap <= _CAP_SHIFT_MAX:
        m = jnp.float32(softcap)
        lse = m + jnp.log(jnp.sum(jnp.exp(zc - m), axis=-1))
    else:
        m = jax.lax.stop_gradient(jnp.max(zc, axis=-1, keepdims=True))
        lse = (m + jnp.log(jnp.sum(jnp.exp(zc - m), axis=-1, keepdims=True)))[:, 0]
    tgt = _cap(jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0], softcap)
    return z, lse - tgt, lse


def _unit_grad(z, lse, tc, softcap, dtype):
    """d nll / d raw logits for one chunk: (softmax − onehot) · softcap'(z). [c, V] in dtype.

    One elementwise pass over the raw logits: softmax as exp(z − lse), the one-hot as an
    iota compare (no scatter), tanh recomputed rather than stored.
    """
    zf = z.astype(jnp.float32)
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == tc[:, None]
    if softcap:
        t = jnp.tanh(zf / softcap)
        g = (jnp.exp(softcap * t - lse[:, None]) - onehot) * (1.0 - t * t)
    else:
        g = jnp.exp(zf - lse[:, None]) - onehot
    return g.astype(dtype)


def _split(x, chunk):
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _map(f, xs):
    """lax.map, or a plain call when there is one chunk (no loop in the program)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(f, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _nll(h, w, targets, softcap, chunk, mode):
    nll = _map(lambda a: _chunk_lse(a[0], w, a[1], softcap)[1], (_split(h, chunk), _split(targets, chunk)))
    return nll.reshape(-1)


def _nll_fwd(h, w, targets, softcap, chunk, mode):
    hs, ts = _split(h, chunk), _split(targets, chunk)

    if mode == "fused":

        def body(args):
            hc, tc = args
            z, nll, lse = _chunk_lse(hc, w, tc, softcap)
            return nll, _unit_grad(z, lse, tc, softcap, h.dtype)

        nll, g_unit = _map(body, (hs, ts))
        return nll.reshape(-1), (h, w, targets, g_unit, None)

    def body(args):
        _, nll, lse = _chunk_lse(args[0], w, args[1], softcap)
        return nll, lse

    nll, lse = _map(body, (hs, ts))
    return nll.reshape(-1), (h, w, targets, None, lse)


def _nll_bwd(softcap, chunk, mode, res, g_out):
    h, w, targets, g_unit, lse = res
    targets_ct = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    if mode == "fused":
        # Rows of the logit gradient scale by g_out; fold it into h (for dw) and dh.
        g_unit = g_unit.reshape(-1, w.shape[1])
        scale = g_out[:, None]
        dh = jnp.dot(g_unit, w.T, preferred_element_type=jnp.float32) * scale
        dw = jnp.dot((h * scale).astype(h.dtype).T, g_unit, preferred_element_type=jnp.float32)
        return dh.astype(h.dtype), dw.astype(w.dtype), targets_ct

    def body(dw, args):
        hc, tc, lc, gc = args
        z = jnp.dot(hc, w, preferred_element_type=_logits_dtype(hc.dtype))
        g = _unit_grad(z, lc, tc, softcap, h.dtype)
        dhc = jnp.dot(g, w.T, preferred_element_type=jnp.float32) * gc[:, None]
        dw = dw + jnp.dot((hc * gc[:, None]).astype(h.dtype).T, g, preferred_element_type=jnp.float32)
        return dw, dhc.astype(h.dtype)

    dw0 = jnp.zeros(w.shape, jnp.float32)
    xs = (_split(h, chunk), _split(targets, chunk), lse, _split(g_out, chunk))
    dw, dh = jax.lax.scan(body, dw0, xs)
    return dh.reshape(h.shape), dw.astype(w.dtype), targets_ct


_nll.defvjp(_nll_fwd, _nll_bwd)
