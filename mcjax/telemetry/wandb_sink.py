"""Weights & Biases sink: one W&B run per training run, online, offline or disabled.

`wandb` is imported only when this sink is created. The run id is stable for a run
directory (sanitized run name + short hash of the directory), so a resumed job continues the
same W&B run (`resume="allow"`). Every metric is plotted against our own `step` key rather than
W&B's internal step, so re-logging steps after a resume is not rejected as out of order.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mcjax.config import Config
from mcjax.errors import ConfigError

HIST_BINS = 32


def run_id(run_name: str, run_dir: Path) -> str:
    """A W&B run id that is the same every time this run directory is opened."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:48] or "run"
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


class WandbSink:
    """Logs scalars, histograms, text and the summary to a W&B run."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            import wandb  # lazy: heavy, and only needed when W&B is enabled
        except ImportError:
            raise ConfigError(f"{cfg.source_file}: telemetry.wandb: {cfg.telemetry.wandb!r} needs the wandb package, "
                              "which is not installed: pip install wandb, or set telemetry.wandb=disabled") from None

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.telemetry.wandb_project,
            name=cfg.run,
            dir=str(run_dir),
            mode=cfg.telemetry.wandb,
            config=cfg.to_dict(),
            resume="allow",
            id=run_id(cfg.run, run_dir),
            settings=wandb.Settings(silent=True, console="off", save_code=False),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._closed = False

    def log(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        row: dict[str, Any] = {"step": step, **scalars}
        for name, values in histograms.items():
            if values.size:
                row[name] = self._wandb.Histogram(np_histogram=np.histogram(values, bins=HIST_BINS))
        self.run.log(row)

    def log_text(self, step: int, name: str, text: str) -> None:
        self.run.log({"step": step, name: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def summary(self, values: Mapping[str, float]) -> None:
        self.run.summary.update(dict(values))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()
