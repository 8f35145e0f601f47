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


def _chunk_stats(hc, w, tc, softcap):
    """One chunk: nll [c], log-sum-exp [c], softmax [c, V] (f32) and tanh of the raw logits."""
    z = jnp.dot(hc, w, preferred_element_type=jnp.float32)
    t = None
    if softcap:
        t = jnp.tanh(z / softcap)
        z = softcap * t
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[:, 0]
    tgt = jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
    return lse - tgt, lse, e / s, t


def _unit_grad(p, t, tc, dtype):
    """d nll / d raw logits for one chunk: (softmax − onehot) · softcap'(z). [c, V] in dtype."""
    g = p.at[jnp.arange(p.shape[0]), tc].add(-1.0)
    if t is not None:
        g = g * (1.0 - t * t)
    return g.astype(dtype)


def _split(x, chunk):
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _nll(h, w, targets, softcap, chunk, mode):
    return _nll_fwd(h, w, targets, softcap, chunk, mode)[0]


def _nll_fwd(h, w, targets, softcap, chunk, mode):
    hs, ts = _split(h, chunk), _split(targets, chunk)

    if mode == "fused":

        def body(args):
            hc, tc = args
            nll, _, p, t = _chunk_stats(hc, w, tc, softcap)
            return nll, _unit_grad(p, t, tc, h.dtype)

        nll, g_unit = jax.lax.map(body, (hs, ts))
        return nll.reshape(-1), (h, w, targets, g_unit)

    nll = jax.lax.map(lambda args: _chunk_stats(args[0], w, args[1], softcap)[0], (hs, ts))
    return nll.reshape(-1), (h, w, targets, None)


def _nll_bwd(softcap, chunk, mode, res, g_out):
    h, w, targets, g_unit = res
    targets_ct = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    if mode == "fused":
        # Rows of the logit gradient scale by g_out; fold it into h (for dw) and dh.
        g_unit = g_unit.reshape(-1, w.shape[1])
        scale = g_out[:, None]
        dh = jnp.dot(g_unit, w.T, preferred_element_type=jnp.float32) * scale
        dw = jnp.dot((h * scale).astype(h.dtype).T, g_unit, preferred_element_type=jnp.float32)
        return dh.astype(h.dtype), dw.astype(w.dtype), targets_ct

    def body(dw, args):
        hc, tc, gc = args
        _, _, p, t = _chunk_stats(hc, w, tc, softcap)
        g = _unit_grad(p, t, tc, h.dtype)
        dhc = jnp.dot(g, w.T, preferred_element_type=jnp.float32) * gc[:, None]
        dw = dw + jnp.dot((hc * gc[:, None]).astype(h.dtype).T, g, preferred_element_type=jnp.float32)
        return dw, dhc.astype(h.dtype)

    dw0 = jnp.zeros(w.shape, jnp.float32)
    dw, dh = jax.lax.scan(body, dw0, (_split(h, chunk), _split(targets, chunk), _split(g_out, chunk)))
    return dh.reshape(h.shape), dw.astype(w.dtype), targets_ct


_nll.defvjp(_nll_fwd, _nll_bwd)
