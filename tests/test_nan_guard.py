"""A run that goes non-finite stops at its first non-finite step with one line and exit code 3;
every checkpoint it leaves is finite, and `--resume` continues from the newest one.

The NaN has a natural cause: a huge embedding learning rate. The GPT RMS-normalises its
embeddings, so they grow by ~lr per step without changing the loss until they overflow
float32 in the backward pass. Measured on CPU: `embedding_lr: 1e32` gives NaN gradients at
step 7 of the tiny plain GPT below (steps 1–6 finite) and at step 3 of the tiny MegaContext
model; lower rates blow up later (1e33: step 5), 1e30 not within 12 plain steps.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config, write_config
from mcjax.checkpoint import Checkpointer
from mcjax.config import config_from_dict
from mcjax.errors import NonFiniteError
from mcjax.train.nan_guard import NanGuard

ERROR = re.compile(
    r"^mcjax: error: training went non-finite at step (\d+): (train/loss|train/grad_norm) (nan|inf|-inf)(, [^;]+)?; "
    r"stopped\. Last finite checkpoint: step (\d+) \((.+)\), which --resume continues from$"
)


# ----------------------------------------------------------------------------- the host check


def _flag(ok: bool):
    return jnp.asarray(ok)


def _metrics(loss: float, gnorm: float) -> dict:
    return {"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(gnorm)}


def test_guard_reports_the_first_non_finite_step_one_step_late(tmp_path):
    guard = NanGuard(True, tmp_path / "ckpt", last_saved=None)
    guard.dispatched(1, _flag(True), _metrics(5.0, 1.0))
    guard.dispatched(2, _flag(True), _metrics(4.0, 1.0))
    guard.saved(2)
    guard.dispatched(3, _flag(False), _metrics(4.0, math.nan))  # checks step 2: fine
    with pytest.raises(NonFiniteError) as e:
        guard.dispatched(4, _flag(False), _metrics(math.nan, math.nan))  # checks step 3
    assert str(e.value) == (
        f"training went non-finite at step 3: train/grad_norm nan; stopped. "
        f"Last finite checkpoint: step 2 ({tmp_path / 'ckpt' / '2'}), which --resume continues from"
    )


def test_guard_checks_the_pending_step_at_once_before_a_save(tmp_path):
    guard = NanGuard(True, tmp_path, last_saved=None)
    guard.dispatched(1, _flag(True), _metrics(5.0, 1.0))
    guard.check()
    guard.check()  # nothing pending: no-op
    guard.dispatched(2, _flag(False), _metrics(math.inf, 2.0))
    with pytest.raises(NonFiniteError, match=r"^training went non-finite at step 2: train/loss inf; .*"
                       r"Last finite checkpoint: none yet \(--resume would start from step 0\)$"):
        guard.check()


def test_guard_names_a_non_finite_state_with_finite_loss_and_without_nan_check(tmp_path):
    guard = NanGuard(False, tmp_path, last_saved=4)
    for step in (5, 6, 7):  # without nan_check, unlogged steps are never pulled
        guard.dispatched(step, _flag(False), _metrics(3.0, 0.5))
    with pytest.raises(NonFiniteError) as e:
        guard.check()
    msg = str(e.value)
    assert msg.startswith("training went non-finite at step 7 (training.nan_check is off: an earlier unchecked step")
    assert "the train state its update made; train/loss 3.0000 and train/grad_norm 0.5 were finite" in msg


def test_nan_check_is_on_by_default(tmp_path):
    assert config_from_dict(tiny_config(tmp_path)).training.nan_check is True


def test_step_flag_covers_loss_and_the_new_state(tmp_path):
    """The flag of the jitted step: true on a normal step; false when a param is NaN (the loss
    is then NaN), and false when only the optimizer state is Inf (loss and grad norm finite)."""
    from mcjax.model.gpt import build_gpt
    from mcjax.train.optim import build_optimizer
    from mcjax.train.sharding import batch_sharding, make_mesh
    from mcjax.train.state import create_state, state_shardings
    from mcjax.train.step import FINITE, jit_train_step, make_train_step

    cfg = config_from_dict(tiny_config(tmp_path, training={"micro_batch_size": 8}))
    model, tx, mesh = build_gpt(cfg), build_optimizer(cfg), make_mesh(cfg)
    sample = jnp.zeros((1, 64), jnp.int32)
    sh = state_shardings(model, tx, mesh, sample)
    step = jit_train_step(make_train_step(model, tx, cfg), sh, batch_sharding(mesh, 1), mesh)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 300, (1, 8, 65)), jnp.int32)

    def run(poison):
        state = create_state(model, tx, sh, 0, sample)
        state = state.replace(**poison(state)) if poison else state
        _, m = step(state, batch)
        return {k: float(v) for k, v in jax.device_get(m).items()}

    def nan_param(s):
        return {"params": {**s.params, "wte": s.params["wte"].at[0, 0].set(jnp.nan)}}

    def inf_moment(s):  # one AdamW second moment: the update stays finite (m / sqrt(inf) = 0)
        leaves, tree = jax.tree.flatten(s.opt_state)
        i = next(i for i, x in enumerate(leaves) if x.shape == s.params["wte"].shape)
        leaves[i] = leaves[i].at[0, 0].set(jnp.inf)
        return {"opt_state": jax.tree.unflatten(tree, leaves)}

    ok, nan, inf = run(None), run(nan_param), run(inf_moment)
    assert ok[FINITE] == 1.0 and math.isfinite(ok["train/loss"])
    assert nan[FINITE] == 0.0 and math.isnan(nan["train/loss"])
    assert inf[FINITE] == 0.0 and math.isfinite(inf["train/loss"]) and math.isfinite(inf["train/grad_norm"])


# ----------------------------------------------------------------------------- end to end


def _restore_all(raw: dict, ckpt_dir: Path) -> list[int]:
    """Restore every checkpoint in `ckpt_dir` as the loop does; assert each state is finite."""
    from mcjax.model.gpt import build_gpt
    from mcjax.model.megacontext import build_megacontext
    from mcjax.train.mc_step import initial_stats
    from mcjax.train.optim import build_optimizer
    from mcjax.train.sharding import make_mesh
    from mcjax.train.state import abstract_state, state_shardings

    cfg = config_from_dict(raw)
    mc = cfg.megacontext.enabled
    model, tx, mesh = (build_megacontext(cfg) if mc else build_gpt(cfg)), build_optimizer(cfg), make_mesh(cfg)
    stats = initial_stats if mc else None
    sample = jnp.zeros((1, cfg.dataset.context_tokens), jnp.int32)
    abstract = abstract_state(model, tx, state_shardings(model, tx, mesh, sample, stats), sample, stats)
    ckpt = Checkpointer(ckpt_dir, keep=10, async_save=False)
    steps = ckpt.all_steps()
    for step in steps:
        state, _, meta = ckpt.restore(abstract, step)
        assert meta["step"] == step == int(state.step)
        for path, x in jax.tree_util.tree_leaves_with_path(state):
            assert np.isfinite(np.asarray(x)).all(), (step, jax.tree_util.keystr(path))
    ckpt.close()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [str(s) for s in sorted(steps)], "a save was left unfinished"
    return sorted(steps)


def _stopped(res) -> tuple[int, str, int]:
    """(step, quantity, checkpoint step) of a run stopped by the guard: exit code 3, one error line."""
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("mcjax: error:")]
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr[-3000:]
    m = ERROR.match(errors[0])
    assert m, errors[0]
    return int(m[1]), m[2], int(m[5])


def _check_stop_and_resume(tmp_path: Path, raw: dict, *, every: int, keep: int) -> tuple[int, list[int]]:
    """Run until the guard stops it; check the checkpoints, the log and a `--resume` that stops again."""
    cfg_path = write_config(tmp_path / "c.yaml", raw)
    ckpt_dir = tmp_path / "artifacts/checkpoints/tiny"
    res = run_cli(["train", "--config", str(cfg_path)], cwd=tmp_path)
    step, quantity, saved = _stopped(res)
    assert f"({ckpt_dir / str(saved)})" in res.stderr

    steps = _restore_all(raw, ckpt_dir)
    last_good = (step - 1) // every * every  # the last save cadence before the first bad step
    assert steps == [s for s in range(every, last_good + 1, every)][-keep:], steps  # none lost to rotation
    assert saved == steps[-1] and all(s < step for s in steps)
    rows = [json.loads(line) for line in (tmp_path / "artifacts/runs/tiny/metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert logged and all(v is not None for s, v in logged.items() if s < step)  # earlier logged steps finite

    res = run_cli(["train", "--config", str(cfg_path), "--resume"], cwd=tmp_path)
    assert f"resumed 'tiny' from step {saved} ({ckpt_dir})" in res.stdout, res.stdout[-2000:]
    assert _stopped(res) == (step, quantity, saved)  # the same data and LR blow up at the same step
    assert _restore_all(raw, ckpt_dir) == steps
    return step, steps


@pytest.mark.slow
def test_plain_run_stops_at_the_first_non_finite_step_and_resumes(tmp_path, prepared_data):
    """Checkpoints every 2 steps (async), logs every 4: the first non-finite step (7 on CPU) is
    neither logged nor saved, so the one-step-late check stops the run."""
    tps = 8 * 64
    raw = tiny_config(tmp_path, training={"max_steps": 12, "embedding_lr": 1e32},
                      checkpoint={"every_tokens": 2 * tps, "keep": 2, "async_save": True})
    raw["dataset"] = tiny_config(prepared_data)["dataset"]  # reuse the prepared data
    raw["telemetry"]["log_every_tokens"] = 4 * tps
    step, steps = _check_stop_and_resume(tmp_path, raw, every=2, keep=2)
    assert 4 < step < 12 and len(steps) == 2


@pytest.mark.slow
def test_megacontext_run_stops_before_saving_a_non_finite_state_and_resumes(tmp_path):
    """MegaContext, checkpoints every step, logs every 4th (and step 2: profiled): the first
    non-finite step (3 on CPU) is a save step, so the check before the save stops the run."""
    tps = 4 * 128
    raw = tiny_config(  # T = 128: 4 blocks, the last the protected tail (the first run prepares its data)
        tmp_path,
        dataset={"context_tokens": 128},
        base_model={"depth": 1, "model_dim": 32, "head_dim": 16},
        gistnet={"layers": 1},
        lensnet={"layers": 1, "dim": 16},
        megacontext={"enabled": True, "recent_tokens": 32, "train_wc_length": 0.5, "curriculum_start": 0.5},
        training={"max_steps": 8, "batch_size": 4, "micro_batch_size": 4, "embedding_lr": 1e32},
        checkpoint={"every_tokens": tps, "keep": 2, "async_save": False},
    )
    raw["telemetry"]["log_every_tokens"] = 4 * tps
    step, steps = _check_stop_and_resume(tmp_path, raw, every=1, keep=2)
    assert 2 < step < 8 and len(steps) == 2
