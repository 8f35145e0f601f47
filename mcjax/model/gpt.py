"""The base model: a nanochat-style GPT as a Flax linen module over an explicit param pytree.

Rotary embeddings from per-entry positions, QK-norm, parameter-free RMSNorm, relu² MLP,
untied embedding and head, no biases. Layers are one `nn.scan` (params stacked on a
leading "layers" axis), so compile time does not grow with depth. Params are f32;
compute runs in `dtype` (bf16 on accelerators). The head and its softcapped
cross-entropy live in `xent.py`, so the model returns final hidden states.

Params (D = model_dim, N·H = D, V = vocab, L = depth):
  wte [V, D]; blocks/{wq, wk, wv} [L, D, D]; blocks/wo [L, D, D];
  blocks/w_fc [L, D, 4D]; blocks/w_proj [L, 4D, D]; lm_head [D, V].
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.model.rope import apply_rope, rope_angles

Dtype = Any


def rms_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Parameter-free RMSNorm over the last axis, reduced in f32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _fan_in_init(fan_in: int, fan_out: int):
    """N(0, σ) with σ = fan_in^-½ · min(1, (fan_out/fan_in)^½) (nanochat's linear init)."""
    std = fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
    return nn.initializers.normal(stddev=std)


def _save_dots_policy():
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _attn_in(x, wq, wk, wv, cos, sin, head_dim):
    """Pre-norm, q/k/v projections, RoPE and QK-norm. x [B, T, D] -> q, k, v [B, T, N, H]."""
    b, t, d = x.shape
    n = wq.shape[1] // head_dim
    h = rms_norm(x)
    q = (h @ wq).reshape(b, t, n, head_dim)
    k = (h @ wk).reshape(b, t, n, head_dim)
    v = (h @ wv).reshape(b, t, n, head_dim)
    return rms_norm(apply_rope(q, cos, sin)), rms_norm(apply_rope(k, cos, sin)), v


def _attn_out_mlp(x, y, wo, w_fc, w_proj):
    """Attention output projection + residual, then the pre-norm relu² MLP + residual."""
    b, t, d = x.shape
    x = x + y.reshape(b, t, -1) @ wo
    h = jnp.square(jax.nn.relu(rms_norm(x) @ w_fc))
    return x + h @ w_proj


class Block(nn.Module):
    """Pre-norm attention + relu² MLP. x [B, T, D] -> ([B, T, D], None) (scan carry).

    remat "save_dots" checkpoints the two parts around attention (saving matmul outputs,
    recomputing norms, RoPE and relu² in the backward pass) while attention itself keeps
    its own residuals, so its forward kernel never runs twice.
    """

    dim: int
    head_dim: int
    dtype: Dtype
    attention: str  # "cudnn" | "xla"
    remat: str = "none"  # "none" | "save_dots" (whole-block policies are applied by GPT)

    def _kernel(self, name: str, shape: tuple[int, int], axes: tuple[str, str], zero: bool = False):
        init = nn.initializers.zeros if zero else _fan_in_init(*shape)
        w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
        return w.astype(self.dtype)

    @nn.compact
    def __call__(self, x, cos, sin):
        d = x.shape[-1]
        wq = self._kernel("wq", (d, d), ("embed", "heads"))
        wk = self._kernel("wk", (d, d), ("embed", "heads"))
        wv = self._kernel("wv", (d, d), ("embed", "heads"))
        wo = self._kernel("wo", (d, d), ("heads", "embed"), zero=True)
        w_fc = self._kernel("w_fc", (d, 4 * d), ("embed", "mlp"))
        w_proj = self._kernel("w_proj", (4 * d, d), ("mlp", "embed"), zero=True)
        attn_in = functools.partial(_attn_in, head_dim=self.head_dim)
        attn_out_mlp = _attn_out_mlp
        if self.remat == "save_dots":
            attn_in = jax.checkpoint(attn_in, policy=_save_dots_policy())
            attn_out_mlp = jax.checkpoint(attn_out_mlp, policy=_save_dots_policy())
        q, k, v = attn_in(x, wq, wk, wv, cos, sin)
        impl = "cudnn" if self.attention == "cudnn" else None
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return attn_out_mlp(x, y, wo, w_fc, w_proj), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPT(nn.Module):
    vocab_size: int
    depth: int
    dim: int
    head_dim: int = 128
    softcap: float = 15.0
    rope_base: float = 10000.0
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"

    def setup(self):
        self.wte = self.param(
            "wte",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.dim),
            jnp.float32,
        )
        block, inner = Block, "none"
        if self.remat == "save_dots" and os.environ.get("MCJAX_REMAT_SCOPE", "parts") == "parts":
            inner = "save_dots"
        elif self.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        self.blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=int(os.environ.get("MCJAX_SCAN_UNROLL", "1")),
        )(dim=self.dim, head_dim=self.head_dim, dtype=self.dtype, attention=self.attention, remat=inner)
        self.lm_head = self.param(
            "lm_head",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
            (self.dim, self.vocab_size),
            jnp.float32,
        )

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens int [B, T] -> embeddings [B, T, D] in the compute dtype."""
        return jnp.take(self.wte, tokens, axis=0).astype(self.dtype)

    def head(self) -> jnp.ndarray:
        """The vocabulary head [D, V] in the compute dtype (for `xent.token_nll`)."""
        return self.lm_head.astype(self.dtype)

    def __call__(
        self,
        tokens: jnp.ndarray | None = None,
        *,
        embeddings: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Final normed hidden states [B, T, D].

        Give either `tokens` int [B, T] or `embeddings` [B, T, D] (e.g. a working context
        of raw tokens and gists). `positions` [B, T] (int or float) place each entry for
        RoPE; the default is 0..T-1. Attention is causal over the given order.
        """
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rope_angles(positions, self.head_dim, self.rope_base)
        x, _ = self.blocks(rms_norm(x), cos, sin)
        return rms_norm(x)

    def logits(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Softcapped f32 logits [B, T, V] (for evaluation and sampling, not training)."""
        from mcjax.model.xent import softcap_logits

        return softcap_logits(self(tokens), self.head(), self.softcap)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Backend-dependent choices made once from the config."""

    dtype: Dtype
    attention: str


def resolve(dtype: str, attention: str, backend: str | None = None) -> Resolved:
    """'auto' dtype → bf16 on GPU/TPU, f32 on CPU; 'auto' attention → cuDNN on GPU in bf16."""
    backend = backend or jax.default_backend()
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(dtype)
    if dt is None:
        dt = jnp.float32 if backend == "cpu" else jnp.bfloat16
    att = attention
    if att == "auto":
        att = "cudnn" if backend == "gpu" and dt == jnp.bfloat16 else "xla"
    return Resolved(dt, att)


def build_gpt(cfg) -> GPT:
    """The GPT that `cfg` (an mcjax Config) describes, with backend choices resolved."""
    m = cfg.base_model
    r = resolve(m.dtype, m.attention)
    return GPT(
        vocab_size=cfg.dataset.vocab_size,
        depth=m.depth,
        dim=cfg.model_dim,
        head_dim=m.head_dim,
        softcap=m.softcap,
        rope_base=m.rope_base,
        dtype=r.dtype,
        attention=r.attention,
        remat=m.remat,
    )
