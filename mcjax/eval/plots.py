"""The eval suites' pictures (PNG, written atomically; matplotlib's Agg canvas, no pyplot).

  delta_scatter.png        ΔNLL@H vs compression ratio, one point per row and setting, by
                           dataset, one panel per W_max, with the 0.1 (and 1024×: 0.2) lines
  focus.png                mean ΔNLL@H_o of each focus policy at equal budget
  retrieval_<method>.png   exact-match rate over needle depth × prompt length, per task
  boundary.png             ΔNLL@H and the answer's ΔNLL by the critical token's offset in its block
  stability.png            swap rate, budget utilization and block latency over the refocuses
  residency.png            histogram of residency at swap
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from mcjax.telemetry.plots import _save_atomic

MARKERS = {"lod1": "o", "lod2": "s", "random": "^", "lensnet": "*", "recency": "v", "oracle": "D", "attention": "P"}


def _figure(width=8.0, height=5.0, panels=1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, height), dpi=100, layout="constrained")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, path)
    return path


def _rows(t: pa.Table, **where) -> list[dict]:
    return [r for r in t.to_pylist() if all(r[k] == v for k, v in where.items())]


def delta_scatter(sweep: pa.Table, horizon: int, path: Path, trained_context: int) -> Path:
    rows = _rows(sweep, horizon=horizon)
    widths = sorted({r["w_max"] for r in rows})
    fig, axes = _figure(6.0, 4.5, len(widths))
    colors: dict[str, str] = {}
    for ax, w in zip(axes, widths):
        mine = [r for r in rows if r["w_max"] == w]
        for ds, policy in sorted({(r["dataset"], r["policy"]) for r in mine}):
            g = [r for r in mine if (r["dataset"], r["policy"]) == (ds, policy)]
            c = colors.setdefault(ds, f"C{len(colors)}")
            ax.scatter([r["compression_ratio"] for r in g], [r["delta_nll"] for r in g], s=18, alpha=0.6, color=c,
                       marker=MARKERS.get(policy, "o"), label=f"{ds} · {policy}")
        ax.axhline(0.1, color="red", linestyle="--", label="acceptance 0.1 (32×)")
        ax.axhline(0.2, color="red", linestyle=":", label="stress 0.2 (1024×)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio before the raw tail (tokens per entry)")
        ax.set_ylabel(f"ΔNLL@{horizon} (nats/token, compressed − full)")
        beyond = f" — beyond the trained length {trained_context:,}" if w > trained_context else ""
        ax.set_title(f"W_max = {w:,}{beyond}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Substitutability: ΔNLL vs compression")
    return _save(fig, path)


def focus_bars(summary: list[dict], path: Path) -> Path:
    fig, (ax,) = _figure(max(6.0, 2.5 * len(summary)))
    policies = ("lensnet", "recency", "random", "attention", "lensnet_dropped", "oracle")
    x, width = np.arange(len(summary)), 0.8 / len(policies)
    for i, p in enumerate(policies):
        ax.bar(x + (i - (len(policies) - 1) / 2) * width, [s["delta_nll"].get(p, np.nan) for s in summary], width=width,
               label=p)
    ax.set_xticks(x, [f"{s['dataset']}\nW={s['w_max']}, {s['budget']:.0f} entries" for s in summary])
    ax.set_ylabel(f"ΔNLL@{summary[0]['horizon']} (nats/token)" if summary else "ΔNLL")
    ax.set_title("Focus at equal budget (lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def retrieval_heatmap(records: pa.Table, method: str, path: Path) -> Path:
    rows = _rows(records, method=method)
    tasks = sorted({r["task"] for r in rows})
    fig, axes = _figure(5.0, 4.0, max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task]
        depths, lengths = sorted({r["depth"] for r in mine}), sorted({r["length"] for r in mine})
        grid = np.array([[np.mean([r["exact"] for r in mine if r["depth"] == d and r["length"] == n] or [np.nan])
                          for n in lengths] for d in depths])
        image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{c:,}" for c in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{v}%" for v in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: exact match, {method}")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


def boundary_lines(summary: list[dict], k: int, path: Path) -> Path:
    fig, (a, b) = _figure(6.0, 4.5, 2)
    h = max(s["horizon"] for s in summary)
    for s in summary:
        if s["horizon"] == h:
            a.plot(range(len(s["delta_nll_by_offset"])), s["delta_nll_by_offset"], marker="o", label=s["setting"])
            b.plot(range(len(s["answer_delta_nll_by_offset"])), s["answer_delta_nll_by_offset"], marker="o",
                   label=s["setting"])
    a.axhline(0.2, color="red", linestyle=":", label="target 0.2 (1024×)")
    a.set_title(f"ΔNLL@{h} by the critical token's offset")
    b.set_title("answer ΔNLL (nats, summed over its tokens)")
    for ax in (a, b):
        ax.set_xlabel(f"offset within its block (0..{k - 1})")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)


def stability_lines(records: pa.Table, path: Path) -> Path:
    d = _rows(records, phase="decode")
    fig, (a, b) = _figure(6.0, 4.5, 2)
    col = lambda rows, key: [r[key] for r in rows]  # noqa: E731
    a.plot(col(d, "refocus"), col(d, "swap_rate"), lw=0.8, label="swap rate")
    a.plot(col(d, "refocus"), col(d, "token_budget_utilization"), lw=0.8, label="budget utilization")
    a.axhline(0.25, color="red", linestyle="--", label="swap rate ≤ 0.25")
    a.set_title("Focus over the refocuses")
    warm = [r for r in d if not r["compiling"]]
    b.plot(col(warm, "refocus"), col(warm, "latency_ms"), lw=0.8)
    b.set_title("decode block latency (ms)")
    for ax in (a, b):
        ax.set_xlabel("refocus")
        ax.grid(True, alpha=0.3)
    a.legend()
    return _save(fig, path)


def residency_hist(residency: pa.Table, path: Path) -> Path:
    values = np.asarray(residency.column("residency").to_pylist(), np.float64)
    fig, (ax,) = _figure()
    if values.size:
        ax.hist(values, bins=min(50, max(5, int(values.max()) + 1)))
    ax.axvline(3, color="red", linestyle="--", label="target ≥ 3")
    ax.set_xlabel("refocuses a block stayed at its level before a swap")
    ax.set_ylabel("swaps")
    ax.set_title(f"Residency at swap ({values.size} swaps)")
    ax.legend()
    return _save(fig, path)
