"""Tests for mcjax.telemetry: JSONL/TensorBoard/W&B sinks, resume truncation, process 0 only,
config mirroring, summary, and the plain-text fallback of the progress bar.

W&B runs only in offline mode (one test) or disabled; nothing here reaches the network.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mcjax.config import config_from_dict, load_config
from mcjax.telemetry import Telemetry
from mcjax.telemetry.progress import Progress
from mcjax.telemetry.wandb_sink import run_id


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: never go online
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # keep ~ clean
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def make_cfg(tmp_path: Path, **telemetry: Any):
    return config_from_dict({
        "name": "t",
        "dataset": {"splits": {"train": {"source": "builtin", "output_path": str(tmp_path / "d/train.arrow")}}},
        "training": {"max_steps": 1},
        "telemetry": {"wandb": "disabled", **telemetry},
    })


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_events(tb_dir: Path) -> list[Any]:
    """Read TensorBoard event files by TFRecord framing: len u64, crc u32, data, crc u32."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    for f in files:
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            events.append(ev)
            pos += 12 + n + 4
    return events


def tb_values(events: list[Any]) -> dict[str, dict[int, Any]]:
    """tag -> step -> the summary value proto."""
    out: dict[str, dict[int, Any]] = {}
    for ev in events:
        for v in ev.summary.value:
            out.setdefault(v.tag, {})[ev.step] = v
    return out


def test_all_sinks(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, wandb="offline")
    run_dir = tmp_path / "run"
    hist = np.array([[0.0, 1.0], [2.0, np.nan]], dtype=np.float32)
    with Telemetry(cfg, run_dir) as tel:
        for step in (1, 2, 3):
            loss = np.float32(1.0 / step)
            other = float("nan") if step == 2 else np.array(step * 10.0)
            tel.log(step, {"train/loss": loss, "train/other": other}, {"w": hist * step})
        tel.log_text(3, "dump", "+--+\n|ab|\n+--+")
        tel.summary({"train/loss": 0.25, "val/bpb": float("nan")})
    tel.close()  # idempotent

    # JSONL: one record per call, NaN -> null, histograms of the finite values
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 3]
    assert all(isinstance(r["time"], float) for r in recs)
    assert [r["train/loss"] for r in recs[:3]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [r["train/other"] for r in recs[:3]] == [10.0, None, 30.0]
    h = recs[2]["w"]
    assert sum(h["hist"]["counts"]) == 3 and len(h["hist"]["edges"]) == 33
    assert (h["min"], h["max"], h["mean"]) == pytest.approx((0.0, 6.0, 3.0))
    assert recs[3]["dump"] == "+--+\n|ab|\n+--+"

    # TensorBoard: scalars (NaN left out: undefined, and TensorBoard warns on each), histogram and text
    vals = tb_values(read_events(run_dir / "tb"))
    assert {s: v.simple_value for s, v in vals["train/loss"].items()} == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert {s: v.simple_value for s, v in vals["train/other"].items()} == pytest.approx({1: 10.0, 3: 30.0})
    assert vals["w"][3].histo.num == 3 and vals["w"][3].histo.max == 6.0
    assert any(tag.startswith("dump") for tag in vals)

    # W&B offline run directory with its .wandb log
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))

    # Config mirrored beside the run, summary written
    assert load_config(run_dir / "config.yaml") == cfg
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"train/loss": 0.25, "val/bpb": None}


def test_resume_truncates_jsonl(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "run"
    with Telemetry(cfg, run_dir) as tel:
        for step in range(1, 6):
            tel.log(step, {"loss": float(step)})
    path = run_dir / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 6, "loss": 6.0, "ti')  # torn by a kill -9
    with Telemetry(cfg, run_dir, resume_step=3) as tel:
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
        for step in (4, 5):
            tel.log(step, {"loss": step * 100.0})
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs] == [1.0, 2.0, 3.0, 400.0, 500.0]
    assert not list(run_dir.glob("*.tmp"))


def test_resume_torn_line_within_kept_steps(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, tensorboard=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with Telemetry(cfg, run_dir, resume_step=5) as tel:
        tel.log(2, {"loss": 2.0})
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0)]


def test_resume_without_previous_file(tmp_path: Path) -> None:
    with Telemetry(make_cfg(tmp_path, tensorboard=False), tmp_path / "run", resume_step=7) as tel:
        tel.log(8, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "run/metrics.jsonl")] == [8]


def test_not_main_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Telemetry(make_cfg(tmp_path), run_dir, resume_step=2, is_main=False) as tel:
        tel.log(1, {"loss": 1.0}, {"h": np.ones(4)})
        tel.log_text(1, "dump", "x")
        tel.summary({"loss": 1.0})
    assert not run_dir.exists()


def test_disabled_wandb_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    run_dir = tmp_path / "run"
    with Telemetry(make_cfg(tmp_path, wandb="disabled", tensorboard=False), run_dir) as tel:
        tel.log(1, {"loss": 1.0}, {"h": np.arange(5.0)})
        tel.log_text(1, "dump", "x")
        tel.summary({"loss": 1.0})
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert not list(run_dir.rglob("*wandb*")) and not (tmp_path / "wandb-home").exists()



def test_missing_wandb_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcjax.errors import ConfigError
    from mcjax.telemetry.wandb_sink import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="telemetry.wandb: 'offline' needs the wandb package, which is not installed"):
        WandbSink(make_cfg(tmp_path, wandb="offline"), tmp_path / "run")

def test_histogram_all_nan_does_not_crash(tmp_path: Path) -> None:
    with Telemetry(make_cfg(tmp_path), tmp_path / "run") as tel:
        tel.log(1, {"loss": float("inf")}, {"h": np.full(3, np.nan)})
    (rec,) = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert rec["loss"] is None and rec["h"]["mean"] is None and sum(rec["h"]["hist"]["counts"]) == 0


def test_wandb_run_id_is_stable(tmp_path: Path) -> None:
    a = run_id("my run/1", tmp_path / "a")
    assert a == run_id("my run/1", tmp_path / "a") != run_id("my run/1", tmp_path / "b")
    assert a.startswith("my-run-1-")


def test_progress_plain_lines_without_tty(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(20, initial=0)
    for step in range(1, 21):
        bar.update(step, loss=1.0 / step, tok_per_sec=1234.0)
    bar.write("eval: ok")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11 and lines[-1] == "eval: ok"
    assert lines[0].startswith("step 2/20 (10%)") and "loss 0.5000" in lines[0] and "tok/s 1,234" in lines[0]
    assert lines[-2].startswith("step 20/20 (100%)")

    quiet = Progress(20, enabled=False)
    quiet.update(20, 0.1, float("nan"))
    quiet.write("nothing")
    quiet.close()
    assert capsys.readouterr().err == ""
