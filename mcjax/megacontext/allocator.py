"""The focus allocator: LensNet scores → expand/collapse edits of a WC layout, in fixed shapes.

One *refocus* takes a layout `block_lod [N1]` ∈ {0, 1, 2}, the working context assembled
from it, LensNet's signed (tanh) score for every WC entry (positive = "expand me",
negative = "collapse me") and returns a new layout that stays valid and within the budget
of W_max entries. Everything is pure jnp with static shapes: it jits, vmaps over a batch,
and never returns to the host.

Edits ("units") and their per-unit scores. Every edit changes the entry count by K − 1:

    unit            edit                       score used to rank it
    block b         LOD1 → LOD0 (expand)       the score of b's gist
    block b         LOD0 → LOD1 (collapse)     −mean of b's K token scores
    superblock s    LOD2 → K × LOD1 (expand)   the score of s's LOD2 gist
    superblock s    K × LOD1 → LOD2 (collapse) −mean of its K gist scores (max_lod ≥ 2)

Entry scores are reduced to blocks with `segment_sum` over `wc.pos // K` (a LOD2 gist
lands on its superblock's first block). The M = N1 + N2 units (N2 = N1 // K complete
superblocks; a trailing partial superblock never goes to LOD2) are ranked together, so a
block edit and a superblock edit compete on the same scale. With `span_blocks` > 1 a block
unit's score is the best of its own and the `span_blocks` − 1 blocks' before it
(`span_scores`): a fact that starts late in its block ends in the next, and the pair is
expanded, and kept, together; with `span_back` > 0 also of the `span_back` blocks' after it
(the tail's lend nothing), so a fact whose later block scores higher is expanded from its start.

A unit is *eligible* when it is at the right level and every block it touches is *free*:
not in the protected tail (the blocks holding the last `recent_tokens` tokens: the last
ceil(recent_tokens / K) blocks, one more while the last block is partly filled) or head (the
first `sink_tokens` tokens: the base's attention sink), not in cooldown
(`step − last_changed < cooldown_steps`) and not already changed in this refocus. Each of
`iterations` rounds (`lax.fori_loop`, unrolled) then does:

1. Collapses. Eligible collapse units are ranked best first (a sort over all M). The
   first `max_replacements` of them with −score ≥ collapse_threshold are taken — except a
   superblock holding a block that step 2 would expand first (one of its top
   `max_replacements` block expands, ranked on the layout before the collapses): a
   superblock's −mean would otherwise bury the one block the scores ask for (a fact among
   31 filler gists) in LOD2 before it could be expanded. If the layout is then still over
   W_max, further collapses are *forced*: the next eligible units in the same order,
   threshold ignored, those guarded superblocks last (but never the tail, cooldown or
   level masks), until it fits or the candidates run out.
2. Expands. Eligible expand units with score ≥ expand_threshold are ranked best first
   (`lax.top_k` with k = max_replacements) and accepted in order while the running total
   of entries (a cumulative sum of their K − 1 costs) stays ≤ W_max.

Then the *fill* (when `fill_units` > 0): the budget is there to be used, so after the
rounds the best-ranked eligible expand units — thresholds ignored, ties broken toward the
most recent blocks — are expanded while the layout stays within min(fill_to, W_max)
entries (at most `fill_units` of them; the runtime fills to W_max − R − collapse margin).
Thresholds and cooldown decide which swaps are worth their churn; the fill only spends
what the budget leaves, so a LensNet with nothing to say
degrades to recency, never below it, and the working context holds ≥ fill_to − (K − 1)
entries whenever enough free gists exist.

Edits are applied with scatters on `block_lod` (a superblock edit writes its K blocks);
changed blocks get `last_changed = step` and are frozen for the rest of the refocus, so
the per-block scores computed once from the input WC stay valid for every unit that can
still move. Consequently a block changes at most once per refocus, a layout that fits
the budget always keeps fitting, and an over-budget one never grows.

Policies: "greedy" ranks by score; "stochastic" ranks by score + temperature · Gumbel
noise (Gumbel-top-k: sampling without replacement ∝ exp(score / temperature)). The noise
only orders the candidates (forced collapses included); the threshold tests use the
clean scores.

`exchange` (the runtime's ingest with `runtime.ingest_exchange`) runs before a refocus that
only expands: it collapses to LOD2 the superblocks holding none of the best-ranked blocks, as
many as expanding those takes beyond the room — one collapse frees one expansion's K − 1 entries.

`last_changed` holds the refocus step of each block's last change, or `NEVER` for blocks
never changed (start from `never_changed(N1)`); `residency` turns it into steps since
the last change for the residency histogram of the telemetry spec.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from mcjax.megacontext.layout import WorkingContext, block_entry_counts, prefix_sum

NEVER = -(2**30)  # `last_changed` of a block that has never changed (never in cooldown)


@dataclasses.dataclass(frozen=True)
class AllocatorParams:
    """Allocator settings, one object for `refocus`.

    A pytree: the structural fields (k, max_replacements, iterations, policy) are static
    metadata (changing them recompiles); the others are leaves, so thresholds or the
    budget can change between calls of one jitted function. Being frozen and hashable it
    can also be passed as a static argument.
    """

    k: int  # K, tokens per block (dataset.block_size)
    w_max: int  # W_max, the entry budget (Config.wc_capacity)
    recent_tokens: int = 0  # the protected tail, kept at LOD0
    sink_tokens: int = 0  # the protected head (the base's attention sink), kept at LOD0
    max_lod: int = 2  # 1: no superblock collapses to LOD2
    max_replacements: int = 4  # R: at most R expands and R (unforced) collapses per iteration
    expand_threshold: float = 0.1  # expand when score ≥ this
    collapse_threshold: float = 0.1  # collapse when −score ≥ this
    cooldown_steps: int = 2  # a block changed less than this many steps ago stays put
    iterations: int = 2  # rounds per refocus
    policy: Literal["greedy", "stochastic"] = "greedy"
    temperature: float = 1.0  # Gumbel noise scale (stochastic)
    fill_units: int = 0  # most fill expansions per refocus (static); 0 = no fill
    fill_to: int = 2**30  # the fill expands while the layout stays within min(fill_to, w_max) entries
    span_blocks: int = 1  # a block's score: the best of its own and the span_blocks − 1 blocks before it (static)
    span_back: int = 0  # … and of the span_back blocks after it, the tail's excepted (static)

    @classmethod
    def from_config(cls, cfg) -> AllocatorParams:
        """From a validated `mcjax.config.Config` (dataset, megacontext, allocator sections)."""
        a, mc = cfg.allocator, cfg.megacontext
        k, w = cfg.dataset.block_size, cfg.wc_capacity
        return cls(
            k=k,
            w_max=w,
            recent_tokens=mc.recent_tokens,
            sink_tokens=mc.sink_tokens,
            max_lod=mc.max_lod,
            max_replacements=a.max_replacements,
            expand_threshold=a.expand_threshold,
            collapse_threshold=a.collapse_threshold,
            cooldown_steps=a.cooldown_steps,
            iterations=a.iterations,
            policy=a.policy,
            temperature=a.temperature,
            fill_units=fill_units(w, k) if a.fill else 0,
            span_blocks=a.span_blocks,
            span_back=a.span_back,
        )


jax.tree_util.register_dataclass(
    AllocatorParams,
    data_fields=[
        "w_max",
        "recent_tokens",
        "sink_tokens",
        "max_lod",
        "expand_threshold",
        "collapse_threshold",
        "cooldown_steps",
        "temperature",
        "fill_to",
    ],
    meta_fields=["k", "max_replacements", "iterations", "policy", "fill_units", "span_blocks", "span_back"],
)


def fill_units(w_max: int, k: int) -> int:
    """Enough fill expansions to take an empty budget of `w_max` entries to full in one refocus."""
    return -(-w_max // max(k - 1, 1))


class UnitScores(NamedTuple):
    """Per-unit scores, f32 [M] with M = N1 + N2 (blocks first, then complete superblocks).

    expand: gist score of a LOD1 block / of a LOD2 superblock.
    collapse: −mean of a LOD0 block's K token scores / of an all-LOD1 superblock's K gist
    scores. Entries are meaningful only for units at the matching level.
    """

    expand: jnp.ndarray
    collapse: jnp.ndarray


class _State(NamedTuple):
    lod: jnp.ndarray  # int8 [N1]
    length: jnp.ndarray  # int32 []: tokens present (N1·K in training)
    changed: jnp.ndarray  # bool [N1], changed in this refocus
    last_changed: jnp.ndarray  # int32 [N1]
    num_expands: jnp.ndarray  # int32 []
    num_collapses: jnp.ndarray  # int32 [], forced ones included
    num_forced: jnp.ndarray  # int32 []
    num_fills: jnp.ndarray  # int32 [], the fill's expands (counted in num_expands too)


# ----------------------------------------------------------------------------- scores and masks


def unit_scores(wc: WorkingContext, scores: jnp.ndarray, n1: int, k: int) -> UnitScores:
    """Reduce entry scores f32 [W] (aligned with `wc`, padding ignored) to units [N1 + N2]."""
    n2 = n1 // k
    block = jnp.where(wc.valid, wc.pos // k, 0)  # a LOD2 gist maps to its superblock's first block
    s = jnp.where(wc.valid, scores.astype(jnp.float32), 0.0)

    def per_block(level):
        return jax.ops.segment_sum(jnp.where(wc.lod == level, s, 0.0), block, num_segments=n1)

    gist, token_sum, top = per_block(1), per_block(0), per_block(2)
    super_gist = top[: n2 * k : k]
    super_mean = gist[: n2 * k].reshape(n2, k).mean(axis=1)
    return UnitScores(
        expand=jnp.concatenate([gist, super_gist]),
        collapse=jnp.concatenate([-token_sum / k, -super_mean]),
    )


def span_scores(us: UnitScores, lod: jnp.ndarray, span: int, head_blocks: int = 0, back: int = 0, tail=None) -> UnitScores:
    """Block units scored as spans: a LOD1 block's expand score and a LOD0 block's keep score
    (−collapse) become the best of its own and those of the `span` − 1 blocks before it that
    are at LOD0 or LOD1 (a gist's score, a raw block's token mean), so the block after a wanted
    one is expanded with it and kept while it stays: a fact that starts late in its block ends
    in the next. With `back` > 0 also of the `back` blocks after it, so the block *before* a
    wanted one comes too (a fact whose later block scores higher). The protected head's blocks
    lend no score, nor backwards the tail's (`tail`, bool [N1]: raw by rule, its keep scores say
    nothing of the blocks before it). Superblock units are unchanged; span 1 with back 0 returns
    `us` as it is."""
    if span <= 1 and back <= 0:
        return us
    n1 = lod.shape[0]
    own = jnp.where(lod == 1, us.expand[:n1], jnp.where(lod == 0, -us.collapse[:n1], -jnp.inf))
    lends = jnp.where(jnp.arange(n1) >= head_blocks, own, -jnp.inf)
    best = own
    for j in range(1, span):
        best = jnp.maximum(best, jnp.concatenate([jnp.full((j,), -jnp.inf), lends[: n1 - j]]))
    lends_back = lends if tail is None else jnp.where(tail, -jnp.inf, lends)
    for j in range(1, back + 1):
        best = jnp.maximum(best, jnp.concatenate([lends_back[j:], jnp.full((j,), -jnp.inf)]))
    return UnitScores(
        expand=us.expand.at[:n1].set(jnp.where(lod == 1, best, us.expand[:n1])),
        collapse=us.collapse.at[:n1].set(jnp.where(lod == 0, -best, us.collapse[:n1])),
    )


def tail_blocks(n1: int, p: AllocatorParams, length) -> jnp.ndarray:
    """bool [N1]: the protected tail — every block holding one of the last `recent_tokens` of the
    `length` tokens present, and every block past them (absent)."""
    return (jnp.arange(n1) + 1) * p.k > length - jnp.asarray(p.recent_tokens)


def free_blocks(last_changed, changed, step, p: AllocatorParams, length=None) -> jnp.ndarray:
    """bool [N1]: blocks that may change now (not tail or head, not in cooldown, not yet changed).

    The tail is every block holding one of the last `recent_tokens` of the `length` tokens
    present (default N1·K); the head every block holding one of the first `sink_tokens`;
    blocks past `length` (absent) are protected too.
    """
    n1 = last_changed.shape[0]
    length = n1 * p.k if length is None else length
    protected = tail_blocks(n1, p, length) | (jnp.arange(n1) * p.k < jnp.asarray(p.sink_tokens))
    cooling = step - last_changed < p.cooldown_steps
    return ~protected & ~cooling & ~changed


def eligible_units(lod, free, p: AllocatorParams) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(expandable, collapsible) bool [M]: units at the right level whose blocks are all free.

    Expand: a LOD1 block; a LOD2 superblock. Collapse: a LOD0 block; a superblock whose K
    blocks are all LOD1 (only when max_lod ≥ 2).
    """
    n1, k = lod.shape[0], p.k
    n2 = n1 // k

    def whole_super(mask):
        return mask[: n2 * k].reshape(n2, k).all(axis=1)

    expandable = jnp.concatenate([(lod == 1) & free, whole_super((lod == 2) & free)])
    collapsible = jnp.concatenate(
        [(lod == 0) & free, whole_super((lod == 1) & free) & (jnp.asarray(p.max_lod) >= 2)]
    )
    return expandable, collapsible


