"""Retrieval: can a fact far back in a long prompt still be recalled?

Prompts of `passkey.py` (both tasks, every length in eval.retrieval_lengths, every depth in
eval.retrieval_depths, eval.retrieval_samples each) go through the runtime engines of
eval.retrieval_methods (default all three), one engine each for every length:
  full         the GPT reading the whole prompt (the plain engine with a window as long as
               the longest prompt, so every token sees all before it; only prompts of
               L ≤ eval.full_context_max);
  megacontext  the MegaContext engine at the run's W_max (a MegaContext run only);
  recency      the GPT with a W_max window: truncation to the last W_max tokens.
Each engine ingests the prompt and then scores the answer (`Engine.score`: the answer's
tokens decoded against the cache exactly as generation would decode them). A prompt
counts as *exact* when the greedy choice equals the answer at every answer token — that is,
greedy generation would have produced the answer — and its answer NLL is the sum of the
answer tokens' NLLs. Table `retrieval`: task, method, length, depth, sample, w_max, exact,
answer_nll, answer_tokens, needle_start.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from mcjax.config import RETRIEVAL_METHODS as METHODS
from mcjax.eval.data import EvalData, filler_tokens
from mcjax.eval.passkey import TASKS, Prompt, make_prompt
from mcjax.eval.result import SuiteResult, table
from mcjax.eval.setup import Plan, derive

COLUMNS = {
    "task": pa.string(), "method": pa.string(), "length": pa.int32(), "depth": pa.int32(), "sample": pa.int32(),
    "w_max": pa.int32(), "exact": pa.bool_(), "answer_nll": pa.float64(), "answer_tokens": pa.int32(),
    "needle_start": pa.int32(),
}


def _engine(plan: Plan, method: str, longest: int, batch: int):
    """The method's engine, sized for prompts of up to `longest` tokens plus one answer block."""
    from mcjax.runtime import Engine

    r = plan.cfg.runtime.refocus_interval
    if method == "full":
        cfg, kind = derive(plan.cfg, {"megacontext.wc_capacity": longest + r}), "plain"
    elif method == "recency":
        cfg, kind = plan.cfg, "plain"
    else:
        cfg, kind = derive(plan.cfg, {"runtime.max_tokens": longest + r}), "mc"
    return Engine(dataclasses.replace(plan.run, cfg=cfg), kind=kind, batch=batch)


def score_prompts(engine, prompts: list[Prompt], seed: int = 0, done=lambda n: None) -> list[tuple[bool, float]]:
    """(exact, answer NLL) of each prompt through `engine` (its batch at a time); done(n)
    after each batch of n prompts (the progress bar)."""
    b, out = engine.batch, []
    chunk = engine.chunk_for(max(len(p.tokens) for p in prompts))
    for start in range(0, len(prompts), b):
        group = prompts[start : start + b]
        pad = group + [group[-1]] * (b - len(group))  # the batch filled with copies, results dropped
        n = max(len(p.answer) for p in pad)
        answers = np.stack([np.pad(p.answer, (0, n - len(p.answer)), mode="edge") for p in pad])
        engine.reset(seed)
        engine.ingest([p.tokens for p in pad], chunk=chunk)
        logp, greedy = engine.score(answers)
        for i, p in enumerate(group):
            m = len(p.answer)
            out.append((bool((greedy[i, :m] == p.answer).all()), float(-logp[i, :m].sum())))
        done(len(group))
    return out


def run_methods(plan: Plan) -> list[str]:
    """The engines this run's retrieval suite uses: eval.retrieval_methods, MegaContext only for a MegaContext run."""
    return [m for m in METHODS if m in plan.ev.retrieval_methods and (m != "megacontext" or plan.run.megacontext)]


def method_lengths(plan: Plan, method: str) -> list[int]:
    """The prompt lengths `method` reads: all of them, the full context only up to eval.full_context_max."""
    return [n for n in plan.retrieval_lengths() if method != "full" or n <= plan.ev.full_context_max]


def run(plan: Plan, datasets: list[EvalData], bar) -> SuiteResult:
    ev, run_ = plan.ev, plan.run
    filler = filler_tokens(datasets, run_.tokenizer.bos_id)
    methods = run_methods(plan)
    lengths = plan.retrieval_lengths()
    prompts = {n: [make_prompt(run_.tokenizer, filler, task, n, d, s, ev.seed)
                   for task in TASKS for d in ev.retrieval_depths for s in range(ev.retrieval_samples)] for n in lengths}
    records = []
    skipped = [f"{m}: not in eval.retrieval_methods" for m in METHODS if m not in ev.retrieval_methods]
    for method in methods:
        mine = method_lengths(plan, method)
        skipped += [f"full context at {n:,} tokens: above eval.full_context_max ({ev.full_context_max:,})"
                    for n in lengths if n not in mine]
        if not mine:
            continue
        engine = _engine(plan, method, max(mine), min(ev.batch, len(prompts[mine[0]])))
        for n in mine:
            bar.set_postfix_str(f"retrieval {method} L={n}")
            w = engine.cfg.wc_capacity
            for p, (exact, nll) in zip(prompts[n], score_prompts(engine, prompts[n], ev.seed, bar.update)):
                records.append(dict(task=p.task, method=method, length=n, depth=p.depth, sample=p.sample, w_max=w,
                                    exact=exact, answer_nll=nll, answer_tokens=len(p.answer), needle_start=p.needle_start))
    summary = summarize(records)
    scal = {f"{s['task']}/{s['method']}/L{s['length']}/exact": s["exact"] for s in summary}
    scal.update({f"{s['task']}/{s['method']}/L{s['length']}/answer_nll": s["answer_nll"] for s in summary})
    return SuiteResult("retrieval", {"retrieval": table(records, COLUMNS)}, {"rows": summary}, scal, skipped)


def summarize(records: list[dict]) -> list[dict]:
    """Exact-match rate and mean answer NLL per (task, method, length), over depths and samples."""
    out = []
    for key in dict.fromkeys((r["task"], r["method"], r["length"]) for r in records):
        rs = [r for r in records if (r["task"], r["method"], r["length"]) == key]
        out.append({"task": key[0], "method": key[1], "length": key[2], "w_max": rs[0]["w_max"], "prompts": len(rs),
                    "exact": float(np.mean([r["exact"] for r in rs])),
                    "answer_nll": float(np.mean([r["answer_nll"] for r in rs]))})
    return out
