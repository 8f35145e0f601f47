"""A bidirectional (non-causal) transformer encoder with padding masks and given RoPE angles.

Shared by GistNet (over the K entries of a block, positions 0..K-1) and LensNet (over a
working context, at the entries' global positions, Gaussian-damped by their spans).
Pre-norm layers with QK-norm and a relu² MLP of width 4D, as in the base GPT; params
stacked on a leading "layers" axis, layers unrolled in the program (these encoders are
shallow).

Params (f32, cast to `dtype`): wq, wk, wv, wo [L, D, D]; w_fc [L, D, 4D]; w_proj [L, 4D, D].
wo and w_proj start at zero, so a fresh encoder is the identity.

Attention "xla" takes any padding mask; "cudnn" (flash attention on GPU, bf16) needs the
real entries of every row first and passes the padding as key lengths — true of working
contexts (assembly packs entries left) and of GistNet blocks (a partly filled block's
real entries come first). Both give the same outputs up to a few bf16 ulps (checked on an
H100 by bench/mc_profile.py; CPU runs only "xla").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.model.gpt import layer_params, rms_norm, split_layers
from mcjax.model.rope import apply_rope

Dtype = Any


def masked_attention(q, k, v, mask, implementation: str = "xla"):
    """Bidirectional attention, padding keys masked. q [B, Tq, N, H]; k, v [B, Tk, N, H];
    mask bool [B, Tk] (True = real key) -> [B, Tq, N, H]. "xla" runs anywhere with any mask;
    "cudnn" requires each row's real keys to come first (the mask becomes key lengths)."""
    if implementation == "cudnn":
        lengths = jnp.maximum(mask.sum(-1, dtype=jnp.int32), 1)  # a row of padding only: its output is discarded
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation="xla")


def encoder_layer(x, w, cos, sin, mask, num_heads: int, attention: str = "xla"):
    """One pre-norm bidirectional layer. x [B, T, D]; w: the layer's matrices; cos, sin
    [B, T, H/2]; mask bool [B, T] (True = real entry); attention "xla" | "cudnn" -> [B, T, D]."""
    b, t, d = x.shape
    hd = d // num_heads
    h = rms_norm(x)
    q = rms_norm(apply_rope((h @ w["wq"]).reshape(b, t, num_heads, hd), cos, sin))
    k = rms_norm(apply_rope((h @ w["wk"]).reshape(b, t, num_heads, hd), cos, sin))
    v = (h @ w["wv"]).reshape(b, t, num_heads, hd)
    x = x + masked_attention(q, k, v, mask, attention).reshape(b, t, d) @ w["wo"]
    return x + jnp.square(jax.nn.relu(rms_norm(x) @ w["w_fc"])) @ w["w_proj"]


class Encoder(nn.Module):
    """`layers` bidirectional layers. x [B, T, D], mask bool [B, T], cos/sin [B or 1, T, H/2]
    -> [B, T, D]. Padded entries attend but are never attended to. With attention "cudnn"
    the mask must hold each row's real entries first (see the module doc)."""

    layers: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # "xla" | "cudnn"

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        ws = layer_params(self, x.shape[-1], self.layers, self.dtype)
        x = x.astype(self.dtype)
        for w in split_layers(ws, self.layers):
            x = encoder_layer(x, w, cos, sin, mask, self.num_heads, self.attention)
        return x
