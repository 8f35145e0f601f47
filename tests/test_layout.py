"""Working-context layouts: assembly against a plain-Python reference, invariants, builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.megacontext.layout import (
    all_lod0,
    assemble,
    block_entry_counts,
    prefix_sum,
    check_layout,
    entry_count,
    recency_baseline,
    render,
    rope_positions,
)

K, N1, D = 4, 32, 3  # T = 128 tokens, N2 = 8 superblocks of 16 tokens
T, N2 = K * N1, N1 // K
CAP = T  # no valid layout has more entries than tokens

rng = np.random.default_rng(0)
LOD0 = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
LOD1 = jnp.asarray(rng.normal(size=(N1, D)), jnp.float32)
LOD2 = jnp.asarray(rng.normal(size=(N2, D)), jnp.float32)
ASSEMBLE = jax.jit(lambda lod: assemble(lod, LOD0, LOD1, LOD2, CAP))
ASSEMBLY_GRAD = jax.jit(jax.grad(
    lambda l0, l1, l2, lay, g: (jax.vmap(lambda l: assemble(l, l0, l1, l2, CAP))(lay).emb * g).sum(), argnums=(0, 1, 2)
))


def reference(block_lod) -> list[tuple[int, int, int, np.ndarray]]:
    """The slow, obvious assembly: walk the blocks left to right. [(lod, pos, span, emb)]."""
    out, b = [], 0
    while b < N1:
        lod = int(block_lod[b])
        if lod == 0:
            out += [(0, b * K + o, 1, np.asarray(LOD0[b * K + o])) for o in range(K)]
            b += 1
        elif lod == 1:
            out.append((1, b * K, K, np.asarray(LOD1[b])))
            b += 1
        else:
            out.append((2, b * K, K * K, np.asarray(LOD2[b // K])))
            b += K
    return out


@st.composite
def layouts(draw):
    lod = np.zeros(N1, np.int8)
    for s in range(N2):
        if draw(st.booleans()) and draw(st.booleans()):
            lod[s * K : (s + 1) * K] = 2
        else:
            lod[s * K : (s + 1) * K] = draw(st.lists(st.integers(0, 1), min_size=K, max_size=K))
    return lod


@settings(max_examples=1000, deadline=None)
@given(layouts())
def test_assembly_equals_reference_and_covers_the_sequence(lod):
    check_layout(lod, K, capacity=CAP)
    wc = jax.device_get(ASSEMBLE(jnp.asarray(lod)))
    ref = reference(lod)
    n = len(ref)
    assert n == entry_count(lod, K) and wc.valid.sum() == n and wc.valid[:n].all()
    assert [int(x) for x in wc.lod[:n]] == [r[0] for r in ref]
    assert [int(x) for x in wc.pos[:n]] == [r[1] for r in ref]
    assert [int(x) for x in wc.span[:n]] == [r[2] for r in ref]
    np.testing.assert_array_equal(wc.emb[:n], np.stack([r[3] for r in ref]))
    # full coverage, no overlap, increasing positions
    ends = wc.pos[:n] + wc.span[:n]
    assert wc.pos[0] == 0 and ends[-1] == T and (wc.pos[1:n] == ends[: n - 1]).all()
    # targets: the first token after the span, never inside it; masked past the end
    assert (wc.target[:n] == ends).all() and (wc.target[:n] >= wc.pos[:n] + wc.span[:n]).all()
    assert (wc.target_valid[:n] == (ends < T)).all()
    # padding is inert
    assert not wc.valid[n:].any() and not wc.target_valid[n:].any() and (wc.emb[n:] == 0).all()


@settings(max_examples=300, deadline=None)
@given(layouts(), st.integers(1, T))
def test_assembly_of_a_growing_history(lod, length):
    """With `length` tokens present (the runtime engine), the WC covers exactly [0, length):
    complete blocks as the layout says, the partly filled last block and every block past it
    raw (the engine keeps them LOD0), targets past `length` invalid; and the token-id path
    (`embed`) equals the table path."""
    lod = lod.copy()
    lod[length // K :] = 0  # the tail and absent blocks are never compressed
    for s in range(0, N1, K):  # a LOD2 superblock must lie within the complete blocks
        if (lod[s : s + K] == 2).any() and s + K > length // K:
            lod[s : s + K] = 0
    ref = [r for r in reference(lod) if r[1] < length]
    wc = jax.device_get(ASSEMBLE_GROWING(jnp.asarray(lod), jnp.int32(length)))
    n = len(ref)
    assert wc.valid.sum() == n and [int(x) for x in wc.pos[:n]] == [r[1] for r in ref]
    assert [int(x) for x in wc.span[:n]] == [r[2] for r in ref] and wc.pos[n - 1] + wc.span[n - 1] == length
    assert (wc.target_valid[:n] == (wc.pos[:n] + wc.span[:n] < length)).all()
    np.testing.assert_array_equal(wc.emb[:n], np.stack([r[3] for r in ref]))
    assert np.asarray(block_entry_counts(jnp.asarray(lod), K, jnp.int32(length))).sum() == n
    ids = ASSEMBLE_IDS(jnp.asarray(lod), jnp.int32(length))
    np.testing.assert_array_equal(np.asarray(ids.emb), wc.emb)
    np.testing.assert_array_equal(np.asarray(ids.pos), wc.pos)


ASSEMBLE_GROWING = jax.jit(lambda lod, n: assemble(lod, LOD0, LOD1, LOD2, CAP, length=n))
ASSEMBLE_IDS = jax.jit(lambda lod, n: assemble(lod, jnp.arange(T), LOD1, LOD2, CAP, length=n, embed=lambda i: LOD0[i]))


def test_prefix_sum_long_axes_equal_cumsum():
    x = jnp.asarray(rng.integers(0, 40, (3, 1000)), jnp.int32)
    np.testing.assert_array_equal(prefix_sum(x), np.cumsum(np.asarray(x), axis=-1))
    np.testing.assert_array_equal(prefix_sum(x[:, :100]), np.cumsum(np.asarray(x[:, :100]), axis=-1))


@settings(max_examples=200, deadline=None)
@given(st.lists(layouts(), min_size=2, max_size=2))
def test_assembly_gradient_reaches_each_shown_node_once(lods):
    """The backward pass of the (vmapped) gather: a node shown in slot j gets slot j's
    cotangent; nodes not shown and padding slots contribute nothing."""
    g = np.asarray(rng.normal(size=(2, CAP, D)), np.float32)
    got = ASSEMBLY_GRAD(LOD0, LOD1, LOD2, jnp.asarray(np.stack(lods)), g)
    want = [np.zeros((T, D), np.float32), np.zeros((N1, D), np.float32), np.zeros((N2, D), np.float32)]
    for w, lod in enumerate(lods):
        for slot, (level, pos, _, _) in enumerate(reference(lod)):
            want[level][pos // K**level] += g[w, slot]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)


def test_vmap_over_layouts():
    base = recency_baseline(N1, K, 24)
    wc = jax.vmap(lambda l: assemble(l, LOD0, LOD1, LOD2, CAP))(jnp.asarray(np.stack([all_lod0(N1), base])))
    assert wc.emb.shape == (2, CAP, D) and wc.valid.sum(axis=1).tolist() == [T, entry_count(base, K)]
    assert entry_count(base, K) == 23  # 3 LOD2 superblocks + 20 LOD1 gists (2 superblocks: 2 + 24 > 24)


def test_all_lod0_is_the_plain_sequence():
    wc = jax.device_get(ASSEMBLE(jnp.asarray(all_lod0(N1))))
    np.testing.assert_array_equal(wc.emb, LOD0)
    assert (wc.pos == np.arange(T)).all() and (wc.span == 1).all()
    assert wc.target_valid.sum() == T - 1


def test_no_lod2_level():
    wc = assemble(jnp.asarray(np.ones(N1, np.int8)), LOD0, LOD1, None, 40)
    assert int(wc.valid.sum()) == N1 and (np.asarray(wc.span[:N1]) == K).all()


@pytest.mark.parametrize("capacity", [8, 9, 20, 31, 32, 33, 60, 127, 128, 500])
def test_recency_baseline_is_valid_and_maximal(capacity):
    lod = recency_baseline(N1, K, capacity)
    check_layout(lod, K, capacity=capacity)
    n_lod0 = int((lod == 0).sum())
    assert (lod[N1 - n_lod0 :] == 0).all()  # the LOD0 blocks are the most recent ones
    if n_lod0 < N1 and lod[N1 - n_lod0 - 1] == 1:  # one more block expanded would not fit
        more = lod.copy()
        more[N1 - n_lod0 - 1] = 0
        assert entry_count(more, K) > capacity


def test_recency_baseline_examples():
    assert render(recency_baseline(N1, K, 128)) == "." * 32
    assert render(recency_baseline(N1, K, 32)) == "─" * 32
    assert render(recency_baseline(N1, K, 40)) == "─" * 30 + ".."  # 30 + 2·4 = 38; a third: 41
    assert render(recency_baseline(N1, K, 20)) == "═" * 16 + "─" * 16  # 4 + 16 = 20
    assert render(recency_baseline(N1, K, 8)) == "═" * 32
    with pytest.raises(ValueError, match="do not fit in 7 entries"):
        recency_baseline(N1, K, 7)
    with pytest.raises(ValueError, match="do not fit"):
        recency_baseline(N1, K, 31, max_lod=1)


def test_recency_baseline_with_a_protected_head_and_tail():
    """sink_tokens keeps the first blocks raw; recent_tokens keeps the tail raw while LOD2
    superblocks between them pay for it; the rest expands from the end as before."""
    assert render(recency_baseline(N1, K, 128, sink_tokens=K)) == "." * 32
    assert render(recency_baseline(N1, K, 40, sink_tokens=K)) == "." + "─" * 30 + "."  # 4 + 30 + 4 = 38; one more: 41
    assert render(recency_baseline(N1, K, 35, sink_tokens=K)) == "." + "─" * 31  # 4 + 31 = 35
    lod = recency_baseline(N1, K, 35, sink_tokens=K, recent_tokens=2 * K)
    assert render(lod) == "." + "─" * 3 + "═" * 8 + "─" * 18 + ".."  # 4 + 3 + 2 + 18 + 8 = 35
    check_layout(lod, K, capacity=35, recent_tokens=2 * K, sink_tokens=K)
    # the superblock holding the tail never goes to LOD2: 4 + 3 + 6 + 2 + 8 = 23
    assert render(recency_baseline(N1, K, 24, sink_tokens=K, recent_tokens=2 * K)) == "." + "─" * 3 + "═" * 24 + "──.."
    with pytest.raises(ValueError, match="do not fit in 20 entries"):
        recency_baseline(N1, K, 20, sink_tokens=K, recent_tokens=2 * K)


def test_check_layout_errors():
    bad_super = np.zeros(N1, np.int8)
    bad_super[1:5] = 2  # straddles two superblocks
    with pytest.raises(ValueError, match="superblock at block 0"):
        check_layout(bad_super, K)
    with pytest.raises(ValueError, match="levels 0, 1, 2"):
        check_layout(np.full(N1, 3, np.int8), K)
    with pytest.raises(ValueError, match="more than the capacity 127"):
        check_layout(all_lod0(N1), K, capacity=127)
    tail = np.ones(N1, np.int8)
    tail[-2:] = 0
    check_layout(tail, K, recent_tokens=8)
    with pytest.raises(ValueError, match="last 9 tokens"):
        check_layout(tail, K, recent_tokens=9)
    partial = np.zeros(N1 + 2, np.int8)
    partial[-2:] = 2  # LOD2 on an incomplete superblock
    with pytest.raises(ValueError, match="complete superblock"):
        check_layout(partial, K)


def test_render():
    lod = np.array([2, 2, 2, 2, 1, 0], np.int8)
    assert render(lod) == "════─."



def test_rope_positions_are_global_or_the_slot():
    """global: each entry's first token's position; compact: its slot (0, 1, 2, … over the valid
    entries, 0 on padding) — the same as global when the WC is every token raw from 0."""
    lod = np.full(N1, 1, np.int8)
    lod[N1 - 2 :] = 0  # 30 gists, then 2 raw blocks: 38 entries at positions 0, 4, …, 116, 120, 121, …, 127
    wc = ASSEMBLE(jnp.asarray(lod))
    n = int(wc.valid.sum())
    assert n == (N1 - 2) + 2 * K
    np.testing.assert_array_equal(rope_positions(wc, "global"), wc.pos)
    compact = np.asarray(rope_positions(wc, "compact"))
    np.testing.assert_array_equal(compact[:n], np.arange(n))
    assert (compact[n:] == 0).all() and np.asarray(wc.pos)[n - 1] == T - 1
    raw = ASSEMBLE(jnp.zeros(N1, jnp.int8))
    np.testing.assert_array_equal(rope_positions(raw, "compact"), raw.pos)
    batched = jax.vmap(lambda l: assemble(l, LOD0, LOD1, LOD2, CAP))(jnp.stack([jnp.asarray(lod), jnp.zeros(N1, jnp.int8)]))
    np.testing.assert_array_equal(rope_positions(batched, "compact")[0], compact)
    with pytest.raises(ValueError, match="megacontext.positions 'slot'"):
        rope_positions(wc, "slot")
