"""The runtime engine against from-scratch forwards: exact logits while the history fits,
a rebuilt cache equal to a fresh prefill after every refocus, the plain engine equal to
sliding-window attention, batching and seeding, and the allocator's invariants over long
random streams."""

from __future__ import annotations

import dataclasses
import functools
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.config import config_from_dict
from mcjax.errors import ConfigError, UserError
from mcjax.megacontext.allocator import NEVER, AllocatorParams, fill_units, never_changed
from mcjax.megacontext.layout import assemble, check_layout, entry_count
from mcjax.model import kv_cache as kc
from mcjax.model.gpt import GPT
from mcjax.restore import LoadedRun
from mcjax.runtime import Engine, Sampling
from mcjax.runtime.mc import _fit, allocate, enter_as_gists, fit_streams
from mcjax.train.setup import build_parts

K, T, W, R = 8, 64, 64, 8  # block, training length, W_max, refocus interval
TOL = 2e-4  # f32 on CPU: the cached paths sum attention in another order than one forward


def _raw(tmp: Path, **sections) -> dict:
    raw = tiny_config(
        tmp,
        dataset={"block_size": K, "context_tokens": T, "horizon": 8},
        gistnet={"kind": "transformer", "layers": 1, "num_heads": 2},
        lensnet={"layers": 1, "dim": 32},
        megacontext={"enabled": True, "recent_tokens": 16, "wc_capacity": W, "train_wc_length": 0.5},
        allocator={"cooldown_steps": 1, "max_replacements": 2, "expand_threshold": 0.3, "collapse_threshold": 0.3},
        runtime={"max_tokens": 1024, "refocus_interval": R, "ingest_chunk": 24, "prefill_buckets": 2},
    )
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _perturbed(params, seed: int):
    """Every weight random: zero-initialised projections (identity layers, LensNet's zero
    scores) would hide bugs. LensNet's output layer gets scores well spread over (−1, 1)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
    if "lensnet" in params:
        w = params["lensnet"]["w_out"]
        params["lensnet"]["w_out"] = 2.0 * jax.random.normal(jax.random.key(seed + 1), w.shape) / w.shape[0] ** 0.5
    return params


def fake_run(tmp: Path, seed: int = 0, **sections) -> LoadedRun:
    """A run with random weights (no training): what the engine computes does not depend on them."""
    cfg = config_from_dict(_raw(tmp, **sections))
    parts = build_parts(cfg)
    params = _perturbed(parts.fresh().params, seed)
    return LoadedRun(cfg=cfg, run_dir=tmp, tokenizer=None, model=parts.model, params=params, step=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> LoadedRun:
    return fake_run(tmp_path_factory.mktemp("rt"))


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory) -> LoadedRun:
    """A run whose base reads the WC at compact positions (megacontext.positions: its slots)."""
    return fake_run(tmp_path_factory.mktemp("rt_compact"), megacontext={"positions": "compact"})


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory) -> LoadedRun:
    """A run whose base reads gists through the read gate (half open: bias ≈ −1)."""
    return fake_run(tmp_path_factory.mktemp("rt_gate"), gistnet={"read_gate": True, "read_gate_init": -1.0})


def _stream(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 300, n).tolist()


def _full_logits(gpt: GPT, params, tokens) -> np.ndarray:
    return np.asarray(kc.logits(gpt, params, gpt.apply({"params": params}, jnp.asarray(tokens)[None])))[0]


# ----------------------------------------------------------------------------- exactness


def test_mc_engine_equals_the_full_forward_while_the_history_fits(run):
    """Up to W − R tokens nothing is compressed (LensNet scores 0: below every threshold), and
    every next-token distribution — at each decoded token and after each refocus — equals
    the GPT's full forward over the raw tokens."""
    params = jax.tree.map(lambda x: x, run.params)
    params["lensnet"]["w_out"] = jnp.zeros_like(params["lensnet"]["w_out"])
    eng = Engine(dataclasses.replace(run, params=params), kind="mc")
    tokens = _stream(21, 1)
    eng.ingest([tokens])
    got, at = [eng.next_logits()[0]], [len(tokens)]
    for block in eng.generate(2 * R, Sampling(temperature=1.0, top_k=20), seed=3):  # two refocuses
        tokens += block[0].tolist()
        got.append(eng.next_logits()[0])
        at.append(len(tokens))
    decode = jax.jit(eng.rt.decode, static_argnums=(2, 3))
    while len(tokens) < W - R:
        eng.state, tok = decode(eng.params, eng.state, 1, Sampling(temperature=1.0, top_k=20))
        tokens.append(int(tok[0, 0]))
        got.append(np.asarray(eng.state.logits)[0])
        at.append(len(tokens))
    ref = _full_logits(run.model.gpt, params["gpt"], tokens)  # the model's own params (the engine fuses projections)
    np.testing.assert_allclose(np.stack(got), ref[np.asarray(at) - 1], atol=TOL)
    assert (np.asarray(eng.state.block_lod) == 0).all()


