"""Vocabulary head + logit softcap + cross-entropy without storing fp32 logits.

For a d12 model at batch 32 × 2048 tokens and a 65,536 vocabulary the fp32 logits alone
are 17 GB, before their gradient. `token_nll` is a `custom_vjp` that walks the tokens in
chunks and keeps, per chunk, either

- `mode="fused"`: the gradient of each token's NLL w.r.t. its logits, in the compute
  dtype (bf16 on accelerators: 2 bytes per logit, half the fp32 logits), computed in the
  forward pass; the backward is then two matmuls and never recomputes a logit, or
- `mode="recompute"`: nothing per logit; the backward recomputes each chunk's logits
  once (one extra head matmul) — the least memory.

The head matmul writes logits in the compute dtype (bf16 on accelerators, as nanochat's
autocast does; f32 accumulation); softcap, exp and the reductions run in fp32 on top. With
a softcap c ≤ 40 the log-sum-exp needs no max pass (logits lie in (−c, c)). In fused mode
one elementwise pass per chunk (a Pallas/Triton kernel on GPU, see `_exp_pass_pallas`)
writes e·softcap'(z) and Σe together; the 1/Σe row scale is applied inside the backward
matmuls and the one-hot term is one element per row written over the stored gradient.
On an H100 (d12, 65,536 tokens × 65,536 vocab) head + loss forward and backward take
34.7 ms (it was 50.6 ms with f32 logits, a max pass and a scatter-built one-hot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.backend import backend


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
    kernel: str = "auto",
) -> jnp.ndarray:
    """Per-token NLL of `targets` under softcapped logits h·w.

    h [N, D] and w [D, V] in the compute dtype; targets int [N], each in [0, V).
    chunk_tokens: tokens per chunk (0 = all at once). Returns f32 [N].
    kernel (fused mode): "auto" (the Pallas kernel on GPU where the shape allows, else
    XLA), "xla", or "pallas_interpret" (the Pallas kernel in its interpreter, for tests).
    Masking is the caller's: multiply the result by a mask (its gradient is then zero).
    """
    if mode not in ("fused", "recompute"):
        raise ValueError(f"token_nll mode must be 'fused' or 'recompute', got {mode!r}")
    if kernel not in ("auto", "xla", "pallas_interpret"):
        raise ValueError(f"token_nll kernel must be 'auto', 'xla' or 'pallas_interpret', got {kernel!r}")
    n = h.shape[0]
    chunk = n if chunk_tokens <= 0 or chunk_tokens >= n else chunk_tokens
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
    nll = _nll(h, w, targets.astype(jnp.int32), float(softcap), chunk, mode, kernel)
    return nll[:n]


# With a softcap c the logits lie in (−c, c), so exp(z − c) needs no running max: it stays
# in [e^(−2c), 1], far from f32 underflow while 2c < ~160. Larger caps use the row max.
_CAP_SHIFT_MAX = 40.0


def _logits_dtype(h_dtype):
    """The dtype the head matmul writes: the compute dtype (bf16 logits, as nanochat's autocast),
    accumulated in f32 by the matmul unit; reductions run in f32 on top of it."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _nll(h, w, targets, softcap, chunk, mode, kernel):
    nll = _map(lambda a: _chunk_lse(a[0], w, a[1], softcap)[1], (_split(h, chunk), _split(targets, chunk)))
    return nll.reshape(-1)


def _exp_pass_xla(z, softcap, dtype):
    """e = exp(cap(z) − m) of raw logits z [c, V]: (e·softcap'(z) in dtype, Σe [c], m)."""
    zc = _cap(z, softcap)
    if softcap and softcap <= _CAP_SHIFT_MAX:
        m = jnp.float32(softcap)
    else:
        m = jax.lax.stop_gradient(jnp.max(zc, axis=-1))
    e = jnp.exp(zc - (m[:, None] if jnp.ndim(m) else m))
    ge = e * (1.0 - jnp.square(zc / softcap)) if softcap else e
    return ge.astype(dtype), jnp.sum(e, axis=-1), m


# Pallas (Triton) version of the pass: one read of z, one write of e·softcap'(z), the row
# sum in the same kernel (XLA splits it into two kernels that each evaluate tanh and exp).
# Rows × columns per tile (H100, d12 loss-only: 4×2048 34.7 ms, 8×1024 35.5, 16×512 35.9).
_PALLAS_ROWS, _PALLAS_COLS = 4, 2048


def _pallas_mode(z, softcap, kernel):
    """'' (use XLA), 'gpu' or 'interpret' (the kernel in Pallas' interpreter, any backend)."""
    if kernel == "xla" or not softcap or softcap > _CAP_SHIFT_MAX:
        return ""
    rows, cols = _PALLAS_ROWS, _PALLAS_COLS
    if z.ndim != 2 or z.shape[0] % rows or z.shape[1] % cols:
        return ""
    if kernel == "pallas_interpret":
        return "interpret"
    if backend() == "gpu" and z.dtype == jnp.bfloat16:
        return "gpu"
    return ""


def _exp_pass_pallas(z, softcap, dtype, interpret=False):
    from jax.experimental import pallas as pl

    n, v = z.shape
    rows, cols = _PALLAS_ROWS, _PALLAS_COLS
    cap = float(softcap)

    def kernel(z_ref, ge_ref, s_ref):
        def body(j, acc):
            sl = pl.ds(pl.multiple_of(j * cols, cols), cols)
            x = z_ref[:, sl].astype(jnp.float32)
            t = 1.0 - 2.0 / (1.0 + jnp.exp(x * (2.0 / cap)))  # tanh(x / cap), exact to ~1e-7
            e = jnp.exp(cap * t - cap)
            ge_ref[:, sl] = (e * (1.0 - t * t)).astype(ge_ref.dtype)
            return acc + jnp.sum(e, axis=1)

        s_ref[...] = jax.lax.fori_loop(0, v // cols, body, jnp.zeros((rows,), jnp.float32))

    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3))
    ge, s = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n,), jnp.float32)),
        grid=(n // rows,),
        in_specs=[pl.BlockSpec((rows, v), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((rows, v), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))),
        interpret=interpret,
        **params,
    )(z)
    return ge, s, jnp.float32(cap)


