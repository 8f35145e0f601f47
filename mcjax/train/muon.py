"""Muon: momentum, then orthogonalise each 2-D update with a Newton–Schulz iteration.

Matrices may be stacked on leading axes (the scanned layers give [L, in, out]); the
last two axes are the matrix. Weights are stored [in, out] (x @ W), so the shape
factor max(1, out/in)^½ of nanochat's Muon reads the last axis over the one before it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon), tuned to maximise the slope at 0.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: jnp.ndarray, steps: int = 5) -> jnp.ndarray:
    """Approximately orthogonalise the last two axes of g ([..., m, n]) in bf16."""
    a, b, c = _NS_COEFFS
    x = g.astype(jnp.bfloat16)
    transpose = g.shape[-2] > g.shape[-1]
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    x = (x / (norm + 1e-7)).astype(jnp.bfloat16)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return x


class MuonState(NamedTuple):
    count: jnp.ndarray
    momentum: optax.Updates


def muon(
    learning_rate: Schedule,
    momentum: Schedule,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    """Muon for params whose last two axes are a matrix. Schedules take the step count."""

    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        beta = momentum(state.count)
        lr = learning_rate(state.count)
        mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, grads)

        def one(g, m):
            u = (1 - beta) * g + beta * m if nesterov else m
            scale = max(1.0, g.shape[-1] / g.shape[-2]) ** 0.5
            return (-lr * scale * newton_schulz(u, ns_steps)).astype(g.dtype)

        updates = jax.tree.map(one, grads, mu)
        return updates, MuonState(optax.safe_increment(state.count), mu)

    return optax.GradientTransformation(init, update)
