"""Terminal progress: a tqdm bar showing step/total, loss and tok/s (training), and the eval suites' bars.

When stderr is not a terminal (CI, redirected logs) there is no bar; instead one plain line is
written about every 10% of the steps, so logs still show progress. A disabled `Progress`
(e.g. on processes other than 0) writes nothing at all.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "nan"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "-"


def _plain(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _Tenths:
    """When a plain line is due: about every 10 % of `total` units and once at the end."""

    def __init__(self, total: int, start: int = 0) -> None:
        self.total = max(1, int(total))
        self.every = max(1, math.ceil(self.total / 10))
        self.last = start

    def due(self, n: int) -> bool:
        if n - self.last >= self.every or n >= self.total > self.last:
            self.last = n
            return True
        return False


class Progress:
    """A progress bar over `total_steps` optimizer steps, starting at `initial`."""

    def __init__(self, total_steps: int, *, initial: int = 0, enabled: bool = True) -> None:
        self.total = max(1, int(total_steps))
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._lines = _Tenths(self.total, initial)
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(
                total=self.total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, step: int, loss: float, tok_per_sec: float, extra: dict[str, Any] | None = None) -> None:
        """Move to `step` (steps done so far) and show the latest loss and throughput."""
        if not self.enabled:
            return
        fields = {"loss": _fmt(float(loss)), "tok/s": _rate(float(tok_per_sec))}
        fields.update({k: (_fmt(v) if isinstance(v, float) else str(v)) for k, v in (extra or {}).items()})
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(fields, refresh=True)
        elif self._lines.due(step):
            info = ", ".join(f"{k} {v}" for k, v in fields.items())
            _plain(f"step {step}/{self.total} ({100 * step / self.total:.0f}%): {info}")

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly, without one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(line, file=sys.stderr)
        else:
            _plain(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.enabled = False


class PlainBar:
    """tqdm's `update` / `set_postfix_str` for a stderr that is no terminal: one line about every
    10 % of `total` units (and at the end), so a redirected log still shows how far work is."""

    def __init__(self, total: int, desc: str, unit: str = "row") -> None:
        self.desc, self.unit = desc, unit
        self._lines = _Tenths(total)
        self.total, self.n, self._postfix = self._lines.total, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._lines.due(self.n):
            tail = f" ({self._postfix})" if self._postfix else ""
            _plain(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s ({100 * self.n / self.total:.0f}%){tail}")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def __enter__(self) -> "PlainBar":
        return self

    def __exit__(self, *exc) -> None:
        return None


def bar(total: int, desc: str, unit: str = "row"):
    """A tqdm bar on a terminal, a `PlainBar` otherwise."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    return PlainBar(total, desc, unit)
