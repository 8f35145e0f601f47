"""Tests for mcjax.telemetry.plots: reading metrics.jsonl and writing the panel PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mcjax.telemetry.plots import PANELS, main, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HIST = {"hist": {"counts": [1, 2], "edges": [0.0, 0.5, 1.0]}, "mean": 0.5, "std": 0.1, "min": 0.0, "max": 1.0}


def _write_metrics(path: Path) -> Path:
    records = [
        {"step": 1, "time": 10.0, "train/loss": 3.0, "train/delta_nll_mean": 0.5, "mc/lod_delta/1": None},
        {"step": 2, "time": 11.0, "train/loss": None, "train/delta_nll_mean": 0.4, "mc/lod_delta/1": 0.2,
         "gist/norm": HIST, "sample/text": "hello", "flag": True},
        {"step": 2, "time": 11.5, "val/loss": 2.5},
        {"step": 3, "time": 12.0, "train/loss": 2.0, "train/delta_nll_mean": 0.3, "train/tokens": 300},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "train/lo'  # torn last line
    path.write_text(text, encoding="utf-8")
    return path


def test_read_metrics_exact(tmp_path: Path) -> None:
    m = read_metrics(_write_metrics(tmp_path / "metrics.jsonl"))
    assert set(m) == {"train/loss", "train/delta_nll_mean", "mc/lod_delta/1", "val/loss", "train/tokens"}
    expected = {
        "train/loss": ([1, 3], [3.0, 2.0]),
        "train/delta_nll_mean": ([1, 2, 3], [0.5, 0.4, 0.3]),
        "mc/lod_delta/1": ([2], [0.2]),
        "val/loss": ([2], [2.5]),
        "train/tokens": ([3], [300.0]),
    }
    for name, (steps, values) in expected.items():
        s, v = m[name]
        assert s.dtype == np.int64 and v.dtype == np.float64
        np.testing.assert_array_equal(s, steps)
        np.testing.assert_array_equal(v, values)


def test_read_metrics_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n{not json\n{"step": 2, "train/loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_plot_run_writes_expected_pngs(tmp_path: Path) -> None:
    metrics = _write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "nested" / "plots"
    written = plot_run(metrics, out)
    assert written == [out / "loss.png", out / "delta_nll.png"]
    # No lens.png (no lens metrics) and no leftover temp files.
    assert sorted(p.name for p in out.iterdir()) == ["delta_nll.png", "loss.png"]
    for p in written:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000


def test_plot_run_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        plot_run(tmp_path / "nope.jsonl", tmp_path / "plots")


def test_main_default_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = _write_metrics(tmp_path / "metrics.jsonl")
    assert main([str(metrics)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "plots" / "loss.png"), str(tmp_path / "plots" / "delta_nll.png")]


def test_panels_shape() -> None:
    assert [stem for stem, _, _ in PANELS] == ["loss", "delta_nll", "lens", "focus_gap", "focus_nll", "retrieval", "edits",
                                               "needle", "read_gate", "focus", "latency"]
    assert all(title and names for _, title, names in PANELS)


def test_lod_timeline_png(tmp_path: Path) -> None:
    from mcjax.telemetry.plots import plot_lod_timeline

    layouts = np.array([[0, 0, -1, -1], [1, 0, 0, -1], [2, 2, 1, 0]])
    out = plot_lod_timeline(layouts, [1, 2, 3], tmp_path / "sub" / "lod.png", title="t")
    assert out == tmp_path / "sub" / "lod.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob(".*tmp"))
