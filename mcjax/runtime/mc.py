"""The MegaContext engine on the device: B streams of history, each with its LOD tree, its
working-context layout and the base model's KV cache of that working context, advanced
by jitted programs (`ingest`, `rebuild`, `generate`; the host driver is `engine.py`).

State per stream (`MCState`, leading batch axis B; C = runtime capacity in tokens, N1 =
C/K blocks, W = W_max):
  tree          token ids int32 [C] + gists lod1 [C/K, D], lod2 [C/K², D] + length: the
                streaming tree (`megacontext/tree.py`), gists recomputed only where
                blocks changed;
  block_lod     int8 [N1]: the working context's layout over the blocks present (absent
                blocks stay 0 and are never edited); last_changed int32 [N1] (cooldown,
                residency); step int32: the stream's refocuses so far (an ingest chunk
                with nothing for a stream leaves it alone, so a stream evolves the same
                in any batch);
  cache         the GPT's keys/values of the working context, slot j = entry j
                (`model/kv_cache.py`), with the identity of each slot's entry
                (cache_pos, cache_lod) and the slots in use (cache_n); logits f32 [V]:
                the next-token distribution after the last cached entry; keys: a PRNG key.

How they move:
  ingest(chunk)  append up to P tokens to each tree, LensNet scores the working context
                 (capacity W + P), refocus. New blocks enter at LOD0, and forced
                 collapses keep the raw blocks whose tokens score best; with
                 runtime.ingest_gists, when the chunk overflows W − R every raw block but
                 the tail and head becomes a gist (`enter_as_gists`: the recency layout)
                 and that refocus only expands (cooldown ignored), the best-scored over
                 the whole history; with runtime.ingest_exchange the LOD2 superblocks
                 re-enter as gists too and that refocus first trades superblocks for
                 expansions (`allocator.exchange`). No base model: only the final working
                 context needs a cache, and `rebuild` makes it.
  rebuild(size)  bring the cache up to date with the layout. An entry's RoPE position is
                 its global position or its slot (megacontext.positions), so a cache row
                 stays valid while its entry and every entry before it are unchanged:
                 recompute from the first slot that differs — a suffix of `size` slots,
                 one of `prefill_sizes` (W/16^i), the whole working context being a plain
                 causal prefill. `pending` computes the size needed;
                 the host picks the program (no device conditional: on GPU a conditional
                 costs a host round trip and copies of what passes through it).
  generate       on a synced cache, decode R = refocus_interval tokens in one `lax.scan`
                 (sampling included), refresh the gists of the blocks they filled, refocus,
                 and report the rebuild size the next block needs (it travels back with
                 the tokens, so choosing costs no extra synchronisation).
  score          `generate` with the block's tokens given (teacher forcing; n ≤ R): the
                 log-probability of each given token and the greedy choice at its position,
                 as `generate` would have decoded them — likelihoods and exact-match checks
                 of the runtime as it runs.

Refocus: LensNet scores every entry; the focus allocator (`megacontext/allocator.py`,
`length` = the tokens present) edits the layout within the budget W − R, so the next R
decoded tokens always fit in the cache, and its fill expands the best-scored gists until
the layout holds W − R − collapse_margin entries: the budget is there to be used. When the
new tokens overflow it, forced collapses make room — down to W − R − collapse_margin, so
the next overflow (and its rebuild from an early slot) comes that many entries later. The budget is hard (the cache
has W slots): if cooldown blocks every collapse that could make room, up to two further
passes ignore cooldown (but never the tail) and take forced collapses only
(`budget_overrides` counts their collapses); the engine runs them only when a stream is
still over, a branch taken once per refocus.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcjax.config import collapse_margin, runtime_capacity
from mcjax.megacontext.allocator import AllocatorParams, entries, exchange, free_blocks, never_changed, refocus, residency
from mcjax.megacontext.layout import WorkingContext, assemble, block_entry_counts, rope_positions
from mcjax.megacontext.tree import StreamTree, append, empty_stream, refresh
from mcjax.model import kv_cache as kc
from mcjax.model.gistnet import read_bias
from mcjax.model.megacontext import MegaContextModel
from mcjax.runtime.sampling import Sampling, next_token, stream_keys


class MCState(NamedTuple):
    tree: StreamTree
    block_lod: jnp.ndarray
    last_changed: jnp.ndarray
    step: jnp.ndarray
    cache: kc.KVCache
    cache_pos: jnp.ndarray
    cache_lod: jnp.ndarray
    cache_n: jnp.ndarray
    logits: jnp.ndarray
    keys: jax.Array


def prefill_sizes(w: int, buckets: int) -> tuple[int, ...]:
    """Cache-rebuild sizes, smallest first: 0 (nothing changed), W/16^(n-1), …, W/16, W.

    A suffix of S slots attends to the cache with XLA's attention over S × (W + S) logits,
    while the whole WC is a causal prefill with cuDNN's flash attention; only short
    suffixes win (H100, d12, W = 8,192, batch 1: 512 slots 4.8 ms, 2,048 slots 15.4 ms,
    the whole WC 6.9 ms; bench/RESULTS.md), hence the steep spacing."""
    return (0,) + tuple(sorted({max(w // 16**i, 1) for i in range(buckets)}))


def enter_as_gists(lod, length, alloc: AllocatorParams, high: int, capacity: int = 0):
    """The layout after a chunk grew a stream to `length` tokens (its new blocks raw): if it
    holds more than `high` entries, every raw block the allocator may edit (not tail or head)
    becomes a gist — the recency layout, from which the refocus expands the best-scored over
    the whole history, not just the chunk. With `capacity` > 0 (`runtime.ingest_exchange`) the
    LOD2 superblocks become gists again too, when all of it fits `capacity` entries: what an
    earlier chunk's refocus sent to LOD2, scored before the question came, is decided anew.
    lod int8 [N1] -> int8 [N1]."""
    n1 = lod.shape[0]
    free = free_blocks(never_changed(n1), jnp.zeros(n1, bool), 0, alloc, length)
    over = entries(lod, alloc.k, length) > high
    new = jnp.where(free & (lod == 0) & over, 1, lod)
    if capacity:  # a LOD2 superblock is never in the tail or head: all of its blocks come back
        every = jnp.where((new == 2) & over, 1, new)
        new = jnp.where(entries(every, alloc.k, length) <= capacity, every, new)
    return new.astype(lod.dtype)


def _exchange(lod, wc: WorkingContext, scores, last_changed, length, step, alloc: AllocatorParams, high: int, margin: int):
    """`runtime.ingest_exchange`: superblocks traded for the expansions the ingest's refocus
    then makes (`allocator.exchange`), the room being what its fill may still take."""
    room = high - margin - entries(lod, alloc.k, length)
    return exchange(lod, wc, scores, last_changed, step, alloc, room, length=length)


def _voluntary(lod, wc: WorkingContext, scores, last_changed, length, step, key, alloc: AllocatorParams, high: int, margin: int):
    """The allocator's refocus within the budget: W − R, or W − R − margin when the new
    tokens overflow it. -> (lod, last_changed, refocus stats, budget)."""
    now = entries(lod, alloc.k, length)
    budget = jnp.where(now > high, high - margin, high)
    p = dataclasses.replace(alloc, w_max=budget, fill_to=high - margin)
    new, last, st = refocus(lod, wc, scores, last_changed, step, jax.random.fold_in(key, step), p, length=length)
    return new, last, {**st, "entries_before": now}, budget


def _fit(lod, wc: WorkingContext, scores, last_changed, length, step, key, alloc: AllocatorParams, budget, high: int):
    """Make a layout still over W − R fit, ignoring cooldown (never the tail): up to two
    passes of forced collapses only (LOD0 → LOD1 → LOD2). -> (lod, last_changed, collapses)."""
    forced = dataclasses.replace(alloc, w_max=budget, cooldown_steps=0, expand_threshold=2.0, collapse_threshold=2.0,
                                 iterations=1, fill_units=0)  # forced collapses all happen in a pass's first round
    overrides = jnp.zeros((), jnp.int32)
    key = jax.random.fold_in(key, step)
    for i in range(2):
        over = entries(lod, alloc.k, length) > high
        f_lod, f_last, f_st = refocus(lod, wc, scores, last_changed, step, jax.random.fold_in(key, 2**31 + i), forced, length=length)
        lod, last_changed = jnp.where(over, f_lod, lod), jnp.where(over, f_last, last_changed)
        overrides += jnp.where(over, f_st["num_collapses"], 0)
    return lod, last_changed, overrides


def fit_streams(lod, wc: WorkingContext, scores, last_changed, length, step, keys, alloc: AllocatorParams, budget, high: int):
    """`_fit` over a batch of streams [B, ...], run only when one of them is still over W − R:
    a branch outside the vmap (its predicate read once per refocus) instead of two allocator
    passes in every block. The same result as `_fit` per stream."""
    def fit(lod, last):
        return jax.vmap(lambda l, w, s, c, n, i, k, b: _fit(l, w, s, c, n, i, k, alloc, b, high))(
            lod, wc, scores, last, length, step, keys, budget
        )

    over = (jax.vmap(lambda l, n: entries(l, alloc.k, n))(lod, length) > high).any()
    return jax.lax.cond(over, fit, lambda l, c: (l, c, jnp.zeros(l.shape[:1], jnp.int32)), lod, last_changed)


def _summary(lod, last_changed, st, overrides, length, step, alloc: AllocatorParams, high: int) -> dict:
    """Per-stream refocus statistics (scalars; see `monitor.py` for their meaning)."""
    k = alloc.k
    after = entries(lod, k, length)
    blocks = length // k
    actions = st["num_expands"] + st["num_collapses"] + overrides
    complete = jnp.arange(lod.shape[0]) < blocks
    return {
        "num_expands": st["num_expands"],
        "num_collapses": st["num_collapses"] + overrides,
        "num_forced_collapses": st["num_forced_collapses"] + overrides,
        "budget_overrides": overrides,
        "entries_before": st["entries_before"],
        "entries_after": after,
        "blocks": blocks,
        "swap_rate": actions.astype(jnp.float32) / jnp.maximum(blocks, 1),
        "token_budget_utilization": after.astype(jnp.float32) / alloc.w_max,
        "mean_residency": jnp.where(complete, residency(last_changed, step), 0).sum() / jnp.maximum(blocks, 1).astype(jnp.float32),
        "over_budget": after > high,
    }


def allocate(lod, wc: WorkingContext, scores, last_changed, length, step, key, alloc: AllocatorParams, high: int, margin: int):
    """One stream's refocus at run time (see the module doc). lod int8 [N1]; wc and scores
    [W']: its working context and LensNet's scores; last_changed int32 [N1]; length, step
    int32 []; alloc.w_max = W_max; high = W_max − R. -> (lod, last_changed, stats: scalars).
    The engine runs the same three parts batched."""
    new, last, st, budget = _voluntary(lod, wc, scores, last_changed, length, step, key, alloc, high, margin)
    new, last, overrides = _fit(new, wc, scores, last, length, step, key, alloc, budget, high)
    return new, last, _summary(new, last, st, overrides, length, step, alloc, high)


class MCRuntime:
    """Pure device functions of the MegaContext engine for one config (see the module doc)."""

    def __init__(self, model: MegaContextModel, cfg):
        self.gpt, self.gistnet, self.lensnet = model.gpt, model.gistnet, model.lensnet
        self.cfg = cfg
        rt = cfg.runtime
        self.k = cfg.dataset.block_size
        self.w = cfg.wc_capacity
        self.r = rt.refocus_interval
        self.capacity = runtime_capacity(cfg)
        self.max_lod = cfg.megacontext.max_lod
        self.gaussian = cfg.megacontext.rope == "gaussian"
        self.positions = cfg.megacontext.positions  # the base's RoPE positions (layout.rope_positions)
        self.margin = collapse_margin(cfg)
        self.sizes = prefill_sizes(self.w, rt.prefill_buckets)
        self.alloc = AllocatorParams.from_config(cfg)
        self.kernel = kc.decode_kernel_for(rt.decode_kernel, self.gpt, self.w)

    # ------------------------------------------------------------------ state
    def init(self, batch: int, seed: int = 0) -> MCState:
        k, w, n1 = self.k, self.w, self.capacity // self.k
        tree = empty_stream(self.capacity, self.gpt.dim, self.gpt.dtype, k=k, max_lod=self.max_lod, ids=True)
        tree = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), tree)
        return MCState(
            tree=tree,
            block_lod=jnp.zeros((batch, n1), jnp.int8),
            last_changed=jnp.broadcast_to(never_changed(n1), (batch, n1)),
            step=jnp.zeros((batch,), jnp.int32),
            cache=kc.empty_cache(self.gpt, batch, w),
            cache_pos=jnp.zeros((batch, w), jnp.int32),
            cache_lod=jnp.zeros((batch, w), jnp.int32),
            cache_n=jnp.zeros((batch,), jnp.int32),
            logits=jnp.zeros((batch, self.gpt.vocab_size), jnp.float32),
            keys=stream_keys(seed, batch),
        )

    # ------------------------------------------------------------------ pieces
    def _read_bias(self, params):
        """The base's read gate on gist entries [L, N] (gistnet.read_gate), or None."""
        g = self.cfg.gistnet
        return read_bias(params["gistnet"], g.read_gate_init, g.read_gate_scale)

    def _embed(self, params):
        return lambda ids: kc.embed(self.gpt, params["gpt"], ids)

    def _gist(self, params):
        return lambda x, mask=None: self.gistnet.apply({"params": params["gistnet"]}, x, mask)

    def working_context(self, params, state: MCState, capacity: int) -> WorkingContext:
        """The working contexts the layouts describe, [B, capacity]."""
        embed = self._embed(params)
        one = lambda lod, ids, l1, l2, n: assemble(lod, ids, l1, l2, capacity, length=n, embed=embed)  # noqa: E731
        t = state.tree
        return jax.vmap(one)(state.block_lod, t.lod0, t.lod1, t.lod2, t.length)

    def _refocus(self, params, state: MCState, capacity: int, active, alloc=None, trade=False) -> tuple[MCState, dict]:
        """LensNet scores the WCs (capacity `capacity`); the allocator (`alloc`, default the
        config's) edits the layouts of the `active` [B] streams (the others, and their step
        counters, stay as they are), after trading superblocks for expansions if `trade`."""
        wc = self.working_context(params, state, capacity)
        scores = self.lensnet.apply({"params": params["lensnet"]}, wc)
        high, alloc, t = self.w - self.r, alloc or self.alloc, state.tree
        args = (wc, scores)
        lod, last = state.block_lod, state.last_changed
        if trade:  # the ingest only: the decode's refocus stays the program it was
            before = jax.vmap(lambda l, n: entries(l, alloc.k, n))(lod, t.length)
            lod, last, traded = jax.vmap(lambda *a: _exchange(*a, alloc, high, self.margin))(lod, *args, last, t.length, state.step)
        lod, last, st, budget = jax.vmap(lambda *a: _voluntary(*a, alloc, high, self.margin))(
            lod, *args, last, t.length, state.step, state.keys
        )
        if trade:  # the exchange's collapses count as the refocus's; its entries before are the layout's before it
            st = {**st, "num_collapses": st["num_collapses"] + traded, "entries_before": before}

        lod, last, overrides = fit_streams(lod, *args, last, t.length, state.step, state.keys, alloc, budget, high)
        stats = jax.vmap(lambda *a: _summary(*a, alloc, high))(lod, last, st, overrides, t.length, state.step)
        keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        state = state._replace(
            block_lod=keep(lod, state.block_lod), last_changed=keep(last, state.last_changed), step=state.step + active
        )
        return state, {**stats, "active": active}

    # ------------------------------------------------------------------ programs
    def ingest(self, params, state: MCState, chunk: jnp.ndarray, n_valid: jnp.ndarray) -> tuple[MCState, dict]:
        """Append chunk int32 [B, P] (the first n_valid [B] tokens of each row) and refocus."""
        gist, embed = self._gist(params), self._embed(params)
        tree = jax.vmap(lambda t, c, n: append(gist, t, c, n, embed))(state.tree, chunk, n_valid)
        lod, alloc, capacity = state.block_lod, self.alloc, self.w + chunk.shape[1]
        trade = self.cfg.runtime.ingest_exchange
        if self.cfg.runtime.ingest_gists:  # the history re-enters as gists: this refocus only expands (and forces),
            # over every block, cooldown ignored (the cache is rebuilt after an ingest anyway) — but for the
            # superblocks the exchange collapsed in this very refocus
            lod = jax.vmap(lambda l, n: enter_as_gists(l, n, self.alloc, self.w - self.r, capacity if trade else 0))(
                lod, tree.length)
            alloc = dataclasses.replace(alloc, collapse_threshold=2.0, cooldown_steps=1 if trade else 0)
        return self._refocus(params, state._replace(tree=tree, block_lod=lod), capacity, n_valid > 0, alloc, trade)

    def _unchanged(self, params, state: MCState):
        """(the working contexts [B, W], their cached prefix that is still valid [B], their
        entries [B])."""
        wc = self.working_context(params, state, self.w)
        slots = jnp.arange(self.w)
        same = wc.valid & (slots < state.cache_n[:, None]) & (wc.pos == state.cache_pos) & (wc.lod == state.cache_lod)
        first = jnp.where(same.all(axis=1), self.w, jnp.argmin(same, axis=1)).astype(jnp.int32)
        return wc, first, wc.valid.sum(axis=1).astype(jnp.int32)

    def pending(self, params, state: MCState) -> jnp.ndarray:
        """int32 []: the smallest of `sizes` that `rebuild` needs to bring every stream's cache up
        to date with its layout (0: nothing changed). Only the WC's metadata is computed."""
        _, first, count = self._unchanged(params, state)
        return self._size(count - first)

    def _size(self, need) -> jnp.ndarray:
        """The smallest rebuild size ≥ every stream's need [B]."""
        sizes = jnp.asarray(self.sizes, jnp.int32)
        return sizes[jnp.searchsorted(sizes, jnp.max(need), side="left")]

    def rebuild(self, params, state: MCState, size: int) -> MCState:
        """Recompute `size` cache slots (static: one of `sizes`, chosen on the host from
        `pending`) from each stream's first changed entry — the whole WC when size = W.
        An entry keeps its global position, and its slot while nothing before it changes, so the
        rows before stay valid with either megacontext.positions."""
        gpt, w, p = self.gpt, self.w, params["gpt"]
        wc, first, count = self._unchanged(params, state)
        spans = (lambda x: x) if self.gaussian else (lambda x: None)
        bias = self._read_bias(params)
        if size == w:
            gate = None if bias is None else (bias, wc.lod > 0)
            hidden, cache = kc.prefill(gpt, p, wc.emb, rope_positions(wc, self.positions), spans(wc.span), gate)
            start = jnp.zeros_like(first)
        else:
            start = jnp.minimum(first, w - size)  # [B]; rows start..start+size-1 cover first..count-1
            idx = start[:, None] + jnp.arange(size)
            take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
            old = jnp.arange(w)[None, None, :] < start[:, None, None]
            new = jnp.broadcast_to(jnp.tril(jnp.ones((size, size), bool)), (idx.shape[0], size, size))
            gate = None if bias is None else (bias, state.cache_lod > 0, take(wc.lod) > 0)
            hidden, cache = kc.extend(gpt, p, take(wc.emb), take(rope_positions(wc, self.positions)), spans(take(wc.span)),
                                      state.cache, old, new, idx, gate)
        last = jnp.take_along_axis(hidden, jnp.clip(count - 1 - start, 0, size - 1)[:, None, None], axis=1)[:, 0]
        logits = jnp.where((count > first)[:, None], kc.logits(gpt, p, last), state.logits)
        return state._replace(cache=cache, cache_pos=wc.pos, cache_lod=wc.lod, cache_n=count, logits=logits)

    def decode(self, params, state: MCState, steps: int, sampling: Sampling, forced=None):
        """Decode `steps` tokens per stream against the cache, one `lax.scan`. -> (state, tokens
        [B, steps]). With `forced` int32 [B, steps] the tokens are given instead of sampled
        (teacher forcing) and the scan also returns, per position, the log-probability of
        the given token and the greedy choice: -> (state, tokens, logprobs f32, greedy int32)."""
        gpt, p = self.gpt, params["gpt"]
        rows = jnp.arange(state.cache_n.shape[0])
        bias = self._read_bias(params)

        def step(carry, given):
            ids, length, cache, cache_pos, cache_lod, n, logits, keys = carry
            split = jax.vmap(jax.random.split)(keys)
            tok, out = next_token(logits, split[:, 1], sampling, given)
            ids = ids.at[rows, length].set(tok, mode="drop")
            cache_pos = cache_pos.at[rows, n].set(length, mode="drop")
            cache_lod = cache_lod.at[rows, n].set(0, mode="drop")  # slot n: the new (raw) token, then the prefix [0, n]
            gate = None if bias is None else (bias, cache_lod > 0)
            at = n if self.positions == "compact" else length  # RoPE position: its slot, or its place in the stream
            hidden, cache = kc.decode(gpt, p, kc.embed(gpt, p, tok[:, None]), at[:, None], cache, n, n + 1, gate, self.kernel)
            logits = kc.logits(gpt, p, hidden[:, 0])
            return (ids, length + 1, cache, cache_pos, cache_lod, n + 1, logits, split[:, 0]), (tok, *out)

        t = state.tree
        carry = (t.lod0, t.length, state.cache, state.cache_pos, state.cache_lod, state.cache_n, state.logits, state.keys)
        xs = None if forced is None else forced.T
        (ids, length, cache, cache_pos, cache_lod, n, logits, keys), outs = jax.lax.scan(step, carry, xs, length=steps)
        state = state._replace(tree=t._replace(lod0=ids, length=length), cache=cache, cache_pos=cache_pos,
                               cache_lod=cache_lod, cache_n=n, logits=logits, keys=keys)
        return (state, *(x.T for x in outs))

    def generate(self, params, state: MCState, sampling: Sampling) -> tuple[MCState, jnp.ndarray, dict]:
        """One block on a synced cache: decode R tokens, gist the blocks they filled, refocus.
        -> (state, tokens int32 [B, R], refocus stats [B] with `pending`: the rebuild size
        the next block needs)."""
        state, toks = self.decode(params, state, self.r, sampling)
        state, stats = self._after_block(params, state, self.r)
        return state, toks, stats

    def score(self, params, state: MCState, tokens: jnp.ndarray) -> tuple[MCState, tuple, dict]:
        """`generate` with the block's n ≤ R tokens given (int32 [B, n]) instead of sampled:
        decoded against the cache exactly as `generate` decodes, then gisted and refocused.
        -> (state, (log-probabilities f32 [B, n] of the given tokens, greedy choices int32
        [B, n]), refocus stats as `generate`'s)."""
        state, _, logp, greedy = self.decode(params, state, tokens.shape[1], Sampling(), forced=tokens)
        state, stats = self._after_block(params, state, tokens.shape[1])
        return state, (logp, greedy), stats

    def _after_block(self, params, state: MCState, n: int) -> tuple[MCState, dict]:
        """After n decoded tokens: refresh the gists of the blocks they filled, refocus, and
        report the rebuild size the next block needs."""
        gist, embed = self._gist(params), self._embed(params)
        tree = jax.vmap(lambda t: refresh(gist, t, t.length - n, n, embed))(state.tree)
        cached = state.block_lod  # the layout the cache holds (decoded tokens only extend it)
        state, stats = self._refocus(params, state._replace(tree=tree), self.w, jnp.ones_like(state.step, bool))
        # The cache stays valid up to the first block the refocus changed: no WC to assemble.
        counts = block_entry_counts(state.block_lod, self.k, state.tree.length)
        changed = state.block_lod != cached
        first = jnp.argmax(changed, axis=-1)[:, None]  # the first changed block
        before = jnp.where(jnp.arange(changed.shape[-1]) < first, counts, 0).sum(-1)  # its entries before it
        need = jnp.where(changed.any(-1), counts.sum(-1) - before, 0)
        return state, {**stats, "pending": jnp.broadcast_to(self._size(need), state.step.shape)}
