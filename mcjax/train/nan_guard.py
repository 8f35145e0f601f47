"""Stop a run at its first non-finite step, before anything non-finite is saved.

Every train step returns `metrics["train/finite"]` (`step.finite_flag`): one bool scalar,
true when the step's `train/loss` and `train/grad_norm` and every float of the state it
made are finite. `NanGuard` is the host's side: it pulls that flag and raises
`NonFiniteError` on the first false one.

Which step is reported. Step N (numbered as in metrics.jsonl: the N-th optimizer update)
computes its loss and gradients at the state of step N−1 and makes state N; its flag covers
both. A NaN or Inf in the state survives every later update, so the flags of a run read
true … true, false … false. The guard checks them in step order and stops at the first false
one it checks: with `training.nan_check` (the default) it checks every step, so that is the
first non-finite step; without, it checks only the steps below, so the step reported is the
first non-finite one among them (an earlier unchecked one may have come first).

When. With `nan_check`, step N's flag is pulled right after step N+1 has been dispatched
(`dispatched`): the host waits for step N while step N+1 is already queued, so the device
never waits for the check (nanodo's habit), and one scalar crosses to the host per step. The
check is made at once (`check`) on a logged step (its metrics come to the host anyway), and
before anything reads the state: a checkpoint save (the final one too), an evaluation, a
MegaContext dump. A saved state is therefore always finite: the save of state N follows the
check of step N's flag, which covers every float of state N. So no checkpoint is written from
a non-finite state, bad saves never rotate good checkpoints away, and the newest checkpoint on
disk — the one `--resume` takes — is the last finite one, which the error names.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax

from mcjax.errors import NonFiniteError


class NanGuard:
    """The host-side finiteness check of the training loop (see the module doc).

    `every_step`: check every step's flag one step late (`training.nan_check`); else only at
    `check`. `ckpt_dir` and `last_saved` (the step of the newest checkpoint on disk, or None)
    name the last finite checkpoint in the error.
    """

    def __init__(self, every_step: bool, ckpt_dir: Path, last_saved: int | None):
        self.every_step = every_step
        self.ckpt_dir = Path(ckpt_dir)
        self.last_saved = last_saved
        self._pending: tuple[int, jax.Array, dict] | None = None  # (step, flag, metrics) not yet checked

    def dispatched(self, step: int, finite: jax.Array, metrics: dict) -> None:
        """Step `step` was dispatched with this flag (bool [] on the device) and metrics; check the
        step before it now (one step late) when checking every step."""
        previous, self._pending = self._pending, (step, finite, metrics)
        if self.every_step and previous is not None:
            self._check(*previous)

    def check(self) -> None:
        """Check the latest dispatched step now (waits for it): on a logged step, and before
        anything reads the state (a save, an evaluation, a dump)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._check(*pending)

    def saved(self, step: int) -> None:
        """A checkpoint of (checked, finite) state `step` was written or started."""
        self.last_saved = step

    def _check(self, step: int, finite: jax.Array, metrics: dict) -> None:
        if bool(jax.device_get(finite)):
            return
        loss, gnorm = (float(jax.device_get(metrics[k])) for k in ("train/loss", "train/grad_norm"))
        raise NonFiniteError(self.message(step, loss, gnorm))

    def message(self, step: int, loss: float, grad_norm: float) -> str:
        """One line: the step, the non-finite quantity with its value, the last finite checkpoint."""
        bad = [f"{k} {v}" for k, v in (("train/loss", loss), ("train/grad_norm", grad_norm)) if not math.isfinite(v)]
        what = ", ".join(bad) or (
            f"the train state its update made; train/loss {loss:.4f} and train/grad_norm {grad_norm:.4g} were finite"
        )
        first = "" if self.every_step else " (training.nan_check is off: an earlier unchecked step may have been the first)"
        if self.last_saved is None:
            where = "none yet (--resume would start from step 0)"
        else:
            where = f"step {self.last_saved} ({self.ckpt_dir / str(self.last_saved)}), which --resume continues from"
        return f"training went non-finite at step {step}{first}: {what}; stopped. Last finite checkpoint: {where}"