def _synced_equals_prefill(eng: Engine) -> int:
    """Sync the cache, check it against a fresh prefill of the assembled working context
    (every valid row of every layer, and the next-token logits); return the rebuild size."""
    gpt, gp = eng.rt.gpt, eng.run.params["gpt"]  # the model's own params, not the engine's fused ones
    n_old, pos_old, lod_old = jax.device_get((eng.state.cache_n, eng.state.cache_pos, eng.state.cache_lod))
    size = eng.sync()
    wc = jax.device_get(eng.rt.working_context(eng.params, eng.state, W))
    n = int(wc.valid[0].sum())
    same = (np.arange(W) < n_old[0]) & (pos_old[0] == wc.pos[0]) & (lod_old[0] == wc.lod[0]) & wc.valid[0]
    assert size == eng.rt.sizes[int(np.searchsorted(eng.rt.sizes, n - int(np.cumprod(same).sum())))]
    bias = eng.rt._read_bias(eng.params)
    gate = None if bias is None else (bias, jnp.asarray(wc.lod) > 0)
    at = np.arange(W) if eng.rt.positions == "compact" else wc.pos[0]  # the RoPE positions, computed here
    assert eng.rt.positions != "compact" or (wc.pos[0, 1:n] > n).any(), "compact positions not exercised"
    hidden, cache = kc.prefill(gpt, gp, jnp.asarray(wc.emb), jnp.asarray(at)[None], jnp.asarray(wc.span), gate)
    for layer in range(gpt.depth):
        for got, want in ((eng.state.cache.k, cache.k), (eng.state.cache.v, cache.v)):
            np.testing.assert_allclose(np.asarray(got[layer])[0, :, :n], np.asarray(want[layer])[0, :, :n], atol=TOL)
    np.testing.assert_allclose(np.asarray(eng.state.logits)[0], np.asarray(kc.logits(gpt, gp, hidden[0, n - 1])), atol=TOL)
    return size


