"""Host-side layout sampling for MegaContext training: validity, targets, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mcjax.config import config_from_dict
from mcjax.data.variants import EVAL, VariantSpec, curriculum_target, sample_layouts, sample_variant, variant_capacity
from mcjax.megacontext.layout import check_layout, entry_count

from conftest import tiny_config

K = 8


def _spec(n1=32, recent=16, lod2=0.3, variants=2, capacity=None, sink=0, policy=0) -> VariantSpec:
    return VariantSpec(
        num_blocks=n1, block_size=K, capacity=capacity or n1 * K, recent_tokens=recent,
        max_lod=2, num_variants=variants, lod2_probability=lod2, sink_tokens=sink, num_policy=policy,
    )


@settings(max_examples=400, deadline=None)
@given(
    n1=st.integers(4, 40),
    tail=st.integers(1, 3),
    lod2=st.sampled_from([0.0, 0.5, 1.0]),
    frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_variants_are_valid_and_hit_the_target(n1, tail, lod2, frac, seed):
    spec = _spec(n1=n1, recent=tail * K, lod2=lod2)
    target = max(int(frac * n1 * K), tail * K + K)
    lod = sample_variant(np.random.default_rng(seed), spec, target)
    check_layout(lod, K, recent_tokens=spec.recent_tokens)  # tail at LOD0, whole LOD2 superblocks
    count = entry_count(lod, K)
    free = n1 - tail
    if (lod[:free] == 0).any():  # blocks were left raw: the target was reached ...
        assert count <= target
        if lod2 == 0:  # ... and, with LOD1 collapses only, not overshot by a whole block
            assert count > target - (K - 1)
    assert lod2 or not (lod == 2).any()


@pytest.mark.parametrize("sink", [K, 2 * K, 9 * K])
def test_the_protected_head_stays_raw_in_every_layout(sink):
    """With sink_tokens, the baseline, every random variant and the policy start keep the first
    sink_tokens tokens at LOD0; no LOD2 superblock holds them; min_wc_entries is the most
    compressed such layout's size."""
    from mcjax.config import min_wc_entries

    spec = _spec(n1=32, recent=16, lod2=1.0, variants=3, capacity=120, sink=sink, policy=1)
    lays = sample_layouts(spec, 60, seed=0, step=3, rows=np.arange(4))
    for lod in lays.reshape(-1, 32):
        check_layout(lod, K, recent_tokens=16, sink_tokens=sink)
    least = min_wc_entries(32, K, 16, 2, sink)
    tight = sample_variant(np.random.default_rng(1), spec, target=1)  # as compressed as it goes
    assert entry_count(tight, K) == least
    # head tokens + tail tokens + LOD2 superblocks wholly between them + the other LOD1 gists
    assert least == {K: 8 + 16 + 2 + 13, 2 * K: 16 + 16 + 2 + 12, 9 * K: 72 + 16 + 1 + 13}[sink]


def test_lod2_probability_one_collapses_every_superblock_that_fits():
    spec = _spec(n1=32, recent=16, lod2=1.0)  # superblocks 0..3 of 8 blocks; the last holds the tail
    lod = sample_variant(np.random.default_rng(0), spec, target=40)
    assert (lod[:24] == 2).all() and (lod[24:] != 2).all()
    assert entry_count(lod, K) <= 40


def test_layouts_are_deterministic_and_baseline_first():
    spec = _spec(capacity=200)
    a = sample_layouts(spec, 100, seed=3, step=7, rows=np.arange(4))
    b = sample_layouts(spec, 100, seed=3, step=7, rows=np.arange(4))
    assert a.dtype == np.int8 and a.shape == (4, 3, 32)
    np.testing.assert_array_equal(a, b)
    # A row's layouts do not depend on which other rows are in the batch.
    np.testing.assert_array_equal(sample_layouts(spec, 100, seed=3, step=7, rows=np.array([2]))[0], a[2])
    assert not np.array_equal(a, sample_layouts(spec, 100, seed=3, step=8, rows=np.arange(4)))
    assert not np.array_equal(a, sample_layouts(spec, 100, seed=3, step=7, rows=np.arange(4), stream=EVAL))
    assert entry_count(a[0, 0], K) <= 200 and (a[:, 0] == a[0, 0]).all()  # the recency baseline
    assert max(entry_count(v, K) for v in a[:, 1:].reshape(-1, 32)) <= 100


def test_variant_targets_never_exceed_the_capacity():
    spec = _spec(capacity=120)
    lay = sample_layouts(spec, 250, seed=0, step=0, rows=np.arange(3))
    assert max(entry_count(v, K) for v in lay.reshape(-1, 32)) <= 120


def test_variant_capacity_buckets():
    spec = _spec(n1=32)  # T = 256, bucket T/8 = 32
    assert variant_capacity(100, spec) == 128
    assert variant_capacity(128, spec) == 128
    assert variant_capacity(300, spec) == 256
    assert variant_capacity(100, dataclasses.replace(spec, num_variants=0)) == 0
    long = _spec(n1=1024, capacity=2048)  # T = 8,192 = 4 · W_max: buckets of W_max/8 (not T/8 = W_max)
    assert [variant_capacity(t, long) for t in (2048, 5000, 1100)] == [2048, 2048, 1280]


def test_curriculum_anneals_then_holds(tmp_path):
    cfg = config_from_dict(tiny_config(
        tmp_path,
        dataset={"context_tokens": 256},
        megacontext={"enabled": True, "recent_tokens": 32, "curriculum_start": 0.8, "train_wc_length": 0.4, "curriculum_ratio": 0.5},
    ))
    assert curriculum_target(0, 100, cfg) == round(0.8 * 256)
    assert curriculum_target(25, 100, cfg) == round(0.6 * 256)
    assert curriculum_target(50, 100, cfg) == curriculum_target(99, 100, cfg) == round(0.4 * 256)


@pytest.mark.parametrize(
    "section, match",
    [
        ({"train_wc_length": 0.1}, "train_wc_length: 0.1 × 256 = 25.6 entries is below the protected tail"),
        ({"num_random_variants": -1}, "num_random_variants: must be ≥ 0"),
        ({"curriculum_start": 0.3}, "curriculum_start: must be in"),
        ({"lens_temperature": 0.0}, "lens_temperature: must be > 0"),
        ({"recent_tokens": 32, "train_wc_length": 0.5}, "megacontext.recent_tokens: the protected tail"),
    ],
)
def test_mc_config_errors(tmp_path, section, match):
    from mcjax.errors import ConfigError

    raw = tiny_config(tmp_path, dataset={"context_tokens": 256, "horizon": 48})
    raw["megacontext"] = {"enabled": True, "recent_tokens": 64, "train_wc_length": 0.4, **section}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw, where="mc.yaml")
