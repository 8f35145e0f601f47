"""The substitutability sweep: ΔNLL@H of compressed working contexts against the full context.

For each W_max in eval.wmax and each dataset, rows of W_max tokens (+1 lookahead) are seen
in full (every block raw: the reference) and under each compression setting of
`policies.py` — `lod1` (32× before the tail), `lod2` (1024×), and at every budget
eval.targets × W_max a `random` layout and the `lensnet` layout the runtime engine chooses.
ΔNLL@H of a row = its mean NLL on the last H tokens (raw in every layout) under the
setting − under the full context; H ∈ eval.horizons.

Table `eval_sweep` (one record per row, setting and horizon): w_max, dataset, policy,
target (budget fraction; null for lod1/lod2), row, entries, compression_ratio (tokens per
entry before the tail), horizon, nll, nll_full, delta_nll, n_tokens (= H). The summary
holds the mean, std and p95 of ΔNLL per (w_max, dataset, policy, target, horizon).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from mcjax.errors import ConfigError
from mcjax.eval import policies as P
from mcjax.eval.data import EvalData
from mcjax.eval.forward import Scorer, horizon_mean
from mcjax.eval.result import SuiteResult, stats, table
from mcjax.eval.setup import Plan
from mcjax.megacontext.layout import check_layout, entry_count

COLUMNS = {
    "w_max": pa.int32(), "dataset": pa.string(), "policy": pa.string(), "target": pa.float64(), "row": pa.int32(),
    "entries": pa.int32(), "compression_ratio": pa.float64(), "horizon": pa.int32(), "nll": pa.float64(),
    "nll_full": pa.float64(), "delta_nll": pa.float64(), "n_tokens": pa.int32(),
}


def settings(plan: Plan, rows: np.ndarray, dataset: str, progress=None) -> tuple[list[tuple[str, float | None, np.ndarray]], list[str]]:
    """The compression settings of one W_max and dataset: [(policy, target, layouts int8
    [R, N1])], and the ones skipped (why)."""
    length = rows.shape[1] - 1
    k, n1, tb, hb = plan.k, length // plan.k, plan.tail // plan.k, plan.head // plan.k
    out, skipped = [("lod1", None, np.stack([P.lod1(n1, k, tb, hb)] * len(rows)))], []
    if plan.max_lod >= 2 and len(P.superblocks(n1, k, tb, hb)):
        out.append(("lod2", None, np.stack([P.lod2(n1, k, tb, hb)] * len(rows))))
    else:
        skipped.append(f"lod2 at W_max {length}: no complete superblock ({k * k} tokens) before the {plan.tail}-token tail")
    salt = zlib.crc32(dataset.encode())
    for i, frac in enumerate(plan.ev.targets):
        budget = plan.budget(length, frac)
        rand = [P.random(np.random.default_rng((plan.ev.seed, salt, length, i, r)), n1, k, tb, budget, plan.max_lod, hb)
                for r in range(len(rows))]
        if any(x is None for x in rand):
            skipped.append(f"targets {frac} at W_max {length}: {budget} entries hold no layout with the "
                           f"{plan.tail}-token tail raw (the floor is {plan.least_entries(length)})")
            continue
        out.append(("random", frac, np.stack(rand)))
        try:
            out.append(("lensnet", frac, P.lensnet_layouts(plan, rows, budget, progress, seed=plan.ev.seed)))
        except ConfigError as e:
            skipped.append(f"lensnet at targets {frac}, W_max {length}: the runtime engine cannot run at {budget} "
                           f"entries ({str(e).split(': ', 2)[-1]})")
    return out, skipped


def run(plan: Plan, datasets: list[EvalData], bar) -> SuiteResult:
    ev = plan.ev
    records, skipped = [], []
    for length in plan.wmax:
        scorer = Scorer(plan, length)
        n1, tb = length // plan.k, plan.tail // plan.k
        for ds in datasets:
            rows = ds.rows(length, ev.rows)
            setts, why = settings(plan, rows, ds.name, bar.update)
            skipped += [s for s in why if s not in skipped]
            bar.set_postfix_str(f"delta W={length} {ds.name}")
            ref = scorer.tail_nll(rows, P.full(n1), bar.update)[:, 0]
            for policy, target, layouts in setts:
                for lod in layouts:
                    check_layout(lod, plan.k, recent_tokens=plan.tail, sink_tokens=plan.head)
                nll = scorer.tail_nll(rows, layouts[:, None], bar.update)[:, 0]
                for r, lod in enumerate(layouts):
                    base = dict(w_max=length, dataset=ds.name, policy=policy, target=target, row=r,
                                entries=entry_count(lod, plan.k), compression_ratio=P.compression_ratio(lod, plan.k, tb))
                    for h in plan.horizons:
                        a, b = float(horizon_mean(nll[r], h)), float(horizon_mean(ref[r], h))
                        records.append({**base, "horizon": h, "nll": a, "nll_full": b, "delta_nll": a - b, "n_tokens": h})
    return SuiteResult("delta", {"eval_sweep": table(records, COLUMNS)}, {"rows": summarize(records)},
                       scalars(records), skipped)


def summarize(records: list[dict]) -> list[dict]:
    """Mean/std/p95 ΔNLL and mean entries, compression per (w_max, dataset, policy, target, horizon)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["w_max"], r["dataset"], r["policy"], r["target"], r["horizon"]), []).append(r)
    out = []
    for (w, ds, policy, target, h), rs in groups.items():
        s = stats([r["delta_nll"] for r in rs])
        out.append({"w_max": w, "dataset": ds, "policy": policy, "target": target,
                    "horizon": h, "delta_nll": s["mean"], "delta_nll_std": s["std"], "delta_nll_p95": s["p95"],
                    "rows": s["n"], "entries": float(np.mean([r["entries"] for r in rs])),
                    "compression_ratio": float(np.mean([r["compression_ratio"] for r in rs]))})
    return out


def scalars(records: list[dict]) -> dict[str, float]:
    out = {}
    for s in summarize(records):
        name = s["policy"] if s["target"] is None else f"{s['policy']}@{s['target']:g}"
        out[f"delta_nll/{s['dataset']}/w{s['w_max']}/{name}/h{s['horizon']}"] = s["delta_nll"]
    return out
