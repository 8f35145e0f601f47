"""`mcjax eval`: the evaluation suites on a trained run, and the POC acceptance report.

    mcjax eval --run RUN [--suite delta|focus|retrieval|boundary|stability|all ...]
               [--data NAME=GLOB ...] [--step N] [eval.wmax=[2048,8192] ...]

The run (config mirror, tokenizer, params of its latest or `--step` checkpoint) is restored
once; every suite reads the held-out documents (`data.py`) and writes, under
`<out>/eval/<run>/`: its Parquet tables, `<suite>.json` (its summary), its PNG plots, and
the scalars `eval/<suite>/...` to the run's sinks (metrics.jsonl, TensorBoard, W&B at the
checkpoint's step); the ΔNLL sweep is also copied to `<out>/deltas/<run>_eval_sweep.parquet`.
After each suite `report.md` and `report.json` are rebuilt from every suite evaluated at
this checkpoint (results of another checkpoint are cleared first). Every file is written
atomically once its suite completes, so a failure leaves no half-written table; input
errors (run, suite, data, eval keys) stop with one line before anything is written.
Re-running with the same eval.seed gives the same tables (timings aside).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from mcjax.errors import UserError
from mcjax.eval.setup import SUITES

def suites_of(choices: list[str] | None) -> tuple[str, ...]:
    picked = choices or ["all"]
    out = []
    for c in picked:
        for name in c.split(","):
            if name == "all":
                out += SUITES
            elif name in SUITES:
                out.append(name)
            else:
                raise UserError(f"--suite {name}: unknown suite; choose from {', '.join(SUITES)} or all")
    return tuple(dict.fromkeys(out))


def _units(plan, suite: str, datasets) -> int:
    """The suite's work in progress-bar units (rows or prompts scored, oracle rounds, blocks)."""
    ev = plan.ev
    if suite == "delta":
        per = 2 + (plan.max_lod >= 2) + 3 * len(ev.targets)
        return sum(min(ev.rows, (len(d.stream) - 1) // w) * per for w in plan.wmax for d in datasets)
    if suite == "focus":
        per = lambda n: 5 * n + min(ev.oracle_rows, n) * (ev.oracle_rounds + 1)  # noqa: E731
        return sum(per(min(ev.rows, (len(d.stream) - 1) // w)) for w in plan.wmax for d in datasets)
    if suite == "retrieval":
        from mcjax.eval.retrieval import method_lengths, run_methods

        per_length = 2 * len(ev.retrieval_depths) * ev.retrieval_samples
        return per_length * sum(len(method_lengths(plan, m)) for m in run_methods(plan))
    if suite == "boundary":
        return plan.k * ev.boundary_samples * 4
    return 2 * ev.stability_refocuses


def _check_data(plan, suites, datasets) -> None:
    """Every row length a suite needs fits in every dataset (DataError before anything runs)."""
    lengths = set(plan.wmax) if {"delta", "focus"} & set(suites) else set()
    if "boundary" in suites:
        lengths.add(plan.boundary_length())
    for w in sorted(lengths):
        for d in datasets:
            d.rows(w, 1)
    from mcjax.errors import ConfigError
    from mcjax.eval.data import filler_tokens

    filler = filler_tokens(datasets, plan.run.tokenizer.bos_id)
    if "boundary" in suites:
        from mcjax.eval.boundary import make_row

        try:
            for offset in (0, plan.k - 1):
                make_row(plan, filler, plan.boundary_length(), offset, 0)
        except ValueError as e:
            raise ConfigError(f"{plan.cfg.source_file}: eval.boundary_length: {e}") from None
    if "retrieval" in suites:
        from mcjax.eval.passkey import TASKS, make_prompt

        for task in TASKS:
            try:
                make_prompt(plan.run.tokenizer, filler, task, min(plan.retrieval_lengths()), 0, 0)
            except ValueError as e:
                raise ConfigError(f"{plan.cfg.source_file}: eval.retrieval_lengths: {e}") from None


def _clear_stale(out_dir: Path, step: int) -> None:
    """Results of another checkpoint do not mix into this one's report."""
    report = out_dir / "report.json"
    if out_dir.is_dir() and report.is_file():
        try:
            old = json.loads(report.read_text()).get("step")
        except ValueError:
            old = None
        if old != step:
            shutil.rmtree(out_dir)


def _write_suite(out_dir: Path, deltas_dir: Path, result, plan, step: int) -> None:
    """The suite's tables (and the sweep's copy under deltas/), plots and summary, each atomically."""
    import pyarrow.parquet as pq

    from mcjax.eval import plots
    from mcjax.eval.report import write_atomic

    for stem, t in result.tables.items():
        path = out_dir / f"{stem}.parquet"
        pq.write_table(t, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
    if "eval_sweep" in result.tables:
        deltas_dir.mkdir(parents=True, exist_ok=True)
        copy = deltas_dir / f"{plan.run.run_dir.name}_eval_sweep.parquet"
        shutil.copyfile(out_dir / "eval_sweep.parquet", copy.with_name(copy.name + ".tmp"))
        os.replace(copy.with_name(copy.name + ".tmp"), copy)
    s, t = result.summary, result.tables
    if result.suite == "delta" and t["eval_sweep"].num_rows:
        plots.delta_scatter(t["eval_sweep"], max(plan.horizons), out_dir / "delta_scatter.png", plan.cfg.dataset.context_tokens)
    elif result.suite == "focus" and s["rows"]:
        plots.focus_bars(s["rows"], out_dir / "focus.png")
    elif result.suite == "retrieval":
        for m in sorted({r["method"] for r in s["rows"]}):
            plots.retrieval_heatmap(t["retrieval"], m, out_dir / f"retrieval_{m}.png")
    elif result.suite == "boundary":
        plots.boundary_lines(s["rows"], plan.k, out_dir / "boundary.png")
    elif result.suite == "stability":
        plots.stability_lines(t["stability"], out_dir / "stability.png")
        plots.residency_hist(t["residency"], out_dir / "residency.png")
    payload = {"suite": result.suite, "step": step, "summary": s, "skipped": result.skipped}
    write_atomic(out_dir / f"{result.suite}.json", json.dumps(payload, indent=2) + "\n")  # NaN kept (Python reads it)


def _load_suites(out_dir: Path) -> dict[str, dict]:
    out = {}
    for name in SUITES:
        path = out_dir / f"{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def acceptance_card(title: str, accept: list[dict]) -> str:
    """The acceptance rows as a short table for the terminal."""
    from mcjax.eval.report import value_text

    width = max(len(a["criterion"]) for a in accept)
    lines = [f"── POC acceptance: {title} " + "─" * max(0, 40 - len(title))]
    for a in accept:
        lines.append(f"  {a['criterion']:<{width}}  {a['target']:<8} {value_text(a):>9}  {a['status']:<7} ({a['measured']})")
    return "\n".join(lines)


def main(args) -> None:
    suites = suites_of(args.suite)
    from mcjax.restore import load_run

    run = load_run(args.run, args.overrides, args.step)
    import jax

    from mcjax.eval import boundary, delta, focus, retrieval, stability
    from mcjax.eval.data import load_datasets
    from mcjax.eval.report import write as write_report
    from mcjax.eval.setup import plan as make_plan
    from mcjax.telemetry import Telemetry

    plan = make_plan(run, suites)
    datasets = load_datasets(run, args.data or ())
    _check_data(plan, suites, datasets)
    from mcjax.telemetry.progress import bar as progress_bar

    out_dir = plan.out_dir
    _clear_stale(out_dir, run.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    deltas_dir = run.run_dir.parent.parent / "deltas"
    telemetry = Telemetry(run.cfg, out_dir)
    cfg = run.cfg
    meta = {"run": run.run_dir.name, "step": run.step, "date": time.strftime("%Y-%m-%d"),
            "trained_context": cfg.dataset.context_tokens,
            "device": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
            "model": (f"{cfg.base_model.name} (frozen, LoRA rank {cfg.lora.rank}; {cfg.base_model.depth} layers, "
                      if cfg.pretrained else f"d{cfg.base_model.depth} GPT (")
                     + f"{cfg.model_dim} wide, vocab {cfg.dataset.vocab_size:,}), "
                     f"trained at T = {cfg.dataset.context_tokens:,}, W_max = {cfg.wc_capacity:,}; "
                     f"eval tail {plan.tail} tokens, horizons {list(plan.horizons)}",
            "data": "; ".join(f"{d.name}: {len(d.stream):,} tokens ({d.source})" for d in datasets)}
    runners = {"delta": delta.run, "focus": focus.run, "retrieval": retrieval.run, "boundary": boundary.run,
               "stability": lambda p, d, b: stability.run(p, d, b, out_dir / "stability_traces.jsonl")}
    started = time.perf_counter()
    try:
        for suite in suites:
            t0 = time.perf_counter()
            with progress_bar(_units(plan, suite, datasets), suite) as bar:
                result = runners[suite](plan, datasets, bar)
            _write_suite(out_dir, deltas_dir, result, plan, run.step)
            telemetry.log(run.step, {f"eval/{suite}/{k}": v for k, v in result.scalars.items()})
            accept = write_report(out_dir, meta, _load_suites(out_dir))  # every suite of this checkpoint so far
            print(f"eval: {suite} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        telemetry.summary({f"eval/accept/{a['criterion']}": float(a["status"] == "PASS") for a in accept})
    finally:
        telemetry.close()
    print(acceptance_card(f"{run.run_dir.name} step {run.step}", accept))
    print(f"eval: {len(suites)} suite(s) in {time.perf_counter() - started:.0f}s; report: {out_dir / 'report.md'}")

