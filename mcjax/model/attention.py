"""The base model's causal self-attention, by kernel: "xla", "cudnn" (GPU) or "splash" (TPU).

q [B, T, N, H]; k, v [B, T, K, H] with K dividing N (grouped-query attention: query head n
reads kv head n // (N/K)) -> [B, T, N, H] = softmax(q·kᵀ/√H) over the keys at or before each
query. Every kernel computes the same function (tests/test_backend.py).

With a *gate* (bias [N], keys [B, T]) the logits of query head n toward the marked keys get
bias[n] added. cuDNN takes it as one more head channel (q gets bias·√H, k gets the 0/1 mark,
v a zero; the head padded to a multiple of 8 and the softmax scale kept at 1/√H), so the
fused kernel computes it exactly; other kernels add it as XLA attention's bias.

"splash" is Pallas' TPU splash attention (jax.experimental.pallas.ops.tpu): a flash-attention
kernel that skips the causal mask's empty blocks. The N/K query heads of each kv head go
through one multi-query kernel, vmapped over the batch and the kv heads. Off a TPU it runs in
Pallas' interpreter (how CPU tests check it). Under a multi-device mesh (the context mesh the
training loop sets) it runs per shard through shard_map: the batch split over (data, fsdp)
and the kv heads over tensor, as the model's activations are. Where a shape does not fit
(T not a multiple of 128, a batch or head count that does not split over the mesh), XLA's
attention computes the same result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mcjax.backend import on_tpu

_BATCH, _HEADS = ("data", "fsdp"), "tensor"  # train/sharding.py's mesh axes


# Head-width padding that carries the gate into a kernel without a bias input (a multiple of 8).
_GATE_PAD = 8


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, kernel: str, gate=None) -> jnp.ndarray:
    """See the module doc. gate: None, or (bias f32 [N], keys bool [B, T]) — every logit of
    query head n toward a key marked True gets bias[n] added (MegaContext's read gate on gist
    entries: `gated_logits` is the reference)."""
    if gate is not None:
        return _gated(q, k, v, kernel, *gate)
    if kernel == "splash" and q.shape[1] % 128 == 0:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return _splash(q, k, v)
        shards = {a: mesh.shape.get(a, 1) for a in (*_BATCH, _HEADS)}
        if q.shape[0] % (shards["data"] * shards["fsdp"]) == 0 and k.shape[2] % shards[_HEADS] == 0:
            spec = P(tuple(a for a in _BATCH if a in mesh.shape), None, _HEADS if _HEADS in mesh.shape else None)
            return jax.shard_map(_splash, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                 check_vma=False)(q, k, v)  # Pallas outputs carry no varying-axes type
    impl = "cudnn" if kernel == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


@functools.cache
def _splash_kernel(t: int, group: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(b for b in (512, 256, 128) if t % b == 0)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * group)
    with jax.ensure_compile_time_eval():  # its block tables are concrete arrays, cached across traces
        return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v):
    b, t, n, h = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(t, n // kv, not on_tpu())
    qg = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    out = jax.vmap(jax.vmap(kernel))(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _gated(q, k, v, kernel: str, bias, keys):
    b, t, n, h = q.shape
    kv = k.shape[2]
    if kernel == "cudnn":
        out = jax.nn.dot_product_attention(*gate_channel(q, k, v, bias, keys), is_causal=True, scale=h**-0.5,
                                           implementation="cudnn")
        return out[..., :h]
    logit_bias = jnp.where(keys[:, None, None, :], bias[None, :, None, None], 0.0).astype(q.dtype)  # [B, N, 1, T]
    return jax.nn.dot_product_attention(q, k, v, bias=logit_bias, is_causal=True)


def gate_channel(q, k, v, bias, keys):
    """q, k, v with the gate as one more channel of each head (then zeros to a multiple of 8):
    q·√H·bias, k the 0/1 gist mark, v 0 — under the softmax scale 1/√H the extra product is
    exactly bias[n] on a marked key. Shapes as `causal_attention`'s, H → H + 8."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    extra = jnp.broadcast_to((bias * h**0.5).astype(q.dtype), (b, t, n))[..., None]
    mark = jnp.broadcast_to(keys[:, :, None, None].astype(k.dtype), (b, t, kv, 1))

    def pad(x, first):
        return jnp.concatenate([x, first, jnp.zeros(x.shape[:-1] + (_GATE_PAD - 1,), x.dtype)], axis=-1)

    return pad(q, extra), pad(k, mark), pad(v, jnp.zeros_like(mark))


def gated_logits(logits: jnp.ndarray, bias: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
    """The gate on explicit attention logits [B, K, G, P, W] (kv head, group, query, key; the
    KV cache's layout): query head n = kv·G + g gets bias[n] toward keys [B, W] marked True."""
    b, kv, g = logits.shape[:3]
    return logits + jnp.where(keys[:, None, None, None, :], bias.reshape(1, kv, g, 1, 1), 0.0)
