"""Stability: the focus allocator over a long run of refocuses, and what it costs per token.

One stream of held-out text (every dataset's stream, one after another, wrapped around)
goes through the MegaContext engine at the run's W_max: the first W_max tokens are
ingested, then eval.stability_refocuses decode blocks of R = runtime.refocus_interval
tokens are teacher-forced through `Engine.score` — decoded against the KV cache exactly as
generation decodes, then gisted and refocused (LensNet + allocator + cache rebuild) — so
the focus follows real text. A `runtime.monitor.Monitor` records every refocus (the
telemetry spec's runtime metrics, action traces). The plain engine (the GPT with a
W_max-entry sliding window) then decodes the same blocks; the latency overhead is
MegaContext's median block time over the plain engine's, minus 1 (blocks that compiled
left out), measured in one process, on one device.

Residency as the spec defines it — how many refocuses a block stays at a level before it
is swapped — is measured at every swap: refocuses since the block's previous change, or
since it appeared (complete) when it had none. `mean_residency_at_swap` is their mean
(blocks that never swap do not enter it; `runtime/mean_residency`, the monitor's mean over
all blocks of refocuses since their last change, is reported beside it).
Table `stability`: one record per refocus (phase, latency_ms, and the monitor's metrics);
table `residency`: one record per swap (block, refocus, residency).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from mcjax.eval.data import EvalData
from mcjax.eval.result import SuiteResult, stats, table
from mcjax.eval.setup import Plan, derive

COLUMNS = {
    "refocus": pa.int32(), "phase": pa.string(), "compiling": pa.bool_(), "latency_ms": pa.float64(),
    "swap_rate": pa.float64(), "num_expands": pa.float64(), "num_collapses": pa.float64(),
    "num_forced_collapses": pa.float64(), "mean_residency": pa.float64(), "token_budget_utilization": pa.float64(),
    "active_tokens": pa.float64(), "rebuilt": pa.float64(), "tokens": pa.float64(),
}
RESIDENCY = {"block": pa.int32(), "refocus": pa.int32(), "residency": pa.int32()}


class _Swaps:
    """Residency at each swap, from the layouts after every refocus (see the module doc)."""

    def __init__(self):
        self.prev_lod = None
        self.since: np.ndarray | None = None  # refocus of each block's last change or appearance
        self.records: list[dict] = []

    def observe(self, refocus: int, block_lod: np.ndarray, blocks: int) -> None:
        if self.prev_lod is None:
            self.prev_lod, self.since = block_lod.copy(), np.full(block_lod.shape, refocus)
            return
        changed = np.flatnonzero(block_lod[:blocks] != self.prev_lod[:blocks])
        for b in changed:
            self.records.append({"block": int(b), "refocus": refocus, "residency": int(refocus - self.since[b])})
        appeared = np.arange(len(block_lod)) >= blocks
        self.since = np.where(appeared, refocus, self.since)  # not complete yet: its clock starts later
        self.since[changed] = refocus
        self.prev_lod = block_lod.copy()


def text_stream(datasets: list[EvalData], tokens: int) -> np.ndarray:
    stream = np.concatenate([d.stream for d in datasets])
    return np.take(stream, np.arange(tokens), mode="wrap").astype(np.int32)


def run(plan: Plan, datasets: list[EvalData], bar, traces: Path) -> SuiteResult:
    from mcjax.runtime import Engine
    from mcjax.runtime.monitor import Monitor

    ev, k, w = plan.ev, plan.k, plan.w_run
    r = plan.cfg.runtime.refocus_interval
    n = ev.stability_refocuses
    text = text_stream(datasets, w + n * r)
    cfg = derive(plan.cfg, {"runtime.max_tokens": len(text)})
    monitors, swaps = {}, _Swaps()
    tmp = traces.with_name(traces.name + ".tmp")
    for kind in ("mc", "plain"):
        engine = Engine(dataclasses.replace(plan.run, cfg=cfg), kind=kind, batch=1)
        engine.monitor = monitors[kind] = Monitor(k=k, w_max=w, traces=tmp if kind == "mc" else None)
        bar.set_postfix_str(f"stability {kind}")
        try:
            engine.ingest([text[:w]])
            for i in range(n):
                engine.score(text[None, w + i * r : w + (i + 1) * r])
                if kind == "mc":
                    swaps.observe(i, np.asarray(engine.state.block_lod)[0], int(engine.lengths[0]) // k)
                bar.update(1)
        finally:
            engine.monitor.close()
    os.replace(tmp, traces)
    mc, plain = monitors["mc"], monitors["plain"]
    records = []
    for i, (row, phase, compiling) in enumerate(zip(mc.rows, mc.phases, mc.compiled)):
        rec = {"refocus": i, "phase": phase, "compiling": compiling}
        rec.update({key: row[f"runtime/{key}"] for key in COLUMNS if f"runtime/{key}" in row})
        records.append(rec)
    summary = mc.summary()
    median = lambda m: float(np.median(m.latencies)) if m.latencies else float("nan")  # noqa: E731
    at_swap = stats([x["residency"] for x in swaps.records])
    out = {
        "refocuses": n, "w_max": w, "refocus_interval": r,
        "swap_rate": summary.get("runtime/swap_rate", float("nan")),
        "mean_residency": summary.get("runtime/mean_residency", float("nan")),
        "mean_residency_at_swap": at_swap["mean"], "swaps": at_swap["n"],
        "token_budget_utilization": summary.get("runtime/token_budget_utilization", float("nan")),
        "latency_ms_median": median(mc), "latency_p99": summary.get("runtime/latency_p99", float("nan")),
        "plain_latency_ms_median": median(plain), "latency_overhead": median(mc) / median(plain) - 1,
    }
    return SuiteResult("stability", {"stability": table(records, COLUMNS), "residency": table(swaps.records, RESIDENCY)},
                       out, {key: v for key, v in out.items() if isinstance(v, float)})