def entries(lod: jnp.ndarray, k: int, length=None) -> jnp.ndarray:
    """int32 []: entries of a layout (of the `length` tokens present; default all)."""
    return block_entry_counts(lod, k, length).sum().astype(jnp.int32)


def _count(mask: jnp.ndarray) -> jnp.ndarray:
    return mask.sum(dtype=jnp.int32)


def _ranking_noise(key, m: int, p: AllocatorParams) -> jnp.ndarray:
    if p.policy == "greedy":
        return jnp.zeros((m,), jnp.float32)
    return p.temperature * jax.random.gumbel(key, (m,), jnp.float32)


# ----------------------------------------------------------------------------- one round


def _scatter(state: _State, units, take, block_level: int, super_level: int, step, k: int) -> _State:
    """Scatter the taken units (int32 [P], bool [P]) into the layout.

    A block unit writes `block_level` on its block, a superblock unit `super_level` on its
    K blocks; those blocks are marked changed at `step`. Untaken rows (and the unused K − 1
    columns of a block unit) point at index N1 and are dropped.
    """
    n1 = state.lod.shape[0]
    cols = jnp.arange(k)
    is_block = units < n1
    blocks = jnp.where(
        is_block[:, None],
        jnp.where(cols == 0, units[:, None], n1),
        (units[:, None] - n1) * k + cols,
    )
    blocks = jnp.where(take[:, None], blocks, n1).reshape(-1)
    level = jnp.broadcast_to(jnp.where(is_block, block_level, super_level)[:, None], (units.shape[0], k))
    return state._replace(
        lod=state.lod.at[blocks].set(level.reshape(-1).astype(state.lod.dtype), mode="drop"),
        changed=state.changed.at[blocks].set(True, mode="drop"),
        last_changed=state.last_changed.at[blocks].set(step, mode="drop"),
    )


