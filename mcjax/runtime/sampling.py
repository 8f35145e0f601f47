"""Next-token sampling inside the jitted decode loop: greedy, temperature, top-k.

Every stream has its own PRNG key, so a stream's text depends only on its own key and
history — never on which other streams share its batch (`stream_keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. Hashable: a static argument of the jitted decode."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0 = all)

    def check(self) -> None:
        """ValueError naming the setting (as the CLI flag without its dashes) that no sampler takes."""
        if not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature}: must be ≥ 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top-k {self.top_k}: must be ≥ 0 (0 = the whole vocabulary)")


def stream_keys(seed: int | Sequence[int], streams: int) -> jax.Array:
    """One PRNG key per stream: from one seed, stream i gets fold_in(key(seed), i); from a
    sequence of seeds, stream i gets key(seed[i]) — so a stream sampled alone with [s]
    draws exactly what it draws as any stream of a batch seeded [..., s, ...]."""
    if isinstance(seed, int):
        base = jax.random.key(seed)
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(streams))
    if len(seed) != streams:
        raise ValueError(f"{len(seed)} seeds for {streams} streams")
    return jax.vmap(jax.random.key)(jnp.asarray(seed, jnp.uint32))


def sample(logits: jnp.ndarray, keys: jax.Array, s: Sampling) -> jnp.ndarray:
    """logits f32 [B, V], keys [B] -> token ids int32 [B]."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def next_token(logits: jnp.ndarray, key: jax.Array, s: Sampling, given: jnp.ndarray | None):
    """One decode step's token: sampled (`given` None) -> (tokens int32 [B], ()); or given
    (teacher forcing, int32 [B]) -> (given, (its log-probability f32 [B], the greedy choice
    int32 [B])). logits f32 [B, V], keys [B]."""
    if given is None:
        return sample(logits, key, s), ()
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), given[:, None], axis=-1)[:, 0]
    return given, (logp, jnp.argmax(logits, axis=-1).astype(jnp.int32))
