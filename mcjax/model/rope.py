"""Rotary position embeddings from explicit per-entry positions.

Positions are given per entry (`pos [B, T]`), not implied by the index, so a working
context that mixes raw tokens and gists places each entry where its tokens were.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float) -> jnp.ndarray:
    """ω_i = base^(-2i/head_dim) for i < head_dim/2. Returns f32 [head_dim/2]."""
    return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def rope_angles(positions: jnp.ndarray, head_dim: int, base: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of pos·ω. positions [B, T] (int or float) -> two f32 [B, T, head_dim/2]."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, base)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the two halves of each head. x [B, T, N, H]; cos, sin [B, T, H/2] -> [B, T, N, H].

    The split-half convention of nanochat: y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], axis=-1)