def _wanted(us: UnitScores, expandable, noise, p: AllocatorParams, n1: int) -> jnp.ndarray:
    """bool [M]: the collapse units holding a block that this round's expand step would pick
    first (its top R block expands with score ≥ τ_expand, on the layout before the collapses)."""
    m, k = expandable.shape[0], p.k
    ok = expandable & (us.expand >= p.expand_threshold)
    _, top = jax.lax.top_k(jnp.where(ok, us.expand + noise, -jnp.inf), min(p.max_replacements, m))
    blocks = jnp.zeros(n1, bool).at[jnp.where(ok[top] & (top < n1), top, n1)].set(True, mode="drop")
    n2 = m - n1
    return jnp.concatenate([blocks, blocks[: n2 * k].reshape(n2, k).any(axis=1)])


def _collapse(state: _State, us: UnitScores, collapsible, noise, step, p: AllocatorParams, wanted) -> _State:
    """Up to R thresholded collapses, best first, none of them `wanted`; then forced ones while
    over W_max (the wanted ones last)."""
    m, k = collapsible.shape[0], p.k
    guard = (wanted & collapsible).astype(jnp.int32)
    rank = jnp.where(collapsible, us.collapse + noise, -jnp.inf)
    _, _, order = jax.lax.sort((guard, -rank, jnp.arange(m)), num_keys=2)  # stable: ties keep unit order
    eligible = collapsible[order]
    passes = eligible & (guard[order] == 0) & (us.collapse[order] >= p.collapse_threshold)
    normal = passes & (prefix_sum(passes.astype(jnp.int32)) <= p.max_replacements)
    excess = entries(state.lod, k, state.length) - (k - 1) * normal.sum() - p.w_max
    extra = eligible & ~normal
    gain = prefix_sum(extra * (k - 1)) - extra * (k - 1)  # gain of the forced ones before this
    forced = extra & (gain < excess) & (k > 1)
    state = _scatter(state, order, normal | forced, 1, 2, step, k)
    return state._replace(
        num_collapses=state.num_collapses + _count(normal | forced),
        num_forced=state.num_forced + _count(forced),
    )


