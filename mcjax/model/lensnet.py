"""LensNet: scores every entry of a working context (WC) for expansion or collapse.

Reads the WC and nothing outside it: each entry's embedding plus three features — its
level of detail, the tokens it covers (span) and its distance in tokens from the end of
the WC — through a small bidirectional transformer (non-causal within the WC, padding
masked, RoPE at the entries' positions, Gaussian-damped by span in "gaussian" mode),
ending in one tanh score per entry: positive = "expand me", negative = "collapse me".
The output layer starts at zero, so a fresh LensNet scores everything 0 (no opinion).

Params: w_in [D_model, D]; lod_emb [3, D]; w_feat [2, D]; encoder/… (see encoder.py);
w_out [D, 1].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.megacontext.layout import WorkingContext
from mcjax.model.encoder import Encoder
from mcjax.model.gpt import fan_in_init, resolve, rms_norm
from mcjax.model.rope import rope_angles

Dtype = Any


def entry_features(wc: WorkingContext) -> jnp.ndarray:
    """[log1p(span), log1p(tokens from the entry's end to the WC's end)] per entry, f32 [B, W, 2].

    The WC's end is the furthest token any valid entry covers, so the feature depends on
    the WC alone.
    """
    end = wc.pos + wc.span
    wc_end = jnp.max(jnp.where(wc.valid, end, 0), axis=-1, keepdims=True)
    dist = jnp.where(wc.valid, wc_end - end, 0)
    return jnp.stack([jnp.log1p(wc.span.astype(jnp.float32)), jnp.log1p(dist.astype(jnp.float32))], axis=-1)


class LensNet(nn.Module):
    dim: int  # LensNet's own width
    layers: int = 2
    num_heads: int = 2
    rope: str = "gaussian"  # "gaussian" | "simple"
    rope_base: float = 10000.0
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # "xla" | "cudnn" (encoder.py; WC entries are packed left, padding last)

    @nn.compact
    def __call__(self, wc: WorkingContext) -> jnp.ndarray:
        """wc with leading batch axis [B, W, …] -> scores f32 [B, W] in (−1, 1); 0 on padding."""
        d_in, d = wc.emb.shape[-1], self.dim
        w_in = self.param("w_in", nn.with_logical_partitioning(fan_in_init(d_in, d), ("embed", "mlp")), (d_in, d), jnp.float32)
        lod_emb = self.param("lod_emb", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp")), (3, d), jnp.float32)
        w_feat = self.param("w_feat", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp")), (2, d), jnp.float32)
        w_out = self.param("w_out", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", None)), (d, 1), jnp.float32)

        x = rms_norm(wc.emb.astype(self.dtype)) @ w_in.astype(self.dtype)
        # One-hot matmuls, not a gather: the gather's backward scatters every entry into 3 rows.
        lod = jax.nn.one_hot(wc.lod, 3, dtype=jnp.float32)
        x = x + (lod @ lod_emb + entry_features(wc) @ w_feat).astype(self.dtype)
        spans = wc.span if self.rope == "gaussian" else None
        cos, sin = rope_angles(wc.pos, d // self.num_heads, self.rope_base, spans)
        x = Encoder(self.layers, self.num_heads, self.dtype, self.attention, name="encoder")(x, wc.valid, cos, sin)
        score = jnp.tanh((rms_norm(x) @ w_out.astype(self.dtype))[..., 0].astype(jnp.float32))
        return jnp.where(wc.valid, score, 0.0)


def build_lensnet(cfg) -> LensNet:
    """The LensNet that `cfg` (an mcjax Config) describes."""
    dim = cfg.lensnet.dim or cfg.model_dim
    return LensNet(
        dim=dim,
        layers=cfg.lensnet.layers,
        num_heads=cfg.lensnet.num_heads or max(1, dim // cfg.base_model.head_dim),
        rope=cfg.megacontext.rope,
        rope_base=cfg.base_model.rope_base,
        dtype=resolve(cfg.base_model.dtype, "auto").dtype,
        attention=resolve(cfg.base_model.dtype, cfg.lensnet.attention).attention,
    )
