"""Programs checked against memory before they first run.

A step that cannot fit should stop with one line that names its size and what to lower, not
with an allocator's traceback from deep inside XLA after minutes of compiling. `Fitted` compiles
a jitted function ahead of time for each value of its static argument, reads XLA's own memory
analysis of the program, and compares the memory it must allocate beyond its arguments with
what the device has free (GPU/TPU: the allocator's limit minus what is in use; CPU: the host's
available memory).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from mcjax.errors import UserError
from mcjax.train import memory


class ProgramTooLarge(UserError):
    """A compiled program needs more memory than the device has free."""


def check_fits(need: int | None, free: int | None, what: str, hint: str) -> None:
    """Raise ProgramTooLarge (one line) when `need` bytes exceed `free`; silent when either is unknown."""
    if need is None or free is None or need <= free:
        return
    platform = jax.local_devices()[0].platform
    raise ProgramTooLarge(
        f"{what} needs {need / 1e9:.1f} GB of {platform} memory beyond its inputs and {free / 1e9:.1f} GB is free: {hint}"
    )


def tightest(need: int | None, free: int | None) -> tuple[int | None, int | None]:
    """(need, free) of the process with the least room, the same on every process: all stop or
    none does (one alone would leave the others waiting in a collective)."""
    if jax.process_count() == 1:
        return need, free
    from jax.experimental import multihost_utils

    known = need is not None and free is not None
    mine = np.array([need if known else 0, free if known else 0, int(known)], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
    every = every[every[:, 2] == 1]
    if not len(every):
        return None, None
    worst = every[np.argmax(every[:, 0] - every[:, 1])]
    return int(worst[0]), int(worst[1])


class Fitted:
    """`jitted` (whose last positional argument is static) compiled once per static value and
    checked with `check_fits` before its first run. Call as `fitted(*args, static)`."""

    def __init__(self, jitted: Callable, what: Callable[[Any], str], hint: str):
        self.jitted, self.what, self.hint = jitted, what, hint
        self._programs: dict[Any, Any] = {}

    def program(self, *args):
        *dynamic, static = args
        compiled = self._programs.get(static)
        if compiled is None:
            compiled = self.jitted.lower(*dynamic, static).compile()
            need = memory.program_bytes(compiled.memory_analysis(), arguments=False)  # its inputs are already there
            check_fits(*tightest(need, memory.free_bytes()), self.what(static), self.hint)
            self._programs[static] = compiled
        return compiled

    def __call__(self, *args):
        return self.program(*args)(*args[:-1])
