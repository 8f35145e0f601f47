"""What one `mcjax eval` measures, resolved once from the run and its `eval.*` keys.

The protected tail of every evaluated layout is `tail` = max(megacontext.recent_tokens,
the longest horizon), rounded up to whole blocks: the last `tail` tokens of a row stay raw
(and its first megacontext.sink_tokens, the protected `head`),
so ΔNLL@H for every H in eval.horizons is measured on raw tokens, as in training. A row of
W tokens then has W/K blocks, the last tail/K of them raw; a budget of B entries is
*feasible* for it when the most compressed layout fits (`least_entries`); settings that
are not (a budget below that floor, a LOD2 setting with no complete superblock before the
tail) are skipped and listed in the report, never an error.

`derive` makes the configs the suites run under (rows of another length, an engine with
another W_max) from the run's, through the same validation as a config file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mcjax.config import Config, EvalConfig, config_from_dict, min_wc_entries
from mcjax.errors import ConfigError, UserError
from mcjax.restore import LoadedRun

SUITES = ("delta", "focus", "retrieval", "boundary", "stability")
NEEDS_MC = ("delta", "focus", "boundary", "stability")  # retrieval also runs a plain GPT (full, recency)


# Keys only training reads (the variant curriculum), set so that no check of theirs binds
# when an eval config changes the tail or the row length.
_NO_TRAINING = {"megacontext.train_wc_length": 1.0, "megacontext.curriculum_start": 1.0, "megacontext.eval_wc_length": 0.0}


def derive(cfg: Config, updates: dict[str, object]) -> Config:
    """`cfg` with dotted keys replaced (`{"megacontext.wc_capacity": 512}`), validated; the
    training-only curriculum keys are neutral (nothing trains under it)."""
    raw = cfg.to_dict()
    for key, value in {**_NO_TRAINING, **updates}.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(raw, where=cfg.source_file)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved settings of one evaluation (see the module doc)."""

    run: LoadedRun
    out_dir: Path  # <out>/eval/<run>/
    k: int  # tokens per block
    tail: int  # the protected raw tail of every evaluated layout, tokens
    head: int  # the protected raw head (megacontext.sink_tokens), tokens
    w_run: int  # the run's W_max (megacontext.wc_capacity)
    wmax: tuple[int, ...]  # row lengths of the ΔNLL and focus suites
    max_lod: int

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    @property
    def ev(self) -> EvalConfig:
        return self.run.cfg.eval

    @property
    def horizons(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.ev.horizons)))

    def least_entries(self, length: int, *, max_lod: int | None = None) -> int:
        """Entries of the most compressed layout of a row of `length` tokens (tail and head raw)."""
        lod = self.max_lod if max_lod is None else max_lod
        return min_wc_entries(length // self.k, self.k, self.tail, lod, self.head)

    def budget(self, length: int, fraction: float) -> int:
        return int(fraction * length)

    def retrieval_lengths(self) -> tuple[int, ...]:
        if self.ev.retrieval_lengths:
            return tuple(sorted(set(self.ev.retrieval_lengths)))
        top = min(self.cfg.runtime.max_tokens, 8 * self.w_run)
        out, n = [], 1024
        while n <= top:
            out.append(n)
            n *= 2
        return tuple(out) or (top,)

    def boundary_length(self) -> int:
        if self.ev.boundary_length:
            return self.ev.boundary_length
        return max(self.w_run, self.k * self.k + self.tail)


def plan(run: LoadedRun, suites: tuple[str, ...]) -> Plan:
    """Resolve and check the eval keys against the run (ConfigError naming the key)."""
    cfg, ev = run.cfg, run.cfg.eval
    where = cfg.source_file
    k, mc = cfg.dataset.block_size, cfg.megacontext
    for suite in suites:
        if suite in NEEDS_MC and not mc.enabled:
            raise UserError(
                f"run '{run.run_dir.name}' trained a plain GPT (megacontext.enabled is false): the {suite} suite "
                f"needs its GistNet and LensNet; a plain run takes --suite retrieval only"
            )
    tail = -(-max(mc.recent_tokens, max(ev.horizons)) // k) * k
    w_run = cfg.wc_capacity
    wmax = tuple(sorted(set(ev.wmax))) if ev.wmax else (w_run, 4 * w_run)
    lengths = list(wmax) if any(s in suites for s in ("delta", "focus")) else []
    if "boundary" in suites:
        lengths.append(ev.boundary_length or max(w_run, k * k + tail))
    for w in lengths:
        key = "eval.boundary_length" if w not in wmax else "eval.wmax"
        if w % k or w < tail + mc.sink_tokens + k:
            head = f" and head (megacontext.sink_tokens {mc.sink_tokens})" if mc.sink_tokens else ""
            raise ConfigError(
                f"{where}: {key}: {w} must be a multiple of dataset.block_size ({k}) of at least the protected "
                f"tail ({tail} = max(megacontext.recent_tokens, eval.horizons), in whole blocks){head} plus one block"
            )
    if "retrieval" in suites:
        for n in ev.retrieval_lengths:
            if n < 64:
                raise ConfigError(f"{where}: eval.retrieval_lengths: {n} tokens leave no room for filler; use ≥ 64")
    out_dir = run.run_dir.parent.parent / "eval" / run.run_dir.name
    return Plan(run=run, out_dir=out_dir, k=k, tail=tail, head=mc.sink_tokens, w_run=w_run, wmax=wmax, max_lod=mc.max_lod)
