"""The plain baseline engine on the device: the GPT decoding with a W-entry KV cache (W =
W_max), no gists — what MegaContext is judged against.

Every token attends to itself and the W − 1 tokens before it (sliding-window attention,
exactly `GPT.__call__` under a band mask of width W). The cache is a ring: the token at
position p sits in slot p mod W, so writing a token evicts the one W positions back,
which is exactly the one that has left its window; keys keep their global RoPE
positions, so nothing is ever recomputed. `ingest` takes chunks of P ≤ W tokens: the
chunk attends to the ring (before it is overwritten) under the band mask and to itself
causally, then is written. `generate` decodes R tokens in one `lax.scan`; `score` decodes
given tokens the same way (teacher forcing).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcjax.model import kv_cache as kc
from mcjax.model.gpt import GPT
from mcjax.runtime.sampling import Sampling, next_token, stream_keys


class PlainState(NamedTuple):
    cache: kc.KVCache  # L × [B, N, W, H]
    ring_pos: jnp.ndarray  # int32 [B, W]: position held by each slot, -1 = empty
    length: jnp.ndarray  # int32 [B]: tokens seen
    logits: jnp.ndarray  # f32 [B, V]: next-token logits after the last token
    keys: jax.Array  # [B] PRNG keys


class PlainRuntime:
    """Pure device functions of the sliding-window engine (see the module doc)."""

    def __init__(self, gpt: GPT, cfg):
        self.gpt, self.cfg = gpt, cfg
        self.w = cfg.wc_capacity
        self.r = cfg.runtime.refocus_interval  # tokens per `generate` call, as the MegaContext engine
        self.kernel = kc.decode_kernel_for(cfg.runtime.decode_kernel, gpt, self.w)

    def init(self, batch: int, seed: int = 0) -> PlainState:
        return PlainState(
            cache=kc.empty_cache(self.gpt, batch, self.w),
            ring_pos=jnp.full((batch, self.w), -1, jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
            logits=jnp.zeros((batch, self.gpt.vocab_size), jnp.float32),
            keys=stream_keys(seed, batch),
        )

    def _extend(self, params, state: PlainState, tokens, n_valid):
        """tokens int32 [B, P] (P ≤ W), the first n_valid [B] real -> (state, hidden [B, P, D])."""
        gpt, p, w = self.gpt, params["gpt"], self.w
        b, n = tokens.shape
        pos = state.length[:, None] + jnp.arange(n)  # [B, P]
        valid = jnp.arange(n)[None, :] < n_valid[:, None]
        ring = state.ring_pos[:, None, :]
        old = (ring >= 0) & (ring > pos[:, :, None] - w)  # the band (pos − W, pos]; all older than the chunk
        new = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))  # P ≤ W: within the band
        slots = jnp.where(valid, pos % w, w)  # padding rows are dropped
        hidden, cache = kc.extend(gpt, p, kc.embed(gpt, p, tokens), pos, None, state.cache, old, new, slots)
        ring_pos = state.ring_pos.at[jnp.arange(b)[:, None], slots].set(pos, mode="drop")
        return state._replace(cache=cache, ring_pos=ring_pos, length=state.length + n_valid), hidden

    def ingest(self, params, state: PlainState, chunk: jnp.ndarray, n_valid: jnp.ndarray) -> tuple[PlainState, dict]:
        """Feed chunk int32 [B, P ≤ W] (the first n_valid [B] tokens of each row)."""
        state, hidden = self._extend(params, state, chunk, n_valid)
        last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = jnp.where((n_valid > 0)[:, None], kc.logits(self.gpt, params["gpt"], last), state.logits)
        return state._replace(logits=logits), {}

    def decode(self, params, state: PlainState, steps: int, sampling: Sampling, forced=None):
        """Decode `steps` tokens per stream, one `lax.scan`. -> (state, tokens [B, steps]); with
        `forced` int32 [B, steps] as `MCRuntime.decode`: -> (state, tokens, logprobs, greedy)."""
        gpt, p, w = self.gpt, params["gpt"], self.w
        rows = jnp.arange(state.length.shape[0])

        def step(s: PlainState, given):
            split = jax.vmap(jax.random.split)(s.keys)
            tok, out = next_token(s.logits, split[:, 1], sampling, given)
            # the token overwrites the slot of the one W positions back, the one that leaves its
            # window: then every slot in use is in the band, and the slots in use are a prefix
            slot = s.length % w
            hidden, cache = kc.decode(gpt, p, kc.embed(gpt, p, tok[:, None]), s.length[:, None], s.cache, slot,
                                      jnp.minimum(s.length + 1, w), kernel=self.kernel)
            s = s._replace(cache=cache, ring_pos=s.ring_pos.at[rows, slot].set(s.length), length=s.length + 1,
                           logits=kc.logits(gpt, p, hidden[:, 0]), keys=split[:, 0])
            return s, (tok, *out)

        state, outs = jax.lax.scan(step, state, None if forced is None else forced.T, length=steps)
        return (state, *(x.T for x in outs))

    def generate(self, params, state: PlainState, sampling: Sampling) -> tuple[PlainState, jnp.ndarray, dict]:
        """One block of R tokens (no refocus). -> (state, tokens int32 [B, R], {})."""
        state, toks = self.decode(params, state, self.r, sampling)
        return state, toks, {}

    def score(self, params, state: PlainState, tokens: jnp.ndarray) -> tuple[PlainState, tuple, dict]:
        """`generate` with the tokens given (int32 [B, n]). -> (state, (logprobs f32 [B, n],
        greedy int32 [B, n]), {})."""
        state, _, logp, greedy = self.decode(params, state, tokens.shape[1], Sampling(), forced=tokens)
        return state, (logp, greedy), {}
