"""The MegaContext train step: honest objective, every net learning, exact loss pieces,
checkpoint round trip, and the end-to-end CLI run with its artifacts."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from mcjax.checkpoint import Checkpointer
from mcjax.config import config_from_dict
from mcjax.data.variants import VariantSpec, sample_layouts, variant_capacity
from mcjax.megacontext import losses as L
from mcjax.megacontext.allocator import unit_scores
from mcjax.megacontext.layout import assemble, entry_count
from mcjax.model.megacontext import build_megacontext
from mcjax.train.flops import flops_per_token
from mcjax.train.mc_step import initial_stats, jit_mc_train_step, make_mc_train_step
from mcjax.train.optim import build_optimizer
from mcjax.train.sharding import batch_sharding, make_mesh
from mcjax.train.state import abstract_state, create_state, state_shardings

from conftest import run_cli, tiny_config, write_config

T = 256  # 8 blocks of 32: the last one is the protected tail


def _mc_cfg(tmp_path, dataset=(), gistnet=(), **mc):
    return config_from_dict(tiny_config(
        tmp_path,
        dataset={"context_tokens": T, "horizon": 16, **dict(dataset)},
        base_model={"depth": 1, "model_dim": 32, "head_dim": 16},
        gistnet={"layers": 1, **dict(gistnet)},
        lensnet={"layers": 1, "dim": 16},
        megacontext={
            "enabled": True, "recent_tokens": 32, "train_wc_length": 0.3, "curriculum_start": 0.3,
            "lod2_probability": 0.0, **mc,
        },
        training={"batch_size": 8, "micro_batch_size": 8, "max_steps": 200, "warmdown_ratio": 0.0, "controller_lr": 0.01},
    ))


def _setup(cfg):
    model, tx = build_megacontext(cfg), build_optimizer(cfg)
    mesh = make_mesh(cfg)
    sample = jnp.zeros((1, T), jnp.int32)
    sh = state_shardings(model, tx, mesh, sample, initial_stats)
    state = create_state(model, tx, sh, 0, sample, initial_stats)
    step = jit_mc_train_step(make_mc_train_step(model, tx, cfg), sh, batch_sharding(mesh, 1), batch_sharding(mesh, 1), mesh)
    return model, tx, sh, sample, state, step


def _batch(cfg, rng, step, tokens=None):
    spec = VariantSpec.from_config(cfg)
    target = int(cfg.megacontext.train_wc_length * T)
    b = cfg.training.batch_size
    if tokens is None:
        tokens = rng.integers(0, cfg.dataset.vocab_size, (1, b, T + 1)).astype(np.int32)
    lay = sample_layouts(spec, target, seed=0, step=step, rows=np.arange(b))[None]
    return tokens, lay, variant_capacity(target, spec)


def test_random_tokens_never_beat_uniform(tmp_path):
    """Honest objective: on uniform random tokens no entry can predict better than chance
    unless it sees its target. Losses over thousands of entries per step (all entries, the
    LOD0 ones, the horizons) stay ≥ ln V − 0.05 at every one of 200 steps. The LOD1 loss
    averages only ~96 gists per step, so single steps scatter by ±0.05 (Muon keeps moving
    the weights on noise): its 200-step mean must stay ≥ ln V − 0.05 and no step may fall
    below ln V − 0.2. A leak would drive them towards 0."""
    cfg = _mc_cfg(tmp_path)
    *_, state, step = _setup(cfg)
    rng = np.random.default_rng(0)
    ln_v = math.log(cfg.dataset.vocab_size)
    dense = ["train/loss", "mc/lod_loss/0", "mc/horizon_loss_baseline", "mc/horizon_loss_variants"]
    seen = {k: [] for k in dense + ["mc/lod_loss/1"]}
    for i in range(200):
        state, m = step(state, *_batch(cfg, rng, i))
        m = jax.device_get(m)
        for k in dense + ["mc/lod_loss/1"]:
            seen[k].append(float(m[k]))
    for k in dense:
        assert min(seen[k]) >= ln_v - 0.05, (k, min(seen[k]), ln_v)
    gist = np.array(seen["mc/lod_loss/1"])
    assert gist.mean() >= ln_v - 0.05 and gist.min() >= ln_v - 0.2, (gist.mean(), gist.min(), ln_v)
    assert np.isfinite(float(m["mc/lens_loss"]))


def test_all_nets_learn_and_restore_exactly(tmp_path):
    cfg = _mc_cfg(tmp_path, lens_loss_weight=1.0)
    model, tx, sh, sample, state, step = _setup(cfg)
    init = jax.device_get(state.params)
    rng = np.random.default_rng(1)
    text = rng.integers(0, 50, (1, 8, T + 1)).astype(np.int32)  # a small alphabet: learnable
    for i in range(10):
        state, m = step(state, *_batch(cfg, rng, i, tokens=text))
    after = jax.device_get(state.params)
    for net in ("gpt", "gistnet", "lensnet"):
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[net]), jax.tree.leaves(after[net]))]
        assert any(moved), f"{net} did not change"
    assert float(state.stats["delta_ema"]["count"]) == 10.0

    ckpt = Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
    ckpt.save(10, state, {"pos": 0}, {"step": 10})
    restored, _, meta = ckpt.restore(abstract_state(model, tx, sh, sample, initial_stats), 10)
    ckpt.close()
    assert meta["step"] == 10
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(restored.params) == {"gpt", "gistnet", "lensnet"}


def test_the_step_logs_the_read_gate_it_leaves(tmp_path):
    """mc/read_gate_mean and _max: the base's bias toward gists after the step (read_gate_init +
    scale × offset, over layers and heads) — the gate's opening shows on the training curves;
    absent without a gate."""
    from mcjax.model.gistnet import read_bias

    cfg = _mc_cfg(tmp_path, gistnet={"read_gate": True, "read_gate_init": -3.0, "read_gate_scale": 4.0})
    *_, state, step = _setup(cfg)
    for i in range(3):  # the first step's learning rate is 0 (warmup)
        state, m = step(state, *_batch(cfg, np.random.default_rng(2), i))
    bias = np.asarray(read_bias(jax.device_get(state.params["gistnet"]), -3.0, 4.0))
    assert bias.shape == (1, 2) and not np.allclose(bias, -3.0)  # the steps moved it
    np.testing.assert_allclose([float(m["mc/read_gate_mean"]), float(m["mc/read_gate_max"])], [bias.mean(), bias.max()],
                               rtol=1e-6)
    plain = _mc_cfg(tmp_path)
    *_, state, step = _setup(plain)
    assert "mc/read_gate_mean" not in step(state, *_batch(plain, np.random.default_rng(2), 0))[1]


def test_preference_loss_exact():
    costs = jnp.array([[0.0, 0.5, -0.5]])
    deltas = jnp.array([[0.0, 1.0, 2.0]])
    got = float(L.preference_loss(costs, deltas, 0.0, 1.0, 0.5))
    want = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        logit = (float(costs[0, j]) - float(costs[0, i])) / 0.5
        label = 1 / (1 + math.exp(-(float(deltas[0, j]) - float(deltas[0, i]))))
        want += math.log1p(math.exp(logit)) - label * logit
    assert got == pytest.approx(want / 3, rel=1e-6)
    # Normalisation: the labels use (Δ − mean) / std, so scaling both leaves the loss unchanged.
    assert float(L.preference_loss(costs, 3 * deltas, 0.0, 3.0, 0.5)) == pytest.approx(got, rel=1e-6)


def test_block_scores_and_layout_costs():
    k = 4
    lod = jnp.array([1, 0, 1, 0], jnp.int8)  # 16 tokens: gist, 4 tokens, gist, 4 tokens
    tokens = jnp.zeros((16, 2))
    wc = assemble(lod, tokens, jnp.zeros((4, 2)), None, 16)
    scores = jnp.where(wc.valid, jnp.arange(16, dtype=jnp.float32) / 10, 0.0)
    # entries: gist0 (0.0), tokens 4..7 (0.1..0.4), gist2 (0.5), tokens 12..15 (0.6..0.9)
    u = L.block_scores(wc, scores, lod, k)
    np.testing.assert_allclose(u, [0.0, 0.25, 0.5, 0.75], rtol=1e-6)
    u_all = jnp.stack([jnp.array([0.2, 0.4, 0.6, 0.8]), u])
    layouts = jnp.stack([jnp.zeros(4, jnp.int8), lod])
    costs = L.layout_costs(u_all, layouts)
    # baseline compresses nothing; the variant compresses blocks 0 and 2: (½(0+0.2) + ½(0.5+0.6)) / 4
    np.testing.assert_allclose(costs, [0.0, (0.1 + 0.55) / 4], rtol=1e-6)


def test_block_scores_are_the_allocators_unit_scores_per_block():
    # Random layouts over 4 superblocks of 4 blocks of 4 tokens (whole superblocks at LOD2),
    # packed into a WC wider than needed: the gather must match the allocator's segment sums.
    k, n1 = 4, 16
    rng = np.random.default_rng(0)
    lods = rng.integers(0, 2, (64, n1))
    lods = np.where(np.repeat(rng.random((64, n1 // k)) < 0.3, k, axis=1), 2, lods).astype(np.int8)
    scores = jnp.asarray(rng.uniform(-1, 1, (64, n1 * k + 8)), jnp.float32)

    def both(lod, s):
        wc = assemble(lod, jnp.zeros((n1 * k, 2)), jnp.zeros((n1, 2)), jnp.zeros((n1 // k, 2)), n1 * k + 8)
        s = jnp.where(wc.valid, s, 0.0)
        us = unit_scores(wc, s, n1, k)
        blk = jnp.arange(n1)
        want = jnp.where(lod == 0, -us.collapse[blk], jnp.where(lod == 1, us.expand[blk], us.expand[n1 + blk // k]))
        return L.block_scores(wc, s, lod, k), want

    got, want = jax.jit(jax.vmap(both))(jnp.asarray(lods), scores)
    np.testing.assert_allclose(got, want, atol=1e-6)
    grad = jax.grad(lambda s: jax.vmap(lambda l, x: both(l, x)[0].sum())(jnp.asarray(lods), s).sum())(scores)
    # each read entry gets d/ds of its block's score: 1/K per token of a LOD0 block, 1 per
    # LOD1 gist, K per LOD2 gist (its superblock's K blocks share it); padding gets nothing
    per_layout = np.asarray(grad).sum(-1)
    np.testing.assert_allclose(per_layout, np.full(64, float(n1)), rtol=1e-6)


def test_ema_moments_are_bias_corrected():
    stats = L.empty_ema()
    assert [float(x) for x in L.ema_moments(stats, 0.99)] == [0.0, 1.0]
    stats = L.ema_update(stats, jnp.array([1.0, 3.0]), 0.99)
    mean, std = L.ema_moments(stats, 0.99)
    assert float(mean) == pytest.approx(2.0, rel=1e-5) and float(std) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.slow
def test_mc_training_cli_writes_every_metric_and_artifact(tmp_path):
    # T = 128: 4 blocks of 32, the last one the protected tail; variants compress to half.
    raw = tiny_config(
        tmp_path,
        dataset={"context_tokens": 128, "horizon": 16},
        megacontext={"enabled": True, "recent_tokens": 32, "train_wc_length": 0.5, "curriculum_start": 0.75},
        training={"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_every_tokens": 1536},
        checkpoint={"every_tokens": 0, "keep": 1, "async_save": False},
    )
    raw["telemetry"]["log_every_tokens"] = 3 * 4 * 128  # every 3rd step: the profiled step 2 is not a log step
    path = write_config(tmp_path / "mc.yaml", raw)
    res = run_cli(["train", "--config", str(path)], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "artifacts" / "runs" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    required = {
        "train/loss", "train/tok_per_sec", "train/tokens_per_step", "train/grad_accum_steps",
        "mc/grad_accum_steps", "mc/lens_loss", "mc/lod_loss/0", "mc/lod_loss/1", "mc/lod_delta/1",
        "mc/adv_delta_mean", "mc/adv_delta_p95", "mc/adv_delta_std", "mc/policy_score_abs_mean",
        "mc/policy_score_std_mean", "mc/preference_corr_mean", "mc/preference_corr_max", "mc/pref_span_corr",
        "train/delta_nll_mean", "train/delta_nll_p95", "train/horizon_length", "mc/variants_mean",
        "runtime/token_budget_utilization", "mc/build_ms", "mc/variant_ms", "mc/lens_ms",
        "mc/variant_pack_ms", "mc/other_ms", "val/loss", "val/bpb", "val/mc_loss", "val/mc_bpb", "val/delta_nll",
    }
    assert required <= names, sorted(required - names)
    assert [r["step"] for r in rows if "mc/build_ms" in r] == [2], "the timing breakdown of the profiled step was not logged"
    labels = sorted((tmp_path / "artifacts" / "deltas").glob("tiny_*.parquet"))
    assert labels, "no ΔNLL label table written"
    table = pq.read_table(labels[-1])
    assert {"block_id", "action", "delta_nll", "step", "entry_delta", "score"} <= set(table.column_names)
    assert set(table.column("action").to_pylist()) <= {"collapse_lod1", "collapse_lod2"}
    assert "variant 1" in (run / "lod_dumps.txt").read_text()
    assert {p.name for p in (run / "plots").glob("*.png")} == {"loss.png", "delta_nll.png", "lens.png"}
    ckpt = tmp_path / "artifacts" / "checkpoints" / "tiny"
    assert any(ckpt.rglob("*")), "no checkpoint"


def test_bench_rejects_a_variant_length_below_the_tail(tmp_path, capsys):
    from mcjax.cli import main

    path = write_config(tmp_path / "mc.yaml", tiny_config(tmp_path, dataset={"context_tokens": 256}))
    assert main(["bench", "--config", str(path), "--wc-length", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcjax: error: --wc-length 0.1:") and "recent_tokens (32)" in err
    assert "\n" not in err


@pytest.mark.slow
def test_bench_runs_both_steps_on_cpu(tmp_path):
    from mcjax.bench import bench, table

    cfg = _mc_cfg(tmp_path)
    r = bench(cfg, batch=2, wc_length=0.3, steps=1, warmup=1)
    assert r["mc_variant_capacity"] == 96 and r["batch"] == 2
    assert r["baseline_step_ms"] > 0 and r["mc_step_ms"] > 0
    assert r["mc_other_ms"] == pytest.approx(r["mc_step_ms"] - r["mc_build_ms"] - r["mc_variant_pack_ms"] - r["mc_lens_ms"], abs=1e-3)
    # real WC entries: 2 × (256 baseline + 2 variants of at most 77 entries)
    assert 2 * (256 + 2 * 46) <= r["mc_wc_entries"] <= 2 * (256 + 2 * 77)
    assert "baseline" in table(r) and "mc controller" in table(r)


@pytest.mark.slow
def test_bench_times_the_edits_and_skips_what_cannot_fit(tmp_path, monkeypatch):
    """With counterfactual edits the bench also times the step without them (their cost); a
    mode whose program needs more memory than the device has is reported, not run."""
    import mcjax.bench as bench_mod

    monkeypatch.setattr(bench_mod.MCRunner, "part_times", lambda *_: dict.fromkeys(("build_ms", "variant_pack_ms", "lens_ms"), 0.0))
    real = bench_mod._program_gb
    # the plain step's state holds the GPT's own tree; the MegaContext steps' {"gpt", "gistnet", "lensnet"}
    monkeypatch.setattr(bench_mod, "_program_gb", lambda fn, state, *a: 99.0 if "gpt" not in state.params else real(fn, state, *a))
    monkeypatch.setattr(bench_mod, "device_limit_gb", lambda: 50.0)  # the plain step "needs" 99 GB
    cfg = _mc_cfg(tmp_path, num_policy_variants=1, edit_candidates=4)
    r = bench_mod.bench(cfg, batch=2, wc_length=0.3, steps=1, warmup=1)
    assert "baseline_step_ms" not in r and r["baseline_skipped"] == "needs 99.0 GB, the device has 50.0"
    assert r["mc_no_edits_step_ms"] > 0 and r["mc_step_ms"] > 0
    assert r["mc_edit_throughput_share"] == pytest.approx(r["mc_no_edits_step_ms"] / r["mc_step_ms"], abs=1e-3)  # rounded
    text = bench_mod.table(r)
    assert "baseline    not run: its program needs 99.0 GB, the device has 50.0" in text
    assert "counterfactual edits per sequence" in text and "\nmc " in text


@pytest.mark.slow
def test_bench_counts_real_entries_from_its_layouts_when_t_is_8_w_max(tmp_path, monkeypatch):
    # T = 256 = 8 · W_max (blocks of 16): every WC is 32 wide, so per-entry FLOPs are far below
    # a 256-token sequence's: FLOPs / (FLOPs per token at T) printed 116 entries for these 186.
    import mcjax.bench as bench_mod

    peak = 1e6  # CPU has no known peak; any value checks the MFU arithmetic
    monkeypatch.setattr(bench_mod, "peak_flops", lambda: peak)
    # the controller's part timings (six more compiles) are test_bench_runs_both_steps_on_cpu's business
    monkeypatch.setattr(bench_mod.MCRunner, "part_times", lambda *_: dict.fromkeys(("build_ms", "variant_pack_ms", "lens_ms"), 0.0))
    cfg = _mc_cfg(tmp_path, dataset={"block_size": 16}, gistnet={"kind": "mean"}, wc_capacity=32, recent_tokens=16)
    batch, wc_length, k = 2, 0.125, 16
    r = bench_mod.bench(cfg, batch=batch, wc_length=wc_length, steps=1, warmup=1)

    # the layouts bench times: mc_setup's sampler call at variant length 0.125 · 256
    lay = sample_layouts(VariantSpec.from_config(cfg), round(wc_length * T), seed=0, step=0, rows=np.arange(batch))
    counts = np.array([[entry_count(v, k) for v in row] for row in lay])  # [B, 1 + N]
    assert (counts == 31).all()  # baseline and variants alike: 15 gists + the one-block tail
    printed = re.search(r"mc: ([\d,]+) real WC entries per step \(([\d,]+) baseline \+ ([\d,]+) in variants\)",
                        bench_mod.table(r))
    assert printed, bench_mod.table(r)
    got = [int(g.replace(",", "")) for g in printed.groups()]
    assert got == [counts.sum(), counts[:, 0].sum(), counts[:, 1:].sum()] == [186, 62, 124]
    assert r["mc_wc_entries"] == counts.sum() and r["mc_variant_capacity"] == 32

    # MFU(real): every entry at its WC's width (32 for both kinds here), never at T; MFU(input)
    # and the baseline row: the plain GPT's FLOPs per token at T
    def fpt(seq):
        return flops_per_token(cfg.base_model.depth, cfg.model_dim, cfg.dataset.vocab_size, seq)

    chips = jax.device_count()
    real = counts.sum() * fpt(32) / (batch * T)
    assert r["mc_mfu"] == pytest.approx(r["mc_tok_per_sec"] * real / (peak * chips), rel=1e-3)
    assert r["mc_mfu_input"] == pytest.approx(r["mc_tok_per_sec"] * fpt(T) / (peak * chips), rel=1e-3)
    assert r["baseline_mfu"] == pytest.approx(r["baseline_tok_per_sec"] * fpt(T) / (peak * chips), rel=1e-3)


def test_compact_positions_put_every_entry_at_its_slot(tmp_path):
    """megacontext.positions: compact — the base (and the attention rival) read a WC with
    gists at RoPE positions 0, 1, 2, …: MCForward.hidden equals the GPT on the same entries
    at those positions, and differs from the global reading of the same WC."""
    from mcjax.megacontext.attention_rival import tail_attention
    from mcjax.train.mc_step import MCForward
    from mcjax.train.setup import build_parts

    cfg = _mc_cfg(tmp_path, positions="compact")
    parts = build_parts(cfg)
    params = parts.fresh().params
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    fw = MCForward(parts.model, cfg)
    tokens = jax.random.randint(jax.random.key(0), (1, T + 1), 0, 300)
    n1 = T // cfg.dataset.block_size
    lod = np.zeros(n1, np.int8)
    lod[: n1 // 2] = 1  # the first half as gists: global positions jump by K there
    wc = fw.assemble(fw.tree(params, tokens), jnp.asarray(lod)[None, None], T)
    n = int(wc.valid.sum())
    slots = jnp.where(wc.valid, jnp.arange(T), 0)
    assert (np.asarray(wc.pos)[0, :n] != np.arange(n)).any()
    gpt = lambda pos: fw.gpt.apply({"params": params["gpt"]}, embeddings=wc.emb, positions=pos, spans=wc.span)  # noqa: E731
    got = np.asarray(fw.hidden(params, wc))[0, :n]
    np.testing.assert_allclose(got, np.asarray(gpt(slots))[0, :n], atol=1e-5)
    assert np.abs(got - np.asarray(gpt(wc.pos))[0, :n]).max() > 1e-3
    mass = tail_attention(fw.gpt, params["gpt"], wc, 8, positions="compact")
    want = tail_attention(fw.gpt, params["gpt"], wc._replace(pos=slots), 8, positions="global")
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want), atol=1e-6)
