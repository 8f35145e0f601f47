"""Focus quality at equal budget: does LensNet's focus beat keeping the most recent tokens?

For each W_max and dataset, rows of W_max tokens are compressed to the budget
eval.focus_target × W_max by these policies and scored against the full context (ΔNLL@H,
as in `delta.py`):
  lensnet  the layout the runtime engine holds after ingesting the row (LensNet + the
           focus allocator, `policies.lensnet_layouts`); its entry count is the row's
           budget for the others, so every policy spends at most the same entries;
  recency  the most recent blocks raw, older ones in gists;
  random   uniformly random compression;
  attention  the training-free rival: the gists the base attends to most from the raw
           tail expanded into the budget (`policies.scored_fill`, megacontext.rival_layers);
  lensnet_dropped, recency_dropped  the lensnet and recency layouts read with every gist
           left out (the base's read gate shut): a gist that helps makes its layout beat
           its dropped twin, one that hurts loses to it;
  oracle   counterfactual search on the first eval.oracle_rows rows: from the floor
           layout, eval.oracle_rounds greedy rounds each score every single expansion
           (a LOD1 gist back to its tokens, or a LOD2 gist to its K gists: K − 1 entries
           each) by a forward pass and take the best that lower the NLL of the last
           H_o = max(eval.horizons) tokens, as many as spread the budget left over the
           rounds left (the single best when several together do worse); the oracle is
           then the best layout measured on that row — the search's or any other
           policy's — so it is never worse than recency on its own sample.
The summary reports each policy's mean ΔNLL and, on the oracle's rows at H_o, the share of
the oracle's gain over recency that LensNet recovers: (Δrecency − Δlensnet) /
(Δrecency − Δoracle) (NaN when the oracle gains nothing).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from mcjax.errors import ConfigError
from mcjax.eval import policies as P
from mcjax.eval.data import EvalData
from mcjax.eval.forward import Scorer, horizon_mean
from mcjax.eval.result import SuiteResult, table
from mcjax.eval.setup import Plan
from mcjax.megacontext.layout import entry_count

POLICIES = ("lensnet", "recency", "random", "attention", "lensnet_dropped", "recency_dropped", "oracle")
DROPPED = {"lensnet_dropped": "lensnet", "recency_dropped": "recency"}  # read with the gists left out
COLUMNS = {
    "w_max": pa.int32(), "dataset": pa.string(), "policy": pa.string(), "row": pa.int32(), "budget": pa.int32(),
    "entries": pa.int32(), "horizon": pa.int32(), "nll": pa.float64(), "nll_full": pa.float64(),
    "delta_nll": pa.float64(), "oracle_sample": pa.bool_(),
}


def _expansions(lod: np.ndarray, k: int, tail_blocks: int) -> list[np.ndarray]:
    """Every layout one expansion away (K − 1 more entries each)."""
    head = len(lod) - tail_blocks
    out = []
    for b in range(head):
        if lod[b] == 1:
            x = lod.copy()
            x[b] = 0
            out.append(x)
        elif lod[b] == 2 and b % k == 0:
            x = lod.copy()
            x[b : b + k] = 1
            out.append(x)
    return out


def oracle(scorer: Scorer, row: np.ndarray, budget: int, horizon: int, rounds: int, bar=None) -> np.ndarray:
    """The counterfactual greedy search of the module doc (without the final best-of).
    row int [L+1] -> int8 [N1]."""
    k, tb, hb = scorer.plan.k, scorer.plan.tail // scorer.plan.k, scorer.plan.head // scorer.plan.k
    measure = lambda layouts: horizon_mean(scorer.tail_nll(row[None], np.stack(layouts)[None])[0], horizon)  # noqa: E731
    lod = P.floor(len(row) // k, k, tb, budget, scorer.plan.max_lod, hb)
    current = float(measure([lod])[0])
    for i in range(rounds):
        room = (budget - entry_count(lod, k)) // (k - 1)
        cands = _expansions(lod, k, tb) if room > 0 else []
        if not cands:
            break
        nll = measure(cands)
        if bar is not None:
            bar.update(1)
        better = [j for j in np.argsort(nll, kind="stable") if nll[j] < current]
        if not better:
            break
        take = better[: max(1, -(-room // (rounds - i)))]
        merged = lod.copy()
        for j in take:  # expansions of distinct units: they combine by taking each one's lower level
            merged = np.minimum(merged, cands[j])
        got = float(measure([merged])[0]) if len(take) > 1 else float(nll[take[0]])
        lod, current = (merged, got) if got <= nll[take[0]] else (cands[take[0]], float(nll[take[0]]))
    return lod


def run(plan: Plan, datasets: list[EvalData], bar) -> SuiteResult:
    ev = plan.ev
    h_o = max(plan.horizons)
    records, skipped = [], []
    for length in plan.wmax:
        budget = plan.budget(length, ev.focus_target)
        n1, k, tb, hb = length // plan.k, plan.k, plan.tail // plan.k, plan.head // plan.k
        if budget < plan.least_entries(length):
            skipped.append(f"focus at W_max {length}: the budget {budget} (eval.focus_target {ev.focus_target}) is below "
                           f"the floor of {plan.least_entries(length)} entries")
            continue
        scorer = Scorer(plan, length)
        for ds in datasets:
            rows = ds.rows(length, ev.rows)
            bar.set_postfix_str(f"focus W={length} {ds.name}")
            try:
                lens = P.lensnet_layouts(plan, rows, budget, bar.update, seed=ev.seed)
            except ConfigError as e:
                skipped.append(f"focus at W_max {length}: the runtime engine cannot run at {budget} entries "
                               f"({str(e).split(': ', 2)[-1]})")
                break
            budgets = [entry_count(x, k) for x in lens]
            salt = zlib.crc32(ds.name.encode())
            layouts = {
                "lensnet": lens,
                "recency": np.stack([P.recency(n1, k, tb, b, plan.max_lod, hb) for b in budgets]),
                "random": np.stack([P.random(np.random.default_rng((ev.seed, salt, length, r)), n1, k, tb, b, plan.max_lod, hb)
                                    for r, b in enumerate(budgets)]),
                "attention": P.scored_fill(plan, rows, np.array(budgets), "attention", progress=bar.update),
            }
            ref = scorer.tail_nll(rows, P.full(n1), bar.update)[:, 0]
            nll = {p: scorer.tail_nll(rows, x[:, None], bar.update)[:, 0] for p, x in layouts.items()}
            for p, of in DROPPED.items():
                layouts[p] = layouts[of]
                nll[p] = scorer.tail_nll(rows, layouts[of][:, None], bar.update, drop_gists=True)[:, 0]
            n_or = min(ev.oracle_rows, len(rows))
            found = [oracle(scorer, rows[r], budgets[r], h_o, ev.oracle_rounds, bar) for r in range(n_or)]
            if n_or:
                o_nll = scorer.tail_nll(rows[:n_or], np.stack(found)[:, None], bar.update)[:, 0]
                o_lod = np.stack(found)
                for p in layouts:  # the best layout measured on the row (as read with its gists)
                    if p in DROPPED:
                        continue
                    mine = horizon_mean(nll[p][:n_or], h_o) < horizon_mean(o_nll, h_o)
                    o_nll = np.where(mine[:, None], nll[p][:n_or], o_nll)
                    o_lod = np.where(mine[:, None], layouts[p][:n_or], o_lod)
                nll["oracle"], layouts["oracle"] = o_nll, o_lod
            for p, x in nll.items():
                for r in range(len(x)):
                    for h in plan.horizons:
                        a, b = float(horizon_mean(x[r], h)), float(horizon_mean(ref[r], h))
                        records.append(dict(w_max=length, dataset=ds.name, policy=p, row=r, budget=budgets[r],
                                            entries=entry_count(layouts[p][r], k), horizon=h, nll=a, nll_full=b,
                                            delta_nll=a - b, oracle_sample=r < n_or))
    summary = summarize(records, h_o)
    scal = {f"{s['dataset']}/w{s['w_max']}/{p}": s["delta_nll"][p] for s in summary for p in s["delta_nll"]}
    scal.update({f"{s['dataset']}/w{s['w_max']}/recovered": s["recovered"] for s in summary})
    return SuiteResult("focus", {"focus": table(records, COLUMNS)}, {"horizon": h_o, "rows": summary}, scal, skipped)


def summarize(records: list[dict], h_o: int) -> list[dict]:
    """Per (w_max, dataset): each policy's mean ΔNLL@H_o over all its rows, the same on the
    oracle's rows, and the share of the oracle's gain LensNet recovers there."""
    out = []
    for key in dict.fromkeys((r["w_max"], r["dataset"]) for r in records):
        rs = [r for r in records if (r["w_max"], r["dataset"]) == key and r["horizon"] == h_o]
        mean = lambda p, sample=False: float(np.mean([r["delta_nll"] for r in rs if r["policy"] == p  # noqa: E731
                                                       and (r["oracle_sample"] or not sample)] or [np.nan]))
        on_sample = {p: mean(p, True) for p in POLICIES}
        gain = on_sample["recency"] - on_sample["oracle"]
        recovered = (on_sample["recency"] - on_sample["lensnet"]) / gain if gain > 1e-9 else float("nan")
        out.append({"w_max": key[0], "dataset": key[1], "horizon": h_o,
                    "budget": float(np.mean([r["budget"] for r in rs])),
                    "delta_nll": {p: mean(p) for p in POLICIES}, "delta_nll_oracle_rows": on_sample,
                    "oracle_rows": len({r["row"] for r in rs if r["oracle_sample"]}), "recovered": recovered})
    return out