def _fused_chunk(hc, w, tc, softcap, dtype, kernel):
    """One chunk in one pass over its logits: nll [c], the logit gradient in units of 1/Σe,
    G = e·softcap'(z) − onehot·Σe·softcap'(z_target) [c, V] in `dtype`, and 1/Σe [c] (f32).

    softmax − onehot = G/Σe: the backward applies the 1/Σe row scale to the matmuls, so
    the [c, V] elementwise work (tanh, exp, sum) runs once, and the one-hot term is one
    element per row written over G.
    """
    z = jnp.dot(hc, w, preferred_element_type=_logits_dtype(hc.dtype))
    mode = _pallas_mode(z, softcap, kernel)
    if mode:
        ge, s, m = _exp_pass_pallas(z, softcap, dtype, interpret=mode == "interpret")
    else:
        ge, s, m = _exp_pass_xla(z, softcap, dtype)
    lse = m + jnp.log(s)
    zt = _cap(jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0], softcap)
    e_t = jnp.exp(zt - m)
    d_t = 1.0 - jnp.square(zt / softcap) if softcap else 1.0
    rows = jnp.arange(z.shape[0])
    ge = ge.at[rows, tc].set(((e_t - s) * d_t).astype(dtype), unique_indices=True, indices_are_sorted=True)
    return lse - zt, ge, 1.0 / s


def _nll_fwd(h, w, targets, softcap, chunk, mode, kernel):
    hs, ts = _split(h, chunk), _split(targets, chunk)

    if mode == "fused":
        nll, ge, inv_s = _map(lambda a: _fused_chunk(a[0], w, a[1], softcap, h.dtype, kernel), (hs, ts))
        return nll.reshape(-1), (h, w, targets, (ge, inv_s.reshape(-1)), None)

    def body(args):
        _, nll, lse = _chunk_lse(args[0], w, args[1], softcap)
        return nll, lse

    nll, lse = _map(body, (hs, ts))
    return nll.reshape(-1), (h, w, targets, None, lse)


def _nll_bwd(softcap, chunk, mode, kernel, res, g_out):
    h, w, targets, fused, lse = res
    targets_ct = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    if mode == "fused":
        # d nll_i / d z_iv = g_i · G_iv / Σe_i (see _fused_chunk): a row scale of both matmuls.
        ge, inv_s = fused
        ge = ge.reshape(-1, w.shape[1])
        r = (g_out * inv_s)[:, None]
        dh = jnp.dot(ge, w.T, preferred_element_type=jnp.float32) * r
        dw = jnp.dot((h * r).astype(h.dtype).T, ge, preferred_element_type=jnp.float32)
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