@pytest.mark.parametrize("kind", ["global", "gated", "compact"])
def test_every_rebuilt_cache_equals_a_prefill_from_scratch(request, kind):
    """A long stream (ingest beyond W_max, then blocks of decoding with refocus by a random
    LensNet): after every refocus the cache rebuilt from the first changed entry equals a
    fresh prefill of the assembled working context, row by row, and so do the next-token
    logits. Hand-made edits at several depths then drive every rebuild size. With the read
    gate, the gist slots keep their bias through every rebuild and decode step. With compact
    positions every entry, decoded tokens included, sits at its slot."""
    run = request.getfixturevalue({"global": "run", "gated": "gated_run", "compact": "compact_run"}[kind])
    eng = Engine(run, kind="mc")
    eng.ingest([_stream(147, 2)])  # 147 + 3 blocks = 171 = 21 blocks + 3: the last edit rebuilds 4 slots
    sizes, layouts = set(), []
    for block in range(3):
        sizes.add(_synced_equals_prefill(eng))
        layouts.append(np.asarray(eng.state.block_lod)[0].copy())
        next(eng.generate(R, Sampling(temperature=1.0), seed=block))
    assert sum((a != b).any() for a, b in zip(layouts, layouts[1:])) >= 1, "no refocus changed the layout"
    sizes.add(_synced_equals_prefill(eng))
    sizes.add(_synced_equals_prefill(eng))  # nothing changed since: size 0
    length = int(eng.lengths[0])
    for block in (length // K - 1, length // K - 3, 0):  # a collapse (or expand) ever deeper in the WC
        lod = np.asarray(eng.state.block_lod).copy()
        lod[0, block] = 1 - lod[0, block] if lod[0, block] < 2 else 2
        eng.state, eng._pending = eng.state._replace(block_lod=jnp.asarray(lod)), None
        sizes.add(_synced_equals_prefill(eng))
    assert sizes == set(eng.rt.sizes), f"rebuild sizes {sorted(sizes)} of {eng.rt.sizes} exercised"


def test_plain_engine_is_sliding_window_attention(tmp_path):
    """Ring cache of W = 16 entries, prompt chunks of 16: every next-token distribution equals
    the GPT over the whole sequence with a band mask of width W (each token sees itself and
    the 15 before it)."""
    run = fake_run(tmp_path, megacontext={"enabled": False, "wc_capacity": 16, "recent_tokens": 8},
                   runtime={"ingest_chunk": 16})
    eng = Engine(run, kind="auto")
    assert eng.kind == "plain"
    prompt = _stream(37, 3)
    eng.ingest([prompt])
    first = eng.next_logits()[0]
    out = np.concatenate(list(eng.generate(2 * R, Sampling(temperature=0.0))), axis=1)[0]
    tokens = prompt + out.tolist()
    gpt, gp = run.model, run.params
    n = len(tokens)
    pos = jnp.arange(n)[None]
    band = (pos[0, :, None] >= pos[0, None, :]) & (pos[0, :, None] - pos[0, None, :] < 16)
    empty = kc.empty_cache(gpt, 1, 1)
    hidden, _ = kc.extend(gpt, gp, kc.embed(gpt, gp, jnp.asarray(tokens)[None]), pos, None, empty,
                          jnp.zeros((1, n, 1), bool), band[None], jnp.full((1, n), 1))
    ref = np.asarray(kc.logits(gpt, gp, hidden))[0]
    np.testing.assert_allclose(first, ref[len(prompt) - 1], atol=TOL)
    assert out.tolist() == ref[len(prompt) - 1 : -1].argmax(-1).tolist()  # greedy: each token is the argmax
    np.testing.assert_allclose(np.asarray(eng.state.logits)[0], ref[-1], atol=TOL)


@pytest.mark.parametrize("kind", ["mc", "plain"])
def test_score_decodes_given_tokens_exactly_as_generate(run, kind):
    """Teacher forcing: scoring the tokens a greedy `generate` produced gives greedy == tokens
    at every position, log-probabilities of the next-token distributions generation saw,
    and the same state afterwards (history, layout, logits) as generating them; a prefix of
    a block scores the same as the block's first tokens."""
    prompt = _stream(150, 6)  # past W_max: the MegaContext engine has gisted and refocused
    gen = Engine(run, kind=kind)
    gen.ingest([prompt])
    first = gen.next_logits()[0]
    blocks = [b for b in gen.generate(2 * R, Sampling(temperature=0.0))]
    sc = Engine(run, kind=kind)
    sc.ingest([prompt])
    logps = []
    for block in blocks:
        logp, greedy = sc.score(block)
        assert greedy.tolist() == block.tolist()
        logps.append(logp)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(first)))
    np.testing.assert_allclose(logps[0][0, 0], ref[blocks[0][0, 0]], atol=TOL)
    assert (np.concatenate(logps, axis=1) <= 0).all()
    np.testing.assert_allclose(sc.next_logits(), gen.next_logits(), atol=TOL)
    assert (sc.lengths == gen.lengths).all()
    if kind == "mc":
        assert (np.asarray(sc.state.block_lod) == np.asarray(gen.state.block_lod)).all()
    part = Engine(run, kind=kind)
    part.ingest([prompt])
    logp, greedy = part.score(blocks[0][:, :3])
    np.testing.assert_allclose(logp, logps[0][:, :3], atol=TOL)
    with pytest.raises(UserError, match=r"score takes int tokens \[1, n\] with 1 ≤ n ≤ runtime.refocus_interval \(8\)"):
        part.score(np.zeros((1, R + 1), np.int32))


