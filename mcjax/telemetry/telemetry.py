"""`Telemetry`: the one metrics interface the training loop uses.

It fans each call out to the sinks enabled in `cfg.telemetry` (JSONL, TensorBoard, W&B).
Only the main process (process 0) writes: on other processes every call is a no-op. At
construction the resolved config is mirrored to `run_dir/config.yaml`; `summary()` writes the
final report card to `run_dir/summary.json` (and the W&B run summary).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from mcjax.config import Config, save_config
from mcjax.telemetry.jsonl_sink import JsonlSink


class Sink(Protocol):
    def log(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None: ...
    def log_text(self, step: int, name: str, text: str) -> None: ...
    def close(self) -> None: ...


def _finite(values: Any) -> np.ndarray:
    """Flatten to float64 [N] and drop NaN/±inf (histograms of them are undefined)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def _json_num(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Telemetry:
    """Scalars, histograms, text and a final summary, written to every enabled sink."""

    def __init__(
        self, cfg: Config, run_dir: Path, *, resume_step: int | None = None, is_main: bool = True
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.sinks: list[Sink] = []
        self._wandb: Any = None
        self._closed = False
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._open_sinks(resume_step)

    def _open_sinks(self, resume_step: int | None) -> None:
        t = self.cfg.telemetry
        if t.jsonl:
            self.sinks.append(JsonlSink(self.run_dir, resume_step))
        if t.tensorboard:
            from mcjax.telemetry.tensorboard_sink import TensorBoardSink

            self.sinks.append(TensorBoardSink(self.run_dir, resume_step))
        if t.wandb != "disabled":
            from mcjax.telemetry.wandb_sink import WandbSink

            self._wandb = WandbSink(self.cfg, self.run_dir)
            self.sinks.append(self._wandb)

    @property
    def active(self) -> bool:
        return self.is_main and not self._closed

    def log(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Log scalars (numpy/jax scalars are fine; NaN is kept) and optional histograms."""
        if not self.active:
            return
        step = int(step)
        floats = {k: float(v) for k, v in scalars.items()}
        hists = {k: _finite(v) for k, v in (histograms or {}).items()}
        for sink in self.sinks:
            sink.log(step, floats, hists)

    def log_text(self, step: int, name: str, text: str) -> None:
        """Log a block of text (e.g. an ASCII dump) under `name`."""
        if not self.active:
            return
        for sink in self.sinks:
            sink.log_text(int(step), name, text)

    def summary(self, values: Mapping[str, float]) -> None:
        """The final report card: `run_dir/summary.json` and the W&B run summary."""
        if not self.active:
            return
        floats = {k: float(v) for k, v in values.items()}
        path = self.run_dir / "summary.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: _json_num(v) for k, v in floats.items()}, indent=2) + "\n")
        os.replace(tmp, path)
        if self._wandb is not None:
            self._wandb.summary(floats)

    def close(self) -> None:
        """Flush and close every sink. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for sink in self.sinks:  # close them all even if one fails
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
