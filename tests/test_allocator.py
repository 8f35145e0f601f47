"""Focus allocator: invariants over thousands of random layouts, and small exact examples.

Every check recomputes what it needs from the before/after layouts with plain numpy (a
left-to-right walk of the layout for the per-block scores), never from the allocator's
own intermediate arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.config import config_from_dict
from mcjax.megacontext.allocator import (
    NEVER,
    AllocatorParams,
    exchange,
    never_changed,
    refocus,
    residency,
)
from mcjax.megacontext.layout import assemble, check_layout, entry_count, render

K, N1 = 4, 32  # T = 128 tokens, N2 = 8 superblocks
T, N2 = K * N1, N1 // K
CAP = T  # the WC capacity W: holds every valid layout, so scores are always aligned
STEP = 100
# Tests at N1 = 32 use max_replacements, iterations ∈ {1, 3} (static: each pair compiles once).
EPS = 1e-5  # float slack when re-checking thresholds against a float64 reference

REFOCUS = jax.jit(refocus)


def _assembler(n1: int):
    t = K * n1
    zeros = (jnp.zeros((t, 1)), jnp.zeros((n1, 1)), jnp.zeros((max(n1 // K, 1), 1)))
    return jax.jit(lambda lod: assemble(lod, *zeros, t))


ASSEMBLE = _assembler(N1)


def run(lod, scores, params, *, last=None, step=STEP, key=0, assembler=ASSEMBLE):
    lod = np.asarray(lod, np.int8)
    last = never_changed(lod.shape[0]) if last is None else jnp.asarray(last, jnp.int32)
    wc = assembler(jnp.asarray(lod))
    out = REFOCUS(jnp.asarray(lod), wc, jnp.asarray(scores, jnp.float32), last, jnp.int32(step),
                  jax.random.key(key), params)
    new, new_last, stats = jax.device_get(out)
    return np.asarray(new), np.asarray(new_last), {k: v.item() for k, v in stats.items()}


# ----------------------------------------------------------------------------- reference


def reference_scores(lod, scores, k=K):
    """Walk the layout consuming entry scores: (gist [N1], token mean [N1], LOD2 gist [N2])."""
    n1 = len(lod)
    gist, mean0, top = np.zeros(n1), np.zeros(n1), np.zeros(n1 // k)
    j = b = 0
    while b < n1:
        if lod[b] == 0:
            mean0[b] = np.mean(scores[j : j + k], dtype=np.float64)
            j, b = j + k, b + 1
        elif lod[b] == 1:
            gist[b] = scores[j]
            j, b = j + 1, b + 1
        else:
            top[b // k] = scores[j]
            j, b = j + 1, b + k
    return gist, mean0, top


def actions(old, new, k=K):
    """Decompose a layout change into edits; AssertionError if it is not a set of legal edits.

    Returns bool masks (block expand [N1], block collapse [N1], super expand [N2],
    super collapse [N2]).
    """
    n2 = len(old) // k
    blk_exp, blk_col = (old == 1) & (new == 0), (old == 0) & (new == 1)
    so, sn = old[: n2 * k].reshape(n2, k), new[: n2 * k].reshape(n2, k)
    sup_exp = (so == 2).all(1) & (sn == 1).all(1)
    sup_col = (so == 1).all(1) & (sn == 2).all(1)
    explained = blk_exp | blk_col
    explained[: n2 * k] |= np.repeat(sup_exp | sup_col, k)
    assert ((new != old) == explained).all(), f"illegal change {render(old)} -> {render(new)}"
    return blk_exp, blk_col, sup_exp, sup_col


def reference_span(lod, gist, mean0, span, head_blocks, back=0, tail_blocks=0):
    """span_scores by a loop: a LOD1/LOD0 block's score is the best of its own and those of the
    span − 1 blocks before it and the `back` blocks after it at LOD0/LOD1 outside the head (and,
    after it, outside the last `tail_blocks`) (gist [N1], token mean [N1])."""
    own = np.where(lod == 1, gist, np.where(lod == 0, mean0, -np.inf))
    best = own.copy()
    n1 = len(lod)
    for b in range(n1):
        for j in range(1, span):
            if b - j >= head_blocks:
                best[b] = max(best[b], own[b - j])
        for j in range(1, back + 1):
            if head_blocks <= b + j < n1 - tail_blocks:
                best[b] = max(best[b], own[b + j])
    return np.where(lod == 1, best, gist), np.where(lod == 0, best, mean0)


# ----------------------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    max_lod = draw(st.sampled_from([1, 2]))
    recent = draw(st.integers(0, 6 * K))
    tail = -(-recent // K)
    p2 = draw(st.sampled_from([0.0, 0.25, 0.5])) if max_lod == 2 else 0.0
    p1 = draw(st.sampled_from([0.2, 0.5, 0.9]))
    lod = np.zeros(N1, np.int8)
    for s in range(N2):
        blocks = slice(s * K, (s + 1) * K)
        lod[blocks] = 2 if rng.random() < p2 else (rng.random(K) < p1)
        if s * K + K > N1 - tail and lod[s * K] == 2:
            lod[blocks] = 1  # a LOD2 superblock may not reach into the tail
    lod[N1 - tail :] = 0
    sink = draw(st.sampled_from([0, 0, K, 2 * K]))  # the protected head
    if sink and (lod[:K] == 2).any():
        lod[:K] = 1  # a LOD2 superblock may not hold the head
    lod[: sink // K] = 0
    scores = rng.uniform(-1, 1, CAP).astype(np.float32)
    if draw(st.booleans()):
        scores = np.round(scores * 2) / 2  # ties
    last = np.where(rng.random(N1) < 0.5, NEVER, STEP - rng.integers(1, 6, N1)).astype(np.int32)
    params = AllocatorParams(
        k=K,
        w_max=int(np.clip(entry_count(lod, K) + draw(st.integers(-24, 40)), tail * K + 1, T)),
        recent_tokens=recent,
        sink_tokens=sink,
        max_lod=max_lod,
        max_replacements=draw(st.sampled_from([1, 3])),  # few static combos: few compiles
        expand_threshold=draw(st.sampled_from([0.0, 0.1, 0.4, 0.8])),
        collapse_threshold=draw(st.sampled_from([0.0, 0.1, 0.4, 0.8])),
        cooldown_steps=draw(st.integers(0, 4)),
        iterations=draw(st.sampled_from([1, 3])),
        policy=draw(st.sampled_from(["greedy", "stochastic"])),
        temperature=draw(st.floats(0.05, 2.0)),
        **dict(zip(("span_blocks", "span_back"), draw(st.sampled_from([(1, 0), (2, 0), (2, 1)])))),
    )
    return lod, scores, last, params, seed


@settings(max_examples=1500, deadline=None)
@given(cases())
def test_refocus_invariants(case):
    old, scores, last, p, seed = case
    check_layout(old, K, recent_tokens=p.recent_tokens, sink_tokens=p.sink_tokens)
    new, new_last, stats = run(old, scores, p, last=last, key=seed % 1000)
    before, after = entry_count(old, K), entry_count(new, K)
    fits = before <= p.w_max

    # a valid layout; within budget whenever the input was; never growing otherwise
    check_layout(new, K, capacity=p.w_max if fits else None, recent_tokens=p.recent_tokens, sink_tokens=p.sink_tokens)
    if p.max_lod == 1:
        assert not (new == 2).any()
    if not fits:
        assert after <= before
    # coverage: the assembled WC tiles [0, T) with no gap and no overlap
    wc = jax.device_get(ASSEMBLE(jnp.asarray(new)))
    n = int(wc.valid.sum())
    assert n == after and wc.pos[0] == 0 and (wc.pos[1:n] == (wc.pos + wc.span)[: n - 1]).all()
    assert wc.pos[n - 1] + wc.span[n - 1] == T

    # frozen blocks: the tail and blocks in cooldown
    tail = -(-p.recent_tokens // K)
    frozen = (np.arange(N1) >= N1 - tail) | (np.arange(N1) < p.sink_tokens // K) | (STEP - last < p.cooldown_steps)
    assert (new[frozen] == old[frozen]).all()
    # last_changed is stamped exactly on the changed blocks
    changed = new != old
    assert (new_last == np.where(changed, STEP, last)).all()

    # legal edits only, and the stats agree with them
    blk_exp, blk_col, sup_exp, sup_col = actions(old, new)
    n_exp, n_col = int(blk_exp.sum() + sup_exp.sum()), int(blk_col.sum() + sup_col.sum())
    assert stats["num_expands"] == n_exp and stats["num_collapses"] == n_col
    assert stats["blocks_changed"] == changed.sum()
    assert stats["entries_before"] == before and stats["entries_after"] == after
    assert np.isclose(stats["swap_rate"], (n_exp + n_col) / N1)
    assert np.isclose(stats["token_budget_utilization"], after / p.w_max)
    forced = stats["num_forced_collapses"]
    assert n_exp <= p.max_replacements * p.iterations
    assert n_col - forced <= p.max_replacements * p.iterations

    # thresholds: every expand passes; every collapse does unless it was forced
    gist, mean0, top = reference_scores(old, scores)
    super_mean = gist.reshape(N2, K).mean(1)  # superblock units are never span-scored
    gist, mean0 = reference_span(old, gist, mean0, p.span_blocks, -(-p.sink_tokens // K), p.span_back, tail)
    assert (gist[blk_exp] >= p.expand_threshold - EPS).all()
    assert (top[sup_exp] >= p.expand_threshold - EPS).all()
    below = int((-mean0[blk_col] < p.collapse_threshold - EPS).sum())
    below += int((-super_mean[sup_col] < p.collapse_threshold - EPS).sum())
    if fits:
        assert forced == 0 and below == 0
    else:
        assert below <= forced
        if forced and p.iterations == 1:  # no more forced collapses than needed to fit
            assert before - (K - 1) * n_col > p.w_max - (K - 1)
        # every unit that could collapse (free, right level) would have been enough → fits
        free = ~frozen
        supers = ((old == 1) & free).reshape(N2, K).all(1).sum() if p.max_lod == 2 else 0
        candidates = int(((old == 0) & free).sum() + supers)
        if before - (K - 1) * candidates <= p.w_max:
            assert after <= p.w_max, (render(old), render(new), p)


# ----------------------------------------------------------------------------- exact examples

N1S = 8  # small examples: 8 blocks of 4 tokens, 2 superblocks
ASSEMBLE_S = _assembler(N1S)


def params(**kw) -> AllocatorParams:
    base = dict(k=K, w_max=K * N1S, recent_tokens=2 * K, max_replacements=3,
                expand_threshold=0.1, collapse_threshold=0.1, cooldown_steps=2, iterations=3)
    return AllocatorParams(**{**base, **kw})


def entry_scores(lod, per_block):
    """Entry scores f32 [T] for a layout: every entry of block b gets per_block[b]."""
    out = []
    b = 0
    while b < len(lod):
        out += [per_block[b]] * (K if lod[b] == 0 else 1)
        b += K if lod[b] == 2 else 1
    return np.array(out + [0.7] * (K * len(lod) - len(out)), np.float32)  # padding: ignored


def small(lod, per_block, p, **kw):
    return run(lod, entry_scores(lod, per_block), p, assembler=ASSEMBLE_S, **kw)


def test_expands_the_best_scoring_gist():
    lod = [1, 1, 1, 1, 1, 1, 0, 0]
    new, last, stats = small(lod, [0.05, 0.05, 0.9, 0.05, 0.05, 0.05, 0, 0], params())
    assert list(new) == [1, 1, 0, 1, 1, 1, 0, 0]
    assert list(last == STEP) == [False, False, True] + [False] * 5
    assert stats["num_expands"] == 1 and stats["num_collapses"] == 0
    assert stats["entries_before"] == 14 and stats["entries_after"] == 17
    assert np.isclose(stats["token_budget_utilization"], 17 / 32)


def test_budget_stops_the_second_of_two_expands():
    lod = [1, 1, 1, 1, 1, 1, 0, 0]  # 14 entries; each expand costs 3
    scores = [0.05, 0.05, 0.8, 0.05, 0.9, 0.05, 0, 0]
    new, _, stats = small(lod, scores, params(w_max=19))
    assert list(new) == [1, 1, 1, 1, 0, 1, 0, 0] and stats["entries_after"] == 17
    new, _, _ = small(lod, scores, params(w_max=20))
    assert list(new) == [1, 1, 0, 1, 0, 1, 0, 0]
    new, _, _ = small(lod, scores, params(w_max=20, max_replacements=1, iterations=1))
    assert list(new) == [1, 1, 1, 1, 0, 1, 0, 0]  # R = 1 per iteration
    new, _, _ = small(lod, scores, params(w_max=20, max_replacements=1, iterations=3))
    assert list(new) == [1, 1, 0, 1, 0, 1, 0, 0]  # a later iteration takes the next


def test_over_budget_collapses_the_lowest_scored_block_first():
    lod = [0] * 8  # 32 entries; the last block is the tail
    scores = [0.3, 0.4, 0.5, -0.2, 0.6, 0.1, 0.35, -0.9]
    p = params(w_max=29, recent_tokens=K, collapse_threshold=0.5)  # no unforced collapse
    new, _, stats = small(lod, scores, p)
    assert list(new) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert stats["num_collapses"] == stats["num_forced_collapses"] == 1
    assert stats["entries_after"] == 29
    new, _, _ = small(lod, scores, dataclasses.replace(p, w_max=26))
    assert list(new) == [0, 0, 0, 1, 0, 1, 0, 0]
    # block 3 in cooldown: the next lowest goes instead
    last = np.full(8, NEVER, np.int32)
    last[3] = STEP - 1
    new, _, _ = small(lod, scores, p, last=last)
    assert list(new) == [0, 0, 0, 0, 0, 1, 0, 0]
    # nothing may collapse: the layout stays as it is, over budget
    new, _, stats = small(lod, scores, p, last=np.full(8, STEP - 1, np.int32))
    assert list(new) == lod and stats["entries_after"] == 32


def test_unforced_collapse_then_expand_in_one_iteration():
    lod = [1, 1, 1, 1, 0, 1, 0, 0]  # 17 entries, budget 17: the expand needs the collapse
    scores = [0.05, 0.9, 0.05, 0.05, -0.6, 0.05, 0, 0]
    new, _, stats = small(lod, scores, params(w_max=17, iterations=1))
    assert list(new) == [1, 0, 1, 1, 1, 1, 0, 0]
    assert stats["num_collapses"] == 1 and stats["num_expands"] == 1
    assert stats["num_forced_collapses"] == 0


def test_superblock_expand_and_collapse():
    new, _, stats = small([2, 2, 2, 2, 1, 1, 0, 0], [0.9, 0, 0, 0, 0.05, 0.05, 0, 0], params())
    assert list(new) == [1, 1, 1, 1, 1, 1, 0, 0] and stats["num_expands"] == 1
    assert stats["blocks_changed"] == 4 and np.isclose(stats["swap_rate"], 1 / 8)
    lod = [1, 1, 1, 1, 1, 1, 0, 0]
    scores = [-0.8, -0.6, -0.9, -0.7, 0.05, 0.05, 0, 0]
    new, _, stats = small(lod, scores, params())
    assert list(new) == [2, 2, 2, 2, 1, 1, 0, 0] and stats["num_collapses"] == 1
    new, _, _ = small(lod, scores, params(max_lod=1))
    assert list(new) == lod


def test_a_superblock_is_not_collapsed_over_the_block_it_would_expand():
    # superblock 0: one wanted gist among three unwanted (mean −0.45: a collapse that passes τ)
    lod = [1, 1, 1, 1, 1, 1, 0, 0]  # 14 entries
    scores = [-0.9, 0.9, -0.9, -0.9, 0.05, 0.05, 0, 0]
    new, _, stats = small(lod, scores, params(w_max=17, max_replacements=1, iterations=1))
    assert list(new) == [1, 0, 1, 1, 1, 1, 0, 0]  # expanded, not buried in LOD2
    assert stats["num_collapses"] == 0 and stats["num_expands"] == 1
    # not wanted (below τ_expand): the superblock collapses as before
    low = [-0.9, 0.09, -0.9, -0.9, 0.05, 0.05, 0, 0]
    new, _, _ = small(lod, low, params(w_max=17, max_replacements=1, iterations=1))
    assert list(new) == [2, 2, 2, 2, 1, 1, 0, 0]
    # over budget with nothing else to collapse: the guarded superblock is forced all the same
    new, _, stats = small(lod, scores, params(w_max=11, max_replacements=1, iterations=1))
    assert list(new) == [2, 2, 2, 2, 1, 1, 0, 0] and stats["num_forced_collapses"] == 1


def test_span_blocks_expand_and_keep_a_block_with_the_one_before_it():
    lod = [1, 1, 1, 1, 1, 1, 0, 0]
    scores = [0.05, 0.05, 0.9, -0.5, 0.05, 0.05, 0, 0]
    new, _, _ = small(lod, scores, params(expand_threshold=0.5))
    assert list(new) == [1, 1, 0, 1, 1, 1, 0, 0]
    new, _, stats = small(lod, scores, params(expand_threshold=0.5, span_blocks=2))
    assert list(new) == [1, 1, 0, 0, 1, 1, 0, 0] and stats["num_expands"] == 2  # block 3 takes block 2's 0.9
    # over budget: a raw block after a well-kept one is kept too
    lod = [0] * 8
    scores = [0.3, 0.4, 0.5, -0.2, 0.6, 0.1, 0.35, -0.9]
    p = params(w_max=29, recent_tokens=K, collapse_threshold=0.5)
    assert list(small(lod, scores, p)[0]) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert list(small(lod, scores, dataclasses.replace(p, span_blocks=2))[0]) == [1, 0, 0, 0, 0, 0, 0, 0]
    # the protected head lends no score: block 1 stands alone and is the lowest
    scores = [0.9, 0.3, 0.5, -0.2, 0.6, 0.1, 0.45, -0.9]
    p = dataclasses.replace(p, span_blocks=2)
    assert list(small(lod, scores, p)[0]) == [0, 0, 0, 0, 0, 0, 1, 0]
    assert list(small(lod, scores, dataclasses.replace(p, sink_tokens=K))[0]) == [0, 1, 0, 0, 0, 0, 0, 0]
    # a gist after a raw block takes its token mean: block 1 (gist −0.5) follows block 0 (raw, 0.8)
    lod = [0, 1, 1, 1, 1, 1, 0, 0]
    scores = [0.8, -0.5, 0.05, 0.05, 0.05, 0.05, 0, 0]
    assert list(small(lod, scores, params(expand_threshold=0.5, span_blocks=2))[0]) == [0, 0, 1, 1, 1, 1, 0, 0]


def test_span_back_expands_a_block_with_the_one_after_it_but_not_before_the_tail():
    lod = [1, 1, 1, 1, 1, 1, 0, 0]  # the last two blocks: the tail (recent_tokens 2K)
    scores = [0.05, 0.05, -0.5, 0.9, 0.05, 0.05, 0, 0]
    new, _, _ = small(lod, scores, params(expand_threshold=0.5, span_blocks=2))
    assert list(new) == [1, 1, 1, 0, 0, 1, 0, 0]  # forward only: block 2 (−0.5) stays a gist
    new, _, stats = small(lod, scores, params(expand_threshold=0.5, span_back=1))
    assert list(new) == [1, 1, 0, 0, 1, 1, 0, 0] and stats["num_expands"] == 2  # block 2 takes block 3's 0.9
    new, _, _ = small(lod, scores, params(expand_threshold=0.5, span_blocks=2, span_back=1))
    assert list(new) == [1, 1, 0, 0, 0, 1, 0, 0]
    # the tail lends nothing backwards: its raw blocks' 0.9 leaves block 5 a gist
    tail_high = [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.9, 0.9]
    assert list(small(lod, tail_high, params(expand_threshold=0.5, span_back=1))[0]) == lod


def test_changed_blocks_are_frozen_for_the_rest_of_the_refocus():
    # block 0 collapses in iteration 1; its (now all-LOD1) superblock may not follow
    lod = [0, 1, 1, 1, 1, 1, 0, 0]
    scores = [-0.9, -0.9, -0.9, -0.9, 0.0, 0.0, 0, 0]
    new, _, stats = small(lod, scores, params(iterations=3))
    assert list(new) == [1, 1, 1, 1, 1, 1, 0, 0] and stats["num_collapses"] == 1


def random_case(seed, n1=N1):
    rng = np.random.default_rng(seed)
    lod = (rng.random(n1) < 0.6).astype(np.int8)
    lod[:K] = 2 if seed % 2 else 1
    lod[-2:] = 0
    return lod, rng.uniform(-1, 1, K * n1).astype(np.float32)


def test_stochastic_with_tiny_temperature_equals_greedy():
    for seed in range(5):
        lod, scores = random_case(seed)
        p = AllocatorParams(k=K, w_max=70, recent_tokens=2 * K, max_replacements=3, iterations=3)
        greedy = run(lod, scores, p)
        tiny = run(lod, scores, dataclasses.replace(p, policy="stochastic", temperature=1e-7), key=seed)
        assert (greedy[0] == tiny[0]).all() and greedy[2] == tiny[2]


def test_stochastic_is_deterministic_per_key_and_varies_across_keys():
    lod = np.ones(N1, np.int8)
    lod[-2:] = 0
    scores = np.full(CAP, 0.5, np.float32)  # all gists tie: the noise decides
    p = AllocatorParams(k=K, w_max=T, recent_tokens=2 * K, max_replacements=1, iterations=1,
                        policy="stochastic", temperature=1.0)
    picks = [int(np.flatnonzero(run(lod, scores, p, key=key)[0] != lod)[0]) for key in range(12)]
    assert picks[3] == int(np.flatnonzero(run(lod, scores, p, key=3)[0] != lod)[0])
    assert len(set(picks)) > 1
    greedy = run(lod, scores, dataclasses.replace(p, policy="greedy"), key=5)[0]
    assert (greedy == run(lod, scores, dataclasses.replace(p, policy="greedy"), key=6)[0]).all()


def test_vmap_over_a_batch_matches_one_at_a_time():
    p = AllocatorParams(k=K, w_max=80, recent_tokens=2 * K, max_replacements=3, iterations=3)
    cases_ = [random_case(s) for s in range(3)]
    lods = jnp.asarray(np.stack([c[0] for c in cases_]))
    scores = jnp.asarray(np.stack([c[1] for c in cases_]))
    wcs = jax.vmap(ASSEMBLE)(lods)
    last = jnp.tile(never_changed(N1), (3, 1))
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(refocus, in_axes=(0, 0, 0, 0, None, 0, None)))
    new, _, stats = batched(lods, wcs, scores, last, jnp.int32(STEP), keys, p)
    for i, (lod, sc) in enumerate(cases_):
        one, _, st1 = run(lod, sc, p)
        assert (np.asarray(new[i]) == one).all() and int(stats["num_expands"][i]) == st1["num_expands"]


def test_params_as_a_static_argument():
    lod, scores = random_case(7)
    p = AllocatorParams(k=K, w_max=70, recent_tokens=2 * K, max_replacements=3, iterations=3)
    static = jax.jit(refocus, static_argnames="params")
    out = static(jnp.asarray(lod), ASSEMBLE(jnp.asarray(lod)), jnp.asarray(scores), never_changed(N1),
                 jnp.int32(STEP), jax.random.key(0), params=p)
    assert (np.asarray(out[0]) == run(lod, scores, p)[0]).all()


def test_residency():
    last = jnp.array([NEVER, 0, 3, 9], jnp.int32)
    assert list(np.asarray(residency(last, jnp.int32(10)))) == [10, 10, 7, 1]
    assert (np.asarray(residency(never_changed(5), 4)) == 4).all()


def test_params_from_config(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, allocator={"policy": "stochastic", "iterations": 3}))
    p = AllocatorParams.from_config(cfg)
    assert p.k == cfg.dataset.block_size and p.w_max == cfg.wc_capacity
    assert p.recent_tokens == cfg.megacontext.recent_tokens and p.max_lod == cfg.megacontext.max_lod
    assert p.policy == "stochastic" and p.iterations == 3
    assert p.expand_threshold == cfg.allocator.expand_threshold


# ----------------------------------------------------------------------------- the fill


def test_fill_with_equal_scores_is_recency():
    """A LensNet with nothing to say (every score equal) fills the budget with the most recent
    gists, below the thresholds: the fill degrades to recency, never below it."""
    lod = [1, 1, 1, 1, 1, 1, 0, 0]  # 14 entries
    p = params(w_max=20, expand_threshold=0.5, fill_units=4)
    new, last, stats = small(lod, [0.0] * 8, p)
    assert list(new) == [1, 1, 1, 1, 0, 0, 0, 0]  # 20 entries: two fills, the newest gists
    assert stats["num_fills"] == 2 and stats["num_expands"] == 2 and stats["entries_after"] == 20
    assert list(last == STEP) == [False] * 4 + [True, True, False, False]
    # no fill: the thresholds keep the layout as it was
    assert list(small(lod, [0.0] * 8, params(w_max=20, expand_threshold=0.5))[0]) == lod


def test_fill_takes_the_best_scored_units_first_within_its_limits():
    lod = [2, 2, 2, 2, 1, 1, 0, 0]  # 11 entries: one LOD2 gist, two LOD1, the raw tail (8)
    per_block = [-0.5, 0, 0, 0, -0.9, -0.2, 0, 0]  # all below the threshold: block 5, the superblock, block 4
    p = params(w_max=32, expand_threshold=0.5, fill_units=4, iterations=1)
    new, _, stats = small(lod, per_block, p)
    assert list(new) == [1, 1, 1, 1, 0, 0, 0, 0] and stats["num_fills"] == 3  # 11 + 3·3 = 20 entries
    new, _, stats = small(lod, per_block, dataclasses.replace(p, fill_units=2))
    assert list(new) == [1, 1, 1, 1, 1, 0, 0, 0] and stats["num_fills"] == 2  # at most fill_units
    new, _, _ = small(lod, per_block, dataclasses.replace(p, fill_to=16))
    assert list(new) == [2, 2, 2, 2, 1, 0, 0, 0]  # a second fill would pass fill_to = 16 (17 entries)
    new, _, _ = small(lod, per_block, dataclasses.replace(p, w_max=15))
    assert list(new) == [2, 2, 2, 2, 1, 0, 0, 0]  # and never past W_max
    last = np.full(8, NEVER, np.int32)
    last[:4] = STEP - 1  # the superblock in cooldown: the gists are filled instead
    new, _, _ = small(lod, per_block, p, last=last)
    assert list(new) == [2, 2, 2, 2, 0, 0, 0, 0]


@st.composite
def fill_cases(draw):
    lod, scores, last, p, seed = draw(cases())
    p = dataclasses.replace(p, fill_units=draw(st.sampled_from([2, 40])), fill_to=draw(st.integers(0, T)),
                            max_replacements=1, iterations=1)
    return lod, scores, last, p, seed


@settings(max_examples=300, deadline=None)
@given(fill_cases())
def test_fill_uses_the_budget(case):
    """Whatever the layout, scores and settings: the result is valid and within budget when
    the input was; and unless the fill ran out of units (fill_units) or of free gists, it
    holds at least min(fill_to, W_max) − (K − 1) entries."""
    old, scores, last, p, seed = case
    new, new_last, stats = run(old, scores, p, last=last, key=seed % 1000)
    before, after = entry_count(old, K), entry_count(new, K)
    check_layout(new, K, capacity=p.w_max if before <= p.w_max else None, recent_tokens=p.recent_tokens)
    assert stats["num_fills"] <= p.fill_units and stats["entries_after"] == after
    actions(old, new)
    limit = min(p.fill_to, p.w_max)
    if before <= limit and stats["num_fills"] < p.fill_units and after < limit - (K - 1):
        # then no unit was left to expand: every gist is in the tail, in cooldown or changed now
        tail = -(-p.recent_tokens // K)
        free = (np.arange(N1) < N1 - tail) & (STEP - last >= p.cooldown_steps) & (new == old)
        supers = ((new == 2) & free)[: N2 * K].reshape(N2, K).all(1)
        assert not ((new == 1) & free).any() and not supers.any(), (render(old), render(new), p)


# ----------------------------------------------------------------------------- the exchange

EXCHANGE = jax.jit(exchange)


def exchanged(lod, scores, p, room, *, last=None, assembler=ASSEMBLE):
    lod = np.asarray(lod, np.int8)
    last = never_changed(lod.shape[0]) if last is None else jnp.asarray(last, jnp.int32)
    out = EXCHANGE(jnp.asarray(lod), assembler(jnp.asarray(lod)), jnp.asarray(scores, jnp.float32), last,
                   jnp.int32(STEP), p, jnp.int32(room))
    new, new_last, n = jax.device_get(out)
    return np.asarray(new), np.asarray(new_last), int(n)


def reference_exchange(lod, scores, last, p, room):
    """allocator.exchange by a loop: (how many block expansions it pays for, the superblocks
    it may collapse for them, how many it must)."""
    n1, n2 = len(lod), len(lod) // K
    gist, mean0, _ = reference_scores(lod, scores)
    super_mean = gist[: n2 * K].reshape(n2, K).mean(1)
    tail, head = -(-p.recent_tokens // K), -(-p.sink_tokens // K)
    spanned, _ = reference_span(lod, gist, mean0, p.span_blocks, head, p.span_back, tail)
    b = np.arange(n1)
    free = (b < n1 - tail) & (b >= head) & (STEP - np.asarray(last) >= p.cooldown_steps)
    ranked = sorted(np.flatnonzero((lod == 1) & free), key=lambda i: (-spanned[i], -i))
    ok = [p.max_lod >= 2 and bool(((lod == 1) & free)[s * K : (s + 1) * K].all()) for s in range(n2)]
    per = room // (K - 1)
    most = len(ranked) if not p.fill_units else min(len(ranked), p.fill_units + p.iterations * p.max_replacements)

    def spare(e):
        touched = {i // K for i in ranked[:e]}
        return [s for s in range(n2) if ok[s] and s not in touched]

    best = next((e for e in range(most, -1, -1) if e <= per + len(spare(e))), 0)
    return best, spare(best), int(np.clip(best - per, 0, len(spare(best)))), super_mean


@st.composite
def exchange_cases(draw):
    lod, scores, last, p, seed = draw(cases())
    p = dataclasses.replace(p, fill_units=draw(st.sampled_from([0, 2])))
    return lod, scores, last, p, draw(st.integers(-40, 60))


@settings(max_examples=400, deadline=None)
@given(exchange_cases())
def test_exchange_equals_a_reference_loop(case):
    """Whatever the layout, scores, masks and room: the exchange collapses exactly as many
    superblocks as the reference's best affordable expansions need beyond the room, each one
    holding none of those blocks, the lowest-scored first; nothing else changes."""
    old, scores, last, p, room = case
    new, new_last, n = exchanged(old, scores, p, room, last=last)
    best, spare, need, super_mean = reference_exchange(old, scores, last, p, room)
    blk_exp, blk_col, sup_exp, sup_col = actions(old, new)
    assert not (blk_exp.any() or blk_col.any() or sup_exp.any())  # superblock collapses only
    picked = np.flatnonzero(sup_col)
    assert n == len(picked) == need, (render(old), room, best, need)
    assert set(picked) <= set(spare)
    rest = [s for s in spare if s not in set(picked)]
    if len(picked) and rest:  # the lowest-scored first
        assert super_mean[picked].max() <= super_mean[rest].min() + EPS
    assert (new_last == np.where(new != old, STEP, last)).all()
    assert entry_count(new, K) == entry_count(old, K) - (K - 1) * need


def test_exchange_trades_superblocks_for_the_best_blocks():
    """16 blocks of 4 (4 superblocks; the last holds the 2-block tail), all gists: 22 entries.
    Blocks 1, 9 and 6 score best. Room for one expansion (3 entries): expanding the best two
    takes one collapse, and only superblock 1 holds neither — so block 6 is given up; the
    refocus that follows (cooldown 1: the collapse stays) expands blocks 1 and 9."""
    lod = [1] * 14 + [0, 0]
    per_block = [-0.5] * 16
    per_block[1], per_block[9], per_block[6] = 0.9, 0.8, 0.7
    assembler = _assembler(16)
    p = params(w_max=25, cooldown_steps=1, iterations=1, fill_units=4, expand_threshold=0.95, collapse_threshold=2.0)
    scores = entry_scores(lod, per_block)
    scores = np.concatenate([scores, np.zeros(K * 16 - len(scores), np.float32)])
    new, last, n = exchanged(lod, scores, p, room=3, assembler=assembler)
    assert render(new) == render(np.array([1] * 4 + [2] * 4 + [1] * 6 + [0, 0])) and n == 1
    # the refocus reads the scores of the WC they were given for (the layout before the exchange)
    out, _, stats = jax.device_get(REFOCUS(jnp.asarray(new), assembler(jnp.asarray(lod, jnp.int8)), jnp.asarray(scores),
                                           jnp.asarray(last), jnp.int32(STEP), jax.random.key(0), p))
    assert out.tolist() == [1, 0, 1, 1, 2, 2, 2, 2, 1, 0, 1, 1, 1, 1, 0, 0] and stats["entries_after"] == 25
    # room for both: no collapse; room for none and a superblock short: the best one alone
    assert exchanged(lod, scores, p, room=6, assembler=assembler)[2] == 0
    new, _, n = exchanged(lod, scores, p, room=-1, assembler=assembler)
    assert n == 2 and (new[4:8] == 2).all() and (new[8:12] == 2).all()  # block 1 kept, 9 given up
    assert exchanged(lod, scores, params(max_lod=1), room=3, assembler=assembler)[2] == 0