def test_batched_streams_equal_single_streams(run):
    """Two streams of different lengths in one batch produce exactly what each produces alone
    (sampling keys are per stream; idle ingest chunks leave a stream untouched)."""
    prompts = [_stream(90, 4), _stream(30, 5)]
    sampling = Sampling(temperature=0.9, top_k=30)

    def text(batch_prompts, seeds):
        eng = Engine(run, kind="mc", batch=len(batch_prompts))
        eng.ingest(batch_prompts)
        out = np.concatenate(list(eng.generate(3 * R, sampling, seed=seeds)), axis=1)
        return out, np.asarray(eng.state.block_lod)

    both, lod_both = text(prompts, [7, 8])
    for i, p in enumerate(prompts):
        alone, lod_alone = text([p], [7 + i])
        assert both[i].tolist() == alone[0].tolist()
        assert (lod_both[i] == lod_alone[0]).all()
    again, _ = text(prompts, [7, 8])
    assert again.tolist() == both.tolist()  # a fixed seed gives the same text twice
    other, _ = text(prompts, [9, 10])
    assert other[0].tolist() != both[0].tolist() and other[1].tolist() != both[1].tolist()


# ----------------------------------------------------------------------------- allocator over streams


@functools.lru_cache(maxsize=None)
def _alloc_harness(policy: str, margin: int):
    """The runtime's per-stream refocus (`mc.allocate`) jitted once per policy and margin."""
    cfg = config_from_dict(_raw(Path("/nonexistent"), allocator={"policy": policy, "cooldown_steps": 2},
                                runtime={"collapse_margin": margin, "max_tokens": 2048}))
    alloc = AllocatorParams.from_config(cfg)
    cap = cfg.runtime.max_tokens
    high = cfg.wc_capacity - cfg.runtime.refocus_interval
    n1 = cap // K
    zeros = (jnp.zeros((cap,), jnp.int32), jnp.zeros((n1, 1)), jnp.zeros((n1 // K, 1)))

    @jax.jit
    def step(lod, scores, last, length, t, key):
        wc = assemble(lod, *zeros, W + 64, length=length, embed=lambda ids: jnp.zeros(ids.shape + (1,)))
        return allocate(lod, wc, scores, last, length, t, key, alloc, high, margin)

    return cfg, step, n1, high


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), policy=st.sampled_from(["greedy", "stochastic"]), margin=st.sampled_from([0, 16]))
def test_long_random_streams_keep_every_invariant(seed, policy, margin):
    """Random chunks of tokens and random LensNet scores for 40 refocuses: the layout stays
    within W − R, covers the history with no gap or overlap, keeps the tail raw, respects
    cooldown (a budget override aside), and the swap-rate and residency arithmetic holds."""
    cfg, step, n1, high = _alloc_harness(policy, margin)
    rng = np.random.default_rng(seed)
    lod, last, length = jnp.zeros(n1, jnp.int8), never_changed(n1), 0
    recent, cooldown = cfg.megacontext.recent_tokens, cfg.allocator.cooldown_steps
    for t in range(40):
        length = min(length + int(rng.choice([1, 5, R, 24, 64])), 2048)
        scores = jnp.asarray(rng.uniform(-1, 1, W + 64), jnp.float32)
        new, new_last, stats = jax.device_get(step(lod, scores, last, jnp.int32(length), jnp.int32(t), jax.random.key(seed + t)))
        old, new, old_last = np.asarray(lod), np.asarray(new), np.asarray(last)
        present = -(-length // K)
        assert (new[present:] == 0).all() and (new_last[present:] == NEVER).all()  # absent blocks untouched
        full = new[: length // K]
        check_layout(full, K, capacity=high)  # levels, whole LOD2 superblocks, budget
        n = int(stats["entries_after"])
        assert n <= high and entry_count(full, K) + length % K == n
        got = assemble(jnp.asarray(new), jnp.zeros((cfg.runtime.max_tokens, 1)), jnp.zeros((n1, 1)),
                       jnp.zeros((n1 // K, 1)), high, length=jnp.int32(length))
        pos, span = np.asarray(got.pos)[:n], np.asarray(got.span)[:n]
        assert pos[0] == 0 and (pos[1:] == pos[:-1] + span[:-1]).all() and pos[-1] + span[-1] == length  # coverage
        tail_blocks = np.arange(present)[(np.arange(present) + 1) * K > length - recent]
        assert (new[tail_blocks] == 0).all()  # the last recent_tokens stay raw
        moved = np.flatnonzero(new != old)
        assert (new_last[moved] == t).all()
        if int(stats["budget_overrides"]) == 0:
            assert (t - old_last[moved] >= cooldown).all()  # cooldown respected
        assert int(stats["blocks"]) == length // K
        actions = int(stats["num_expands"]) + int(stats["num_collapses"])
        assert stats["swap_rate"] == pytest.approx(actions / max(length // K, 1))
        res = t - np.maximum(new_last[: length // K], 0)
        assert stats["mean_residency"] == pytest.approx(res.sum() / max(length // K, 1), rel=1e-6)
        lod, last = jnp.asarray(new), jnp.asarray(new_last)


def test_the_fallback_passes_run_only_for_a_batch_with_a_stream_over_budget():
    """`fit_streams` (the engine's batched fallback, a branch taken only when a stream is over
    W − R) equals `_fit` stream by stream: a batch with one stream over (all raw) and one
    under (gists but its last 3 blocks) — the first fitted with budget overrides, the second untouched — and a
    batch with none over, returned as it came with no overrides."""
    cfg, _, n1, high = _alloc_harness("greedy", 0)
    alloc, length = AllocatorParams.from_config(cfg), 200
    zeros = (jnp.zeros((cfg.runtime.max_tokens,), jnp.int32), jnp.zeros((n1, 1)), jnp.zeros((n1 // K, 1)))
    present = np.arange(n1) < length // K
    over = jnp.zeros(n1, jnp.int8)  # every block raw: 200 entries, W − R = 56
    under = jnp.asarray(np.where(present & (np.arange(n1) < length // K - 3), 1, 0), jnp.int8)  # 22 gists + 24 raw

    def batch(*lods):
        lod = jnp.stack(lods)
        wc = jax.vmap(lambda l: assemble(l, *zeros, W + 64, length=jnp.int32(length),
                                         embed=lambda ids: jnp.zeros(ids.shape + (1,))))(lod)
        rng = np.random.default_rng(len(lods))
        scores = jnp.asarray(rng.uniform(-1, 1, (len(lods), W + 64)), jnp.float32)
        b = len(lods)
        rest = (jnp.full((b, n1), 3, jnp.int32), jnp.full((b,), length, jnp.int32), jnp.full((b,), 4, jnp.int32),
                jax.random.split(jax.random.key(0), b), jnp.full((b,), high - 16, jnp.int32))
        return lod, wc, scores, rest

    lod, wc, scores, (last, n, t, keys, budget) = batch(over, under)
    got = jax.jit(lambda *a: fit_streams(*a, alloc, budget, high))(lod, wc, scores, last, n, t, keys)
    for i in range(2):
        one = jax.tree.map(lambda x: x[i], (wc, scores))
        want = _fit(lod[i], *one, last[i], n[i], t[i], keys[i], alloc, budget[i], high)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(w))
    assert int(got[2][0]) > 0 and int(got[2][1]) == 0
    assert entry_count(np.asarray(got[0][0])[: length // K], K) <= high
    np.testing.assert_array_equal(np.asarray(got[0][1]), np.asarray(under))

    lod, wc, scores, (last, n, t, keys, budget) = batch(under, under)
    same = fit_streams(lod, wc, scores, last, n, t, keys, alloc, budget, high)
    np.testing.assert_array_equal(np.asarray(same[0]), np.asarray(lod))
    np.testing.assert_array_equal(np.asarray(same[1]), np.asarray(last))
    np.testing.assert_array_equal(np.asarray(same[2]), np.zeros(2, np.int32))


def test_a_long_stream_keeps_its_budget_in_use():
    """At run-time sizes (K = 32, W_max = 2,048, R = 32, margin W/16) with random LensNet
    scores: once the history is longer than W_max, every refocus — the ingest of a 4,096-token
    prompt, then 96 decode blocks — leaves the working context at 80–100 % of W_max, never
    above W − R, with a swap rate ≤ 0.25 per decode refocus."""
    k, w, r, chunk = 32, 2048, 32, 1024
    cap, margin = 8192, w // 16
    alloc = AllocatorParams(k=k, w_max=w, recent_tokens=128, max_lod=2, max_replacements=4, expand_threshold=0.1,
                            collapse_threshold=0.1, cooldown_steps=2, iterations=2, fill_units=fill_units(w, k))
    n1 = cap // k
    zeros = (jnp.zeros((cap,), jnp.int32), jnp.zeros((n1, 1)), jnp.zeros((n1 // k, 1)))

    @functools.partial(jax.jit, static_argnums=6)
    def step(lod, scores, last, length, t, key, width):
        wc = assemble(lod, *zeros, width, length=length, embed=lambda ids: jnp.zeros(ids.shape + (1,)))
        return allocate(lod, wc, scores, last, length, t, key, alloc, w - r, margin)

    rng = np.random.default_rng(0)
    lod, last, length = jnp.zeros(n1, jnp.int8), never_changed(n1), 0
    for t, add in enumerate([chunk] * 4 + [r] * 96):
        length += add
        width = w + add
        scores = jnp.asarray(rng.uniform(-1, 1, width), jnp.float32)
        lod, last, stats = step(lod, scores, last, jnp.int32(length), jnp.int32(t), jax.random.key(t), width)
        n = int(stats["entries_after"])
        assert n <= w - r
        if length > w:
            assert n >= 0.8 * w, (t, length, n)
            assert add > r or float(stats["swap_rate"]) <= 0.25  # an ingest chunk's own blocks must fold in


def test_an_overflowing_chunk_enters_as_gists_but_its_tail():
    """runtime.ingest_gists: K = 4, a head of one block, a tail of 4 tokens; the stream grows
    to 48 tokens (12 blocks) with block 2 raw from before and blocks 4–11 new."""
    alloc = AllocatorParams(k=4, w_max=64, recent_tokens=4, sink_tokens=4)
    lod = jnp.zeros(16, jnp.int8).at[1].set(1).at[3].set(1)  # 4 + 1 + 4 + 1 + 4·8 = 42 entries
    enter = jax.jit(enter_as_gists, static_argnums=3)
    new = enter(lod, jnp.int32(48), alloc, 30)
    assert new.tolist() == [0, 1, 1, 1] + [1] * 7 + [0] * 5  # blocks 2 and 4–10 (recency); 11 is the tail
    assert enter(lod, jnp.int32(48), alloc, 42).tolist() == lod.tolist()  # fits: as it was
    assert enter(lod, jnp.int32(46), alloc, 30).tolist() == [0, 1, 1, 1] + [1] * 6 + [0] * 6  # tail 10–11


def test_an_ingest_as_gists_with_nothing_scored_is_recency(tmp_path):
    """runtime.ingest_gists with LensNet's scores all 0: one 160-token chunk (20 blocks, W − R = 56)
    enters as 18 gists + a 2-block tail (34 entries); the fill expands the most recent gists while
    the layout stays within W − R − margin = 52 entries: two of them."""
    run = fake_run(tmp_path, runtime={"ingest_gists": True, "ingest_chunk": 160})
    run.params["lensnet"]["w_out"] = jnp.zeros_like(run.params["lensnet"]["w_out"])
    engine = Engine(run, kind="mc", batch=1)
    engine.ingest([_stream(160, 4)])
    assert np.asarray(engine.state.block_lod)[0, :20].tolist() == [1] * 16 + [0] * 4


def test_an_ingest_as_gists_only_expands_and_ignores_cooldown(tmp_path, monkeypatch):
    """runtime.ingest_gists with a LensNet that wants block 5 (score 0.9) and nothing else (−0.9):
    the first chunk (20 blocks) expands it; the second (10 more) turns it back into a gist one
    refocus later, inside its cooldown of 2, and the ingest re-expands it all the same — while
    no all-gist superblock, every one scored −0.9 ≥ the collapse threshold, collapses to LOD2.
    (Each half of the override is needed: with the config's cooldown block 5 stays a gist; with its
    collapse threshold blocks 8–23 go to LOD2.)"""
    import mcjax.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_PROGRAMS", {})  # the fake LensNet stays out of other tests' programs
    run = fake_run(tmp_path, runtime={"ingest_gists": True, "ingest_chunk": 160}, allocator={"cooldown_steps": 2})
    engine = Engine(run, kind="mc", batch=1)

    def wants_block_5(variables, wc):
        hit = (wc.pos < 6 * K) & (wc.pos + wc.span > 5 * K)
        return jnp.where(wc.valid, jnp.where(hit, 0.9, -0.9), 0.0)

    engine.rt.lensnet = types.SimpleNamespace(apply=wants_block_5)
    engine.ingest([_stream(160, 4)])
    assert np.asarray(engine.state.block_lod)[0, 5] == 0
    engine.ingest([_stream(80, 5)])  # 30 blocks: 28 gists + the tail = 44 entries ≤ 52, one expansion fits
    lod = np.asarray(engine.state.block_lod)[0, :30]
    assert lod[5] == 0 and lod.max() == 1 and lod[28:].tolist() == [0, 0], lod.tolist()


def test_an_ingest_exchange_trades_superblocks_and_decides_lod2_anew(tmp_path, monkeypatch):
    """runtime.ingest_exchange (K = 8, W − R = 56, fill to 52, a 2-block tail). A 320-token
    chunk (40 blocks) enters as 38 gists + the tail: 54 entries, room for no expansion. With a
    LensNet that wants blocks 5 and 20 (0.9) and nothing else (−0.9), the exchange pays for the
    best one within the fill's 52: two superblocks holding neither go to LOD2 (the two
    lowest-scored: 1 and 3), and the refocus's rounds, which may fill to W − R, expand both
    wanted blocks; without it both stay gists. Then 80 more tokens, and LensNet
    wants block 12 — in superblock 1, at LOD2: it re-enters as gists, and block 12 comes back
    raw in this one refocus (with superblock 5's most recent gist, the fill's tie-break)."""
    import mcjax.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_PROGRAMS", {})  # the fake LensNet stays out of other tests' programs

    def wants(*blocks):
        def apply(variables, wc):
            hit = jnp.zeros(wc.pos.shape, bool)
            for b in blocks:
                hit |= (wc.pos < (b + 1) * K) & (wc.pos + wc.span > b * K)
            return jnp.where(wc.valid, jnp.where(hit, 0.9, -0.9), 0.0)
        return types.SimpleNamespace(apply=apply)

    def engine(trade: bool) -> Engine:
        run = fake_run(tmp_path, runtime={"ingest_gists": True, "ingest_exchange": trade, "ingest_chunk": 320})
        eng = Engine(run, kind="mc", batch=1)
        eng.rt.lensnet = wants(5, 20)
        return eng

    plain = engine(False)
    plain.ingest([_stream(320, 4)])
    assert np.asarray(plain.state.block_lod)[0, :40].tolist() == [1] * 38 + [0, 0]

    eng = engine(True)
    eng.ingest([_stream(320, 4)])
    lod = np.asarray(eng.state.block_lod)[0, :40]
    assert lod.tolist() == [1] * 5 + [0] + [1] * 2 + [2] * 8 + [1] * 4 + [0] + [1] * 3 + [2] * 8 + [1] * 6 + [0, 0]
    assert entry_count(lod, K) == 54 - 2 * 7 + 2 * 7

    eng.rt.lensnet = wants(12)
    eng.ingest([_stream(80, 5)])  # 50 blocks: 48 gists + the tail = 64 entries; 6 superblocks may trade
    lod = np.asarray(eng.state.block_lod)[0, :50]
    assert lod[12] == 0 and lod[47] == 0 and (lod[8:16] < 2).all(), lod.tolist()
    assert entry_count(lod, K) <= 52 and (lod == 2).sum() == 4 * K
    check_layout(lod, K, recent_tokens=16)


# ----------------------------------------------------------------------------- bad input


def test_bad_runtime_input_is_one_clear_error(run, tmp_path):
    eng = Engine(run, kind="mc")
    with pytest.raises(UserError, match=r"stream 0: 1,025 new tokens after 0 held exceed runtime.max_tokens \(1,024"):
        eng.ingest([_stream(1025, 0)])
    with pytest.raises(UserError, match="holds no tokens: ingest a prompt first"):
        next(eng.generate(8))
    with pytest.raises(UserError, match="unknown engine 'fast': choose mc or plain"):
        Engine(run, kind="fast")
    with pytest.raises(ConfigError, match="runtime.refocus_interval: must be a positive multiple of dataset.block_size"):
        config_from_dict(_raw(tmp_path, runtime={"refocus_interval": 12}))
    with pytest.raises(ConfigError, match="megacontext.wc_capacity: .* smaller than the protected tail"):
        config_from_dict(_raw(tmp_path, megacontext={"wc_capacity": 20}))
    with pytest.raises(ConfigError, match="runtime.ingest_exchange: needs runtime.ingest_gists: true and megacontext.max_lod: 2"):
        config_from_dict(_raw(tmp_path, runtime={"ingest_exchange": True}))
    with pytest.raises(ConfigError, match="got ingest_gists True, max_lod 1"):
        config_from_dict(_raw(tmp_path, runtime={"ingest_exchange": True, "ingest_gists": True}, megacontext={"max_lod": 1}))
    with pytest.raises(ConfigError, match="allocator.policy: must be one of greedy, stochastic"):
        config_from_dict(_raw(tmp_path, allocator={"policy": "best"}))
    with pytest.raises(ConfigError, match="runtime.max_tokens: the most compressed layout of 100,000 tokens"):
        Engine(fake_run(tmp_path, runtime={"max_tokens": 100_000}), kind="mc")
    plain = fake_run(tmp_path, megacontext={"enabled": False})
    with pytest.raises(UserError, match="trained a plain GPT .* use --engine plain"):
        Engine(plain, kind="mc")
