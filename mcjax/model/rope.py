"""Rotary position embeddings from explicit per-entry positions, plain or Gaussian.

Positions are given per entry (`pos [B, T]`), not implied by the index, so a working
context that mixes raw tokens and gists places each entry where its tokens were.

Gaussian RoPE treats an entry that covers `span` tokens as a blur over their positions.
The expected rotation E[e^{iωp}] of a position p with mean μ and spread σ is
e^{iωμ}·exp(−½(σω)²): each frequency ω is damped by exp(−½(σω)²), so a gist keeps the
slow (long-range) frequencies of its place and loses the fast ones it cannot resolve.
We take μ = the centre of the covered tokens and σ = their standard deviation,
√((span² − 1)/12) — the issue's "σ = the entry's span" made exact for raw tokens:
a single token (span 1) has σ = 0 and gets plain RoPE at its own position.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float) -> jnp.ndarray:
    """ω_i = base^(-2i/head_dim) for i < head_dim/2. Returns f32 [head_dim/2]."""
    return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def rope_angles(
    positions: jnp.ndarray,
    head_dim: int,
    base: float,
    spans: jnp.ndarray | None = None,
    frequencies: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of the rotation, f32 [B, T, head_dim/2] each.

    positions [B, T] (int or float): first token of each entry. spans [B, T] or None:
    tokens each entry covers; given, the rotation is Gaussian (centred, damped); None or
    all-ones spans give plain RoPE at `positions`. frequencies [head_dim/2]: ω of a
    pretrained model's scaled RoPE (`llama.rope_frequencies_of`); None: `rope_frequencies`.
    """
    omega = rope_frequencies(head_dim, base) if frequencies is None else frequencies
    pos = positions.astype(jnp.float32)
    if spans is None:
        angles = pos[..., None] * omega
        return jnp.cos(angles), jnp.sin(angles)
    span = spans.astype(jnp.float32)
    centre = pos + 0.5 * (span - 1.0)
    sigma = jnp.sqrt(jnp.maximum(span * span - 1.0, 0.0) / 12.0)
    angles = centre[..., None] * omega
    damp = jnp.exp(-0.5 * jnp.square(sigma[..., None] * omega))
    return jnp.cos(angles) * damp, jnp.sin(angles) * damp


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the two halves of each head. x [B, T, N, H]; cos, sin [B, T, H/2] -> [B, T, N, H].

    The split-half convention of nanochat: y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], axis=-1)
