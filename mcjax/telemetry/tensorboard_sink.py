"""TensorBoard sink: tensorboardX event files under `run_dir/tb`.

Scalars via `add_scalar`, histograms via `add_histogram`, text via `add_text`. When resuming,
`purge_step=resume_step + 1` tells TensorBoard to hide events written after the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter


class TensorBoardSink:
    """Writes scalars, histograms and text to `run_dir/tb`."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tb"), purge_step=purge, flush_secs=10)
        self._closed = False

    def log(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        for name, value in scalars.items():
            if math.isfinite(value):  # undefined values (e.g. a correlation of constants) are left out
                self.writer.add_scalar(name, value, global_step=step)
        for name, values in histograms.items():
            if values.size:  # tensorboardX refuses an empty histogram
                self.writer.add_histogram(name, values, global_step=step)

    def log_text(self, step: int, name: str, text: str) -> None:
        # TensorBoard renders text as markdown; indenting by 4 spaces keeps an ASCII dump verbatim.
        block = "\n".join("    " + line for line in text.splitlines())
        self.writer.add_text(name, block, global_step=step)

    def close(self) -> None:
        if not self._closed:
            self.writer.close()
            self._closed = True