def _expand(state: _State, us: UnitScores, expandable, noise, step, p: AllocatorParams) -> _State:
    """Up to R expands with score ≥ τ_expand, best first, while the running total fits W_max."""
    m, k = expandable.shape[0], p.k
    ok = expandable & (us.expand >= p.expand_threshold)
    _, top = jax.lax.top_k(jnp.where(ok, us.expand + noise, -jnp.inf), min(p.max_replacements, m))
    cost = ok[top] * (k - 1)
    take = ok[top] & (entries(state.lod, k, state.length) + jnp.cumsum(cost) <= p.w_max)
    state = _scatter(state, top, take, 0, 1, step, k)
    return state._replace(num_expands=state.num_expands + _count(take))


def _fill(state: _State, us: UnitScores, expandable, noise, step, p: AllocatorParams) -> _State:
    """Up to `fill_units` expands, thresholds ignored, best first (ties: the most recent
    unit first), while the layout stays within min(fill_to, W_max) entries."""
    m, k = expandable.shape[0], p.k
    n1 = state.lod.shape[0]
    units = jnp.arange(m)
    last_block = jnp.where(units < n1, units, (units - n1 + 1) * k - 1)  # a superblock's last block
    rank = jnp.where(expandable, us.expand + noise, -jnp.inf)
    _, _, order = jax.lax.sort((-rank, -last_block, units), num_keys=2)
    top = order[: min(p.fill_units, m)]
    cost = expandable[top] * (k - 1)
    limit = jnp.minimum(p.fill_to, p.w_max)
    take = expandable[top] & (entries(state.lod, k, state.length) + jnp.cumsum(cost) <= limit)
    state = _scatter(state, top, take, 0, 1, step, k)
    return state._replace(num_expands=state.num_expands + _count(take), num_fills=state.num_fills + _count(take))


