"""`mcjax generate` and `mcjax infer`: the runtime engine from the command line.

generate  continue one prompt, streaming the decoded text to stdout as each block of R
          tokens completes (run, step and engine on stderr).
infer     stream documents (one per stream, `--batch` side by side) through ingest and
          refocus — and optionally generation — with a progress bar over tokens, writing
          the runtime telemetry (`monitor.py`) to `<out>/runs/<run>/infer/` (metrics.jsonl,
          TensorBoard, W&B, lod_strips.txt, generations.jsonl, summary.json, plots/*.png)
          and the action traces to `<out>/traces/<run>.jsonl`.

Everything a user can get wrong (the run, the files, the sampling flags, a prompt or a
document longer than runtime.max_tokens, the engine) is checked before anything is
written, and reported as one line.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mcjax.errors import DataError, UserError
from mcjax.runtime.sampling import Sampling


def _sampling(args) -> Sampling:
    s = Sampling(temperature=args.temperature, top_k=args.top_k)
    try:
        s.check()
    except ValueError as e:
        raise UserError(f"--{e}") from None
    return s


def _engine(args, batch: int = 1):
    from mcjax.runtime import Engine

    return Engine.from_run(args.run, args.overrides, step=args.step, kind=args.engine, batch=batch)


def _printable(text: str) -> str:
    """Hold back a trailing partial UTF-8 character (decoded as U+FFFD) until it completes."""
    return text.rstrip("\ufffd")


def generate(args) -> None:
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise DataError(f"--prompt-file {path}: file not found")
        prompt = path.read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be ≥ 0")
    sampling = _sampling(args)
    engine = _engine(args)
    ids = engine.encode(prompt)
    t0 = time.perf_counter()
    engine.ingest([ids])
    print(f"run {engine.run.run_dir.name} step {engine.run.step}, {engine.kind} engine: "
          f"{len(ids):,} prompt tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    out: list[int] = []
    shown = ""
    for block in engine.generate(args.max_new_tokens, sampling, seed=args.seed):
        out += block[0].tolist()
        text = _printable(engine.tokenizer.decode(out[: args.max_new_tokens]))
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(engine.tokenizer.decode(out[: args.max_new_tokens])[len(shown):] + "\n")


def _documents(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if Path(p).is_file()]
        if not found:
            raise DataError(f"--input {pattern}: no file matches")
        paths += found
    return paths


def infer(args) -> None:
    from mcjax.runtime.monitor import Monitor
    from mcjax.telemetry import Telemetry
    from mcjax.telemetry.plots import plot_lod_timeline, plot_run
    from mcjax.train.loop import report_card

    if args.generate < 0:
        raise UserError(f"--generate {args.generate}: must be ≥ 0")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be ≥ 1")
    sampling = _sampling(args)
    paths = _documents(args.input)
    engine = _engine(args, batch=args.batch)
    docs = [engine.encode(p.read_text(encoding="utf-8", errors="replace")) for p in paths]
    extra = -(-args.generate // engine.block) * engine.block
    for path, doc in zip(paths, docs):
        if len(doc) + extra > engine.capacity:
            raise UserError(f"--input {path}: {len(doc):,} tokens (+ {extra} to generate) exceed runtime.max_tokens "
                            f"({engine.cfg.runtime.max_tokens:,}; set runtime.max_tokens=N)")

    run_dir = engine.run.run_dir
    out_dir = run_dir / "infer"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # one infer's outputs at a time
    out_dir.mkdir(parents=True)
    traces = run_dir.parent.parent / "traces" / f"{run_dir.name}.jsonl"
    traces.parent.mkdir(parents=True, exist_ok=True)
    tmp_traces = traces.with_name(traces.name + ".tmp")
    telemetry = Telemetry(engine.cfg, out_dir)
    rt = engine.cfg.runtime
    from tqdm import tqdm

    bar = tqdm(total=sum(map(len, docs)), unit="tok", unit_scale=True, disable=None, file=sys.stderr)
    monitor = Monitor(k=engine.cfg.dataset.block_size, w_max=engine.cfg.wc_capacity, telemetry=telemetry,
                      traces=tmp_traces if engine.kind == "mc" else None, strips=out_dir / "lod_strips.txt",
                      strip_every=rt.lod_strip_every if engine.kind == "mc" else 0, echo=bar.write)
    engine.monitor = monitor
    chunk = engine.chunk_for(max(map(len, docs)))  # one ingest program for every document
    started = time.perf_counter()
    try:
        with open(out_dir / "generations.jsonl", "w") as gens:
            for first in range(0, len(docs), args.batch):
                group = docs[first : first + args.batch]
                engine.reset(seed=args.seed)
                engine.ingest(group + [[] for _ in range(args.batch - len(group))], progress=bar.update, chunk=chunk)
                if args.generate:
                    outs = np.concatenate(list(engine.generate(args.generate, sampling, seed=args.seed)), axis=1)
                    for i, path in enumerate(paths[first : first + len(group)]):
                        text = engine.tokenizer.decode(outs[i, : args.generate].tolist())
                        gens.write(json.dumps({"input": str(path), "text": text}) + "\n")
        if engine.kind == "mc":
            os.replace(tmp_traces, traces)
    finally:
        bar.close()
        monitor.close()
        tmp_traces.unlink(missing_ok=True)
    card = {"documents": float(len(docs)), "tokens": float(sum(map(len, docs))),
            **monitor.summary(), "wall_seconds": time.perf_counter() - started}
    telemetry.summary(card)
    telemetry.close()
    plots = plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
    if monitor.timeline:
        steps = [s for s, _ in monitor.timeline]
        blocks = max(int((row >= 0).sum()) for _, row in monitor.timeline)
        plots.append(plot_lod_timeline(np.stack([row[:blocks] for _, row in monitor.timeline]), steps,
                                       out_dir / "plots" / "lod_timeline.png",
                                       title=f"{run_dir.name}: focus of stream 0 over refocuses (documents one after another)"))
    print(report_card(f"{run_dir.name} infer ({engine.kind})", card))
    print(f"telemetry: {out_dir}" + (f"; traces: {traces}" if engine.kind == "mc" else "") + "; plots: "
          + ", ".join(p.name for p in plots))
