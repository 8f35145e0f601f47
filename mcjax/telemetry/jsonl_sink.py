"""JSONL sink: `run_dir/metrics.jsonl`, one JSON object per logged step.

Each line is `{"step": int, "time": unix seconds, <scalar>: value, <hist>: {...}}`.
Non-finite floats are written as `null`. Every record is flushed as it is written, so a
`kill -9` loses at most the last (torn) line. On resume the file is first cut back to the
complete records with step ≤ resume_step (atomically), then appended to.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HIST_BINS = 32


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN/±inf become None (JSON null)."""
    return x if math.isfinite(x) else None


def histogram_record(values: np.ndarray) -> dict[str, Any]:
    """Summary of finite `values` [N]: 32-bin histogram plus mean/std/min/max (null if empty)."""
    counts, edges = np.histogram(values, bins=HIST_BINS)
    empty = values.size == 0
    stat = (lambda f: None) if empty else (lambda f: _num(float(f(values))))
    return {
        "hist": {"counts": counts.tolist(), "edges": [float(e) for e in edges]},
        "mean": stat(np.mean),
        "std": stat(np.std),
        "min": stat(np.min),
        "max": stat(np.max),
    }


def truncate(path: Path, resume_step: int) -> None:
    """Keep only complete records with step ≤ resume_step; write temp + os.replace."""
    if not path.exists():
        return
    kept: list[str] = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn last line from a crash
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlSink:
    """Appends one JSON line per `log` call to `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            truncate(self.path, resume_step)
        self._f = self.path.open("a", encoding="utf-8", buffering=1)

    def _write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def log(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        record: dict[str, Any] = {"step": step, "time": time.time()}
        record.update({k: _num(v) for k, v in scalars.items()})
        record.update({k: histogram_record(v) for k, v in histograms.items()})
        self._write(record)

    def log_text(self, step: int, name: str, text: str) -> None:
        self._write({"step": step, "time": time.time(), name: text})

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