def _round(i, state: _State, us: UnitScores, step, key, p: AllocatorParams) -> _State:
    """Round i of a refocus: collapses (forced ones included), then expands on the result."""
    m = us.expand.shape[0]
    kc, ke = jax.random.split(jax.random.fold_in(key, i))
    expand_noise = _ranking_noise(ke, m, p)
    free = free_blocks(state.last_changed, state.changed, step, p, state.length)
    expandable, collapsible = eligible_units(state.lod, free, p)
    wanted = _wanted(us, expandable, expand_noise, p, state.lod.shape[0])
    state = _collapse(state, us, collapsible, _ranking_noise(kc, m, p), step, p, wanted)
    free = free_blocks(state.last_changed, state.changed, step, p, state.length)
    expandable, _ = eligible_units(state.lod, free, p)
    return _expand(state, us, expandable, expand_noise, step, p)


# ----------------------------------------------------------------------------- public


def refocus(
    block_lod: jnp.ndarray,
    wc: WorkingContext,
    scores: jnp.ndarray,
    last_changed: jnp.ndarray,
    step: jnp.ndarray,
    key: jax.Array,
    params: AllocatorParams,
    length=None,
) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """One refocus of one sequence's layout (see the module docstring). Jit- and vmap-able.

    block_lod int [N1]: the current layout (valid; it may be over budget).
    wc: the WC assembled from `block_lod` with a capacity W that holds all its entries
        (only `pos`, `lod` and `valid` are read).
    scores f32 [W]: LensNet scores aligned with `wc`; padding slots are ignored.
    last_changed int32 [N1]: step of each block's last change, `NEVER` if none.
    step int32 []: this refocus' step (cooldown: `step − last_changed < cooldown_steps`).
    key: PRNG key (used by the stochastic policy only).
    params: `AllocatorParams`.
    length int32 [] (optional): tokens present in a growing history (the runtime engine):
        blocks past it are absent and never edited, entry counts and the tail are taken
        over the present tokens. Default N1·K (training).

    Returns (new_block_lod int8 [N1], new_last_changed int32 [N1], stats) with stats a dict
    of scalars: num_expands, num_collapses (actions; a superblock edit counts once; forced
    collapses and fills included), num_forced_collapses, num_fills, blocks_changed, entries_before,
    entries_after (int32), swap_rate = (num_expands + num_collapses) / complete blocks
    (N1 in training) and
    token_budget_utilization = entries_after / W_max (f32).
    """
    lod = jnp.asarray(block_lod).astype(jnp.int8)
    n1, k = lod.shape[0], params.k
    length = jnp.asarray(n1 * k if length is None else length, jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    us = span_scores(unit_scores(wc, scores, n1, k), lod, params.span_blocks, -(-params.sink_tokens // k),
                     params.span_back, tail_blocks(n1, params, length))
    zero = jnp.zeros((), jnp.int32)
    state = _State(lod, length, jnp.zeros(n1, bool), jnp.asarray(last_changed, jnp.int32), zero, zero, zero, zero)
    # unrolled: a handful of rounds, and no device loop whose condition the host must read
    state = jax.lax.fori_loop(0, params.iterations, lambda i, s: _round(i, s, us, step, key, params), state, unroll=True)
    if params.fill_units:
        free = free_blocks(state.last_changed, state.changed, step, params, state.length)
        expandable, _ = eligible_units(state.lod, free, params)
        noise = _ranking_noise(jax.random.fold_in(key, params.iterations), us.expand.shape[0], params)
        state = _fill(state, us, expandable, noise, step, params)
    before, after = entries(lod, k, length), entries(state.lod, k, length)
    stats = {
        "num_expands": state.num_expands,
        "num_collapses": state.num_collapses,
        "num_forced_collapses": state.num_forced,
        "num_fills": state.num_fills,
        "blocks_changed": _count(state.changed),
        "entries_before": before,
        "entries_after": after,
        "swap_rate": (state.num_expands + state.num_collapses).astype(jnp.float32) / jnp.maximum(length // k, 1),
        "token_budget_utilization": after.astype(jnp.float32) / params.w_max,
    }
    return state.lod, state.last_changed, stats


def exchange(
    block_lod: jnp.ndarray,
    wc: WorkingContext,
    scores: jnp.ndarray,
    last_changed: jnp.ndarray,
    step: jnp.ndarray,
    params: AllocatorParams,
    room: jnp.ndarray,
    length=None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Superblocks traded for expansions, before a refocus that expands (the runtime's ingest
    with `runtime.ingest_exchange`). A superblock of K gists collapsed to one LOD2 gist frees
    K − 1 entries, exactly what expanding one block costs. Rank the free LOD1 blocks by their
    expand score (spans included, as `refocus` ranks them; ties toward the most recent), best
    first: the best e can all be expanded when e ≤ ⌊room / (K − 1)⌋ + c(e), with c(e) the
    collapsible superblocks (complete, all K blocks free gists) that hold none of those e.
    For the largest such e (at most what one refocus expands: the fill's units plus R per
    round), collapse as many of those untouched superblocks as it needs beyond the room, the
    lowest-scored first (−mean of their gists, as `_collapse` ranks them; ties: the oldest),
    and mark their blocks changed at `step` — a refocus with `cooldown_steps` ≥ 1 then keeps
    them at LOD2 and spends their room on the best-ranked blocks.

    block_lod, wc, scores, last_changed, step, length as for `refocus` (`params` only its k,
    max_lod, masks, spans, fill_units, max_replacements and iterations are read); room
    int32 []: the entries the refocus may still fill (negative when over).
    -> (block_lod int8 [N1], last_changed int32 [N1], superblocks collapsed int32 [])."""
    lod = jnp.asarray(block_lod).astype(jnp.int8)
    n1, k = lod.shape[0], params.k
    n2 = n1 // k
    length = jnp.asarray(n1 * k if length is None else length, jnp.int32)
    last_changed = jnp.asarray(last_changed, jnp.int32)
    if n2 == 0 or k < 2:  # no superblock to trade (max_lod 1: none is collapsible, below)
        return lod, last_changed, jnp.zeros((), jnp.int32)
    us = span_scores(unit_scores(wc, scores, n1, k), lod, params.span_blocks, -(-params.sink_tokens // k),
                     params.span_back, tail_blocks(n1, params, length))
    free = free_blocks(last_changed, jnp.zeros(n1, bool), step, params, length)
    expandable, collapsible = eligible_units(lod, free, params)
    cand, sup_ok = expandable[:n1], collapsible[n1:]
    blocks = jnp.arange(n1)
    _, _, order = jax.lax.sort((-jnp.where(cand, us.expand[:n1], -jnp.inf), -blocks, blocks), num_keys=2)
    rank = jnp.zeros(n1, jnp.int32).at[order].set(blocks.astype(jnp.int32))
    sup_of = jnp.where(blocks < n2 * k, blocks // k, n2)  # a trailing partial superblock: none
    first = jnp.full(n2 + 1, n1, jnp.int32).at[sup_of].min(jnp.where(cand, rank, n1))[:n2]  # its best-ranked candidate
    touched = jnp.zeros(n1 + 1, jnp.int32).at[jnp.where(sup_ok, first, n1)].add(1)
    avail = _count(sup_ok) - jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(touched[:n1])])  # c(e), e = 0..N1
    e = jnp.arange(n1 + 1)
    per = jnp.floor_divide(jnp.asarray(room, jnp.int32), k - 1)
    most = _count(cand)
    if params.fill_units:
        most = jnp.minimum(most, params.fill_units + params.iterations * params.max_replacements)
    best = jnp.max(jnp.where((e <= per + avail) & (e <= most), e, 0))
    need = jnp.clip(best - per, 0, avail[best])
    spare = sup_ok & (first >= best)  # superblocks holding none of the best `best` blocks
    sups = jnp.arange(n2)
    _, _, by = jax.lax.sort((-jnp.where(spare, us.collapse[n1:], -jnp.inf), sups, sups), num_keys=2)
    pick = jnp.zeros(n2, bool).at[by].set(spare[by] & (sups < need))
    hit = jnp.concatenate([pick, jnp.zeros(1, bool)])[sup_of]
    return (jnp.where(hit, 2, lod).astype(jnp.int8), jnp.where(hit, jnp.asarray(step, jnp.int32), last_changed),
            _count(pick))


def never_changed(num_blocks: int) -> jnp.ndarray:
    """int32 [N1] of `NEVER`: the `last_changed` of a fresh sequence (nothing in cooldown)."""
    return jnp.full((num_blocks,), NEVER, jnp.int32)


def residency(last_changed: jnp.ndarray, step: jnp.ndarray) -> jnp.ndarray:
    """int32 [..., N1]: steps each block has stayed at its level as of `step`.

    `step − last_changed`; a never-changed block (`NEVER`, or any negative value) counts
    from step 0, so its residency is `step` — the steps since the sequence started.
    """
    return (jnp.asarray(step, jnp.int32) - jnp.maximum(last_changed, 0)).astype(jnp.int32)
