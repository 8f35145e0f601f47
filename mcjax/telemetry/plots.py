"""Plots of a run's `metrics.jsonl`: one PNG per panel in `PANELS`.

`plot_run(metrics_path, out_dir)` writes, for each panel with at least one of its metrics in the
file, `<out_dir>/<stem>.png`: the panel's metrics against the training step, one line per
metric, with title, legend and grid. The panels are `loss.png` (train/val/LOD losses),
`delta_nll.png` (ΔNLL of the compressed context vs. the full one) and `lens.png` (LensNet loss,
preference correlations and policy-score statistics), `edits.png` (the counterfactual edits'
labels and ranking loss), `focus_gap.png`, `focus_nll.png`, `retrieval.png` and `needle.png`
(validation of focus: `train/focus_eval.py`), `read_gate.png` (the base's bias toward gists: is the
read gate opening?). Each PNG is written atomically (temp file +
`os.replace`). Drawing uses matplotlib's object-oriented API with the Agg canvas, so no global
pyplot state or backend is touched.

CLI: `python -m mcjax.telemetry.plots <metrics.jsonl> [--out DIR]` (default DIR: `plots/` next to
the metrics file) prints the written paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (file stem, title, metric names) for each figure.
PANELS: tuple[tuple[str, str, list[str]], ...] = (
    (
        "loss",
        "Loss",
        ["train/loss", "val/loss", "val/mc_loss", "mc/lod_loss/0", "mc/lod_loss/1", "mc/lod_loss/2"],
    ),
    (
        "delta_nll",
        "ΔNLL (compressed − full context)",
        ["train/delta_nll_mean", "train/delta_nll_p95", "mc/lod_delta/1", "mc/lod_delta/2", "val/delta_nll",
         "mc/adv_delta_random_mean", "mc/adv_delta_policy_mean"],
    ),
    (
        "lens",
        "LensNet",
        [
            "mc/lens_loss",
            "mc/preference_corr_mean",
            "mc/pref_span_corr",
            "mc/policy_score_abs_mean",
            "mc/policy_score_std_mean",
        ],
    ),
    (
        "focus_gap",
        "Focus vs. recency and random at the same budget (val horizon NLL gap; > 0: LensNet better)",
        ["val/focus/gap_recency", "val/focus/gap_random"],
    ),
    (
        "focus_nll",
        "Val horizon NLL by layout",
        ["val/focus/horizon_loss_recency", "val/focus/horizon_loss_random", "val/focus/horizon_loss_lensnet",
         "val/focus/horizon_loss_attention"],
    ),
    (
        "retrieval",
        "Val synthetic-task answers exact (teacher-forced)",
        ["val/retrieval/exact_recency", "val/retrieval/exact_random", "val/retrieval/exact_lensnet",
         "val/retrieval/exact_attention"],
    ),
    (
        "edits",
        "Counterfactual edits: NLL gained by the best and by LensNet's first",
        ["mc/edit_value_best", "mc/edit_value_chosen", "mc/edit_value_expand_mean", "mc/edit_value_collapse_mean",
         "mc/edit_value_narrowed", "mc/edit_loss", "mc/edit_corr_mean"],
    ),
    (
        "needle",
        "Val task rows: the fact's block in the top k; held raw",
        ["val/needle/recall_at_1_lensnet", "val/needle/recall_at_16_lensnet", "val/needle/recall_at_1_attention",
         "val/needle/recall_at_16_attention", "val/needle/raw_lensnet", "val/needle/raw_recency"],
    ),
    (
        "read_gate",
        "The base's attention-logit bias toward gists (gistnet.read_gate; 0: a gist weighs as a token)",
        ["mc/read_gate_mean", "mc/read_gate_max"],
    ),
    ("focus", "Runtime swap rate (actions per LOD1 block, per refocus)", ["runtime/swap_rate"]),
    ("latency", "Runtime latency per decode block (ms)", ["runtime/latency_ms", "runtime/latency_p99"]),
)

_NOT_METRICS = frozenset({"step", "time"})


def read_metrics(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read `metrics.jsonl` into name -> (steps [N] int64, values [N] float64), sorted by step.

    Only numeric scalars are kept: nulls (non-finite values), histogram dicts, text and booleans
    are skipped, as are the `step` and `time` fields. A line that is not valid JSON is ignored
    if it is the last line (torn by a crash); anywhere else it raises ValueError naming the file
    and line number, as does a record that is not an object with an integer `step`.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    series: dict[str, tuple[list[int], list[float]]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break  # torn last line
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{path}:{lineno}: record is not an object with an integer 'step'")
        for name, value in rec.items():
            if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (steps, values) in series.items():
        s, v = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        out[name] = (s[order], v[order])
    return out


def _save_atomic(fig: Figure, path: Path) -> None:
    """Render `fig` as PNG to a temp file beside `path`, then `os.replace` it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            FigureCanvasAgg(fig).print_png(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_run(metrics_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write one PNG per panel of `PANELS` that has data into `out_dir`; return the paths written.

    Panels none of whose metrics appear in the file are skipped. A metric with a single point
    is drawn as a marker. Raises FileNotFoundError if `metrics_path` does not exist.
    """
    metrics_path, out_dir = Path(metrics_path), Path(out_dir)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_path}")
    metrics = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, title, names in PANELS:
        present = [n for n in names if n in metrics]
        if not present:
            continue
        fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for name in present:
            steps, values = metrics[name]
            ax.plot(steps, values, label=name, marker="o" if len(steps) == 1 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out_dir / f"{stem}.png"
        _save_atomic(fig, path)
        written.append(path)
    return written


def plot_lod_timeline(layouts: np.ndarray, steps: Sequence[int], path: str | os.PathLike[str], *, title: str) -> Path:
    """A picture of focus over time: one row per refocus (`steps`), one column per block,
    coloured by level of detail (LOD0 / LOD1 / LOD2; absent blocks blank).

    layouts int [S, N1] with -1 for blocks not yet present. Written atomically.
    """
    from matplotlib.colors import ListedColormap

    lay = np.asarray(layouts, np.float64)
    lay[lay < 0] = np.nan
    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = ListedColormap(["#2b83ba", "#fdae61", "#d7191c"]).with_extremes(bad="white")
    image = ax.imshow(lay, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=2.5,
                      extent=(0, lay.shape[1], steps[-1] + 0.5, steps[0] - 0.5))
    bar = fig.colorbar(image, ax=ax, ticks=[0, 1, 2])
    bar.ax.set_yticklabels(["LOD0 (tokens)", "LOD1 (gist of 32)", "LOD2 (gist of 1024)"])
    ax.set_xlabel("block (32 tokens), oldest left")
    ax.set_ylabel("refocus")
    ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: plot a `metrics.jsonl` and print the PNG paths written."""
    parser = argparse.ArgumentParser(
        prog="python -m mcjax.telemetry.plots", description="Plot a run's metrics.jsonl as PNG panels."
    )
    parser.add_argument("metrics", type=Path, help="path to a run's metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <metrics dir>/plots)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.metrics.parent / "plots"
    for path in plot_run(args.metrics, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
