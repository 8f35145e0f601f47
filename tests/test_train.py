"""End to end: the loss falls, 1 and 8 devices agree, and a killed run resumes exactly."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, run_cli, tiny_config, write_config
from mcjax.config import config_from_dict

TOKENS_PER_STEP = 8 * 64


def _cfg(root: Path, shared: Path, **sections) -> dict:
    cfg = tiny_config(root, **sections)
    cfg["dataset"] = tiny_config(shared)["dataset"]  # reuse the prepared data
    return cfg


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _records(run_dir) if "train/loss" in r}


def test_loss_falls_and_artifacts_are_written(tmp_path, prepared_data):
    from mcjax.train.loop import train

    raw = _cfg(tmp_path, prepared_data, training={"max_steps": 40, "eval_every_tokens": 20 * TOKENS_PER_STEP},
               checkpoint={"every_tokens": 20 * TOKENS_PER_STEP})
    card = train(config_from_dict(raw), log=lambda *_: None)
    run_dir = tmp_path / "artifacts/runs/tiny"
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    assert losses[1] == pytest.approx(math.log(300), abs=0.05)  # zero-initialised head
    assert max(losses[s] for s in range(36, 41)) < losses[1] - 1.5
    recs = _records(run_dir)
    vals = [r["val/loss"] for r in recs if "val/loss" in r]
    assert len(vals) == 2 and vals[-1] < math.log(300) - 1.5 and card["val/loss"] == vals[-1]
    assert all(r["train/tokens_per_step"] == TOKENS_PER_STEP for r in recs if "train/loss" in r)
    assert all(r["train/grad_accum_steps"] == 2 for r in recs if "train/loss" in r)
    assert any("train/tok_per_sec" in r for r in recs)
    assert 0 < card["val/bpb"] < 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    steps = sorted(int(p.name) for p in (tmp_path / "artifacts/checkpoints/tiny").iterdir() if p.name.isdigit())
    assert steps == [20, 40]


def test_one_and_eight_devices_agree(tmp_path, prepared_data):
    """Same losses on 1 CPU device and on a 4×2 (data × fsdp) mesh of 8, within 2e-4."""
    runs = {}
    for devices, mesh in [(1, {"data": -1}), (8, {"data": 4, "fsdp": 2})]:
        root = tmp_path / f"d{devices}"
        root.mkdir()
        raw = _cfg(root, prepared_data, mesh=mesh, training={"max_steps": 8, "micro_batch_size": 8})
        res = run_cli(["train", "--config", str(write_config(root / "c.yaml", raw))], cwd=root, devices=devices)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[devices] = _losses(root / "artifacts/runs/tiny")
    assert sorted(runs[1]) == list(range(1, 9))
    for step, loss in runs[1].items():
        assert runs[8][step] == pytest.approx(loss, abs=2e-4), step


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, prepared_data):
    """kill -9 mid-run, `--resume`: every step's loss equals the uninterrupted run's, exactly."""
    steps, every = 40, 8

    def config(root: Path) -> Path:
        root.mkdir()
        raw = _cfg(root, prepared_data, training={"max_steps": steps},
                   checkpoint={"every_tokens": every * TOKENS_PER_STEP, "async_save": True})
        return write_config(root / "c.yaml", raw)

    ref_cfg = config(tmp_path / "ref")
    res = run_cli(["train", "--config", str(ref_cfg)], cwd=ref_cfg.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    reference = _losses(ref_cfg.parent / "artifacts/runs/tiny")

    cfg = config(tmp_path / "killed")
    root = cfg.parent
    proc = subprocess.Popen([sys.executable, "-m", "mcjax.cli", "train", "--config", str(cfg)],
                            cwd=root, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, ckpts = root / "artifacts/runs/tiny/metrics.jsonl", root / "artifacts/checkpoints/tiny"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        saved = [p for p in ckpts.glob("*") if p.name.isdigit() and int(p.name) >= 2 * every] if ckpts.exists() else []
        if saved and metrics.exists() and len(metrics.read_text().splitlines()) >= 2 * every + 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    logged_before = len(_losses(root / "artifacts/runs/tiny"))
    assert logged_before < steps

    res = run_cli(["train", "--config", str(cfg)], cwd=root)
    assert res.returncode == 2 and "pass --resume" in res.stderr
    res = run_cli(["train", "--config", str(cfg), "--resume"], cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = _losses(root / "artifacts/runs/tiny")
    assert sorted(resumed) == list(range(1, steps + 1))  # no step lost or logged twice
    assert resumed == reference  # bit-exact on CPU


def test_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path, prepared_data):
    """training.time_limit_s: the run stops after the step that crosses the limit — a
    checkpoint, the summary and plots as at the end — and --resume trains the rest."""
    root = tmp_path / "limited"
    root.mkdir()
    cfg = write_config(root / "c.yaml", _cfg(root, prepared_data, training={"max_steps": 6, "time_limit_s": 0.01}))
    res = run_cli(["train", "--config", str(cfg)], cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step 1: training.time_limit_s (0.01 s) reached; resume with --resume" in res.stdout + res.stderr
    assert sorted(p.name for p in (root / "artifacts/checkpoints/tiny").iterdir() if p.name.isdigit()) == ["1"]
    run_dir = root / "artifacts/runs/tiny"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1.0 and (run_dir / "plots").is_dir()
    res = run_cli(["train", "--config", str(cfg), "--resume", "training.time_limit_s=0"], cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(_losses(run_dir)) == list(range(1, 7))  # every step once


def _launch_local(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`launch/run.sh local n --cpu -- <args>`: n processes of one CPU device each."""
    import os

    from conftest import REPO

    env = cli_env()
    env.pop("XLA_FLAGS")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run([str(REPO / "launch/run.sh"), "local", str(n), "--cpu", "--", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_through_the_launcher(tmp_path, prepared_data):
    """`launch/run.sh local 2 --cpu`: two processes join one 2-device mesh; only process 0 logs."""
    raw = _cfg(tmp_path, prepared_data, training={"max_steps": 4, "micro_batch_size": 8})
    cfg = write_config(tmp_path / "c.yaml", raw)
    res = _launch_local(2, ["train", "--config", str(cfg)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 device(s) {'data': 2" in res.stdout and res.stdout.count("report card") == 1
    assert sorted(_losses(tmp_path / "artifacts/runs/tiny")) == [1, 2, 3, 4]


def test_two_slurm_tasks_join_from_the_slurm_environment(tmp_path, prepared_data):
    """Two processes started as srun would start them (SLURM_* variables only, one node, two
    tasks): they find the coordinator from SLURM_STEP_NODELIST and train one 2-device mesh."""
    import socket

    raw = _cfg(tmp_path, prepared_data, training={"max_steps": 3, "micro_batch_size": 8})
    cfg = write_config(tmp_path / "c.yaml", raw)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = cli_env()
        env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2", MCJAX_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "mcjax.cli", "train", "--config", str(cfg)], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "2 device(s) {'data': 2" in outs[0][0] and "report card" in outs[0][0]
    assert "report card" not in outs[1][0]  # only process 0 logs
    assert sorted(_losses(tmp_path / "artifacts/runs/tiny")) == [1, 2, 3]


def test_resume_on_another_device_or_process_count(tmp_path, prepared_data):
    """Elastic resume: 4 steps on a 4×2 mesh of 8 devices (or on 2 processes), then `--resume`
    on 1 device for steps 5–8, and the other way round: the same data position and parameters,
    so every step's loss matches the uninterrupted 1-device run within the 1-vs-8 tolerance
    (2e-4). The data stream does not depend on the process count (data/pipeline.py)."""
    meshes = {"1 device": ["mesh.data=-1", "mesh.fsdp=1"], "8 devices": ["mesh.data=4", "mesh.fsdp=2"],
              "2 processes": ["mesh.data=-1", "mesh.fsdp=1"]}

    def run(root: Path, where: str, steps: int, *flags: str) -> subprocess.CompletedProcess:
        root.mkdir(exist_ok=True)
        raw = _cfg(root, prepared_data, training={"max_steps": 8, "micro_batch_size": 8, "warmdown_ratio": 0.0})
        cfg = write_config(root / "c.yaml", raw)
        args = ["train", "--config", str(cfg), *flags, f"training.max_steps={steps}", *meshes[where]]
        if where == "2 processes":
            res = _launch_local(2, args, root)
        else:
            res = run_cli(args, cwd=root, devices=int(where.split()[0]))
        assert res.returncode == 0, res.stderr[-2000:]
        return res

    run(tmp_path / "ref", "1 device", 8)
    reference = _losses(tmp_path / "ref/artifacts/runs/tiny")
    for first, then in [("8 devices", "1 device"), ("1 device", "8 devices"),
                        ("2 processes", "1 device"), ("1 device", "2 processes")]:
        root = tmp_path / f"{first}-{then}".replace(" ", "_")
        run(root, first, 4)
        res = run(root, then, 8, "--resume")
        assert "resumed 'tiny' from step 4" in res.stdout + res.stderr
        losses = _losses(root / "artifacts/runs/tiny")
        assert sorted(losses) == list(range(1, 9))
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, abs=2e-4), (first, then, step)
