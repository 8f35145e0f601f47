"""Long-context MegaContext training (T ≫ W_max): on-policy variants, config errors, and a
tiny end-to-end run at T = 8·W_max with synthetic task rows and focus validation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.config import config_from_dict
from mcjax.data.variants import VariantSpec, policy_start, sample_layouts, variant_capacity
from mcjax.errors import ConfigError
from mcjax.megacontext.allocator import AllocatorParams
from mcjax.megacontext.layout import check_layout, entry_count
from mcjax.model.megacontext import build_megacontext
from mcjax.train.focus_eval import needle_rank
from mcjax.train.mc_step import MCForward, policy_params

from conftest import run_cli, tiny_config, write_config

T, W = 2048, 256  # 64 blocks of 32 (2 superblocks) read through 256 entries: T = 8·W_max


def _long(tmp_path, **mc):
    return tiny_config(
        tmp_path,
        dataset={"context_tokens": T, "horizon": 16},
        base_model={"depth": 1, "model_dim": 32, "head_dim": 16},
        gistnet={"layers": 1},
        lensnet={"layers": 1, "dim": 16},
        megacontext={
            "enabled": True, "wc_capacity": W, "recent_tokens": 32, "max_lod": 2,
            "num_random_variants": 1, "num_policy_variants": 2, "train_wc_length": W / T,
            "curriculum_start": W / T, **mc,
        },
    )


def test_on_policy_variants_are_valid_layouts_within_budget_that_differ_from_the_start(tmp_path):
    cfg = config_from_dict(_long(tmp_path))
    spec = VariantSpec.from_config(cfg)
    lay = sample_layouts(spec, W, seed=0, step=0, rows=np.arange(4))
    start = policy_start(spec, W)
    assert lay.shape == (4, 4, T // 32) and (lay[:, 2:] == start).all()
    budget = entry_count(start, 32)
    assert budget <= W

    model = build_megacontext(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, T + 1)), jnp.int32)
    params = model.init(jax.random.key(0), tokens[:, :T])["params"]
    fw = MCForward(model, cfg)
    tree = fw.tree(params, tokens)
    chosen, stats = jax.jit(
        lambda p, tr, s, key: fw.policy(p, tr, s, 3, variant_capacity(W, spec), key, fw.explore)
    )(params, tree, jnp.asarray(lay[:, -1]), jax.random.key(1))
    chosen = np.asarray(chosen)
    assert chosen.shape == (4, 3, T // 32)
    for layout in chosen.reshape(-1, T // 32):
        check_layout(layout, 32, capacity=budget, recent_tokens=32)  # valid, tail raw, within budget
    assert (chosen != start).any(-1).mean() > 0.5, "the policy left most layouts as the recency start"
    assert len({layout.tobytes() for layout in chosen.reshape(-1, T // 32)}) > 1, "exploration drew one layout only"
    assert float(np.asarray(stats["num_expands"]).sum()) > 0

    greedy = policy_params(cfg, explore=False)
    again = [np.asarray(fw.policy(params, tree, jnp.asarray(lay[:, -1]), 1, W, jax.random.key(s), greedy)[0]) for s in (2, 3)]
    assert (again[0] == again[1]).all(), "the greedy (validation) policy depends on the key"


def test_training_policy_uses_the_engines_spans(tmp_path):
    """The on-policy variants and the validation probe expand as the runtime engine does:
    allocator.span_blocks / span_back reach the training policy's allocator (they did not,
    and the engine expanded pairs that training never labelled)."""
    raw = _long(tmp_path)
    raw["allocator"] = {"span_blocks": 2, "span_back": 1}
    cfg = config_from_dict(raw)
    engine = AllocatorParams.from_config(cfg)
    for explore in (True, False):
        p = policy_params(cfg, explore=explore)
        assert (p.span_blocks, p.span_back) == (engine.span_blocks, engine.span_back) == (2, 1)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("dataset", {"context_tokens": 1536}, "dataset.context_tokens: 1536 is longer than W_max (256) but not a multiple of K² = 1024"),
        ("megacontext", {"wc_capacity": 48}, "megacontext.wc_capacity: 48 is smaller than the protected tail (32) plus one block (32)"),
        ("dataset", {"tasks": {"passkey": 0.6, "kv": 0.5}}, "dataset.tasks: the shares sum to 1.1, more than 1"),
        ("dataset", {"tasks": {"needle": 0.1}}, "dataset.tasks.needle: unknown task (choose from passkey, kv, vartrack)"),
        ("megacontext", {"num_policy_variants": -1}, "megacontext.num_policy_variants: must be ≥ 0, got -1"),
    ],
)
def test_long_context_config_errors_are_one_line(tmp_path, section, values, message):
    raw = _long(tmp_path)
    raw[section].update(values)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_needle_is_ranked_among_the_expand_candidates_only():
    # blocks: head (0), gists 1-4 and 6, raw 5 (before the tail), tail 7; the raw ones score high
    start = jnp.asarray([[0, 1, 1, 1, 1, 0, 1, 0]] * 5)
    u = jnp.asarray([[9.0, 0.5, 0.9, 0.2, 0.7, 5.0, 0.7, 9.0]] * 5)
    needle = jnp.asarray([3, 2, 4, 5, -1])  # lowest gist, best gist, a tie with 6, raw already, none
    got = needle_rank(u, start, needle, head_blocks=1, tail_blocks=1)
    assert got.tolist() == [4.0, 0.0, 1.0, 0.0, -1.0]  # ties do not count; head, tail and raw block 5 never


def test_tiny_long_context_run_trains_and_validates_focus(tmp_path):
    raw = _long(tmp_path, focus_eval=True)
    raw["dataset"].update(packing="documents", tasks={"passkey": 0.2, "kv": 0.2, "vartrack": 0.2}, val_fraction=0.1)
    raw["training"].update(max_steps=4, batch_size=4, micro_batch_size=2, eval_tokens=16 * T)
    raw["telemetry"]["log_every_tokens"] = 4 * T
    res = run_cli(["train", "--config", str(write_config(tmp_path / "long.yaml", raw))], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "artifacts" / "runs" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    want = {
        "mc/policy_changed", "mc/policy_swaps", "mc/adv_delta_random_mean", "mc/adv_delta_policy_mean",
        "val/focus/gap_recency", "val/focus/gap_random", "val/focus/horizon_loss_lensnet",
        "val/retrieval/exact_lensnet", "val/retrieval/exact_recency", "val/retrieval/kv/exact_random",
    }
    assert want <= names, sorted(want - names)
    final = [r for r in rows if "val/focus/entries_lensnet" in r][-1]
    for kind in ("recency", "random", "lensnet"):
        assert 0 < final[f"val/focus/entries_{kind}"] <= W  # every layout at W_max's budget
        assert 0 <= final[f"val/retrieval/exact_{kind}"] <= 1
    assert "policy 1" in (run / "lod_dumps.txt").read_text()
    assert {"focus_gap.png", "focus_nll.png", "retrieval.png"} <= {p.name for p in (run / "plots").glob("*.png")}
