"""Where the retrieval suite's MegaContext answers miss: the needle's layout after ingest (CPU).

The `mcjax eval --suite retrieval` prompts of one length (passkey and kv, every depth of
eval.retrieval_depths, eval.retrieval_samples each) through the run's MegaContext engine as
the suite runs them (`retrieval.score_prompts`: ingest, then the answer teacher-forced), one
prompt at a time (extra arguments: overrides of the run's config, e.g. allocator.span_blocks=2), and after the ingest the LOD of the blocks holding the needle (its first
and last token) in the engine's layout: is a miss a needle left compressed (the policy) or
one the base does not read though it is raw (reading among gists)? ("raw blocks n/N" counts
the engine's N block slots at LOD0, the absent ones past the prompt included.)

RANK=1 also prints where LensNet ranks the needle in the layout the ingest's refocus starts from
(every block a gist but head and tail, `runtime.ingest_gists`; with `runtime.ingest_exchange` the
LOD2 superblocks come back as gists too): its best block's expand score as
the allocator ranks it (`unit_scores` + `span_scores`: span_blocks, span_back) among all the
gists', and how many gists the refocus expanded. RANK=recency adds its rank in the layout training's
policy start has (the most recent blocks raw up to W − R, gists before): does LensNet rank better
in the layouts it was trained on? TASK=kv (or passkey) runs one task only.

LENS=init swaps the checkpoint's LensNet for the one training starts from (training.seed), the rest
as trained: how much of the engine's retrieval the trained LensNet adds.

usage (repo root): [LENS=init] [RANK=1|recency] [TASK=kv] PYTHONPATH=. python bench/lens_learnability/eval_layouts.py RUN LENGTH [overrides...]
"""
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.eval.data import filler_tokens, load_datasets
from mcjax.eval.passkey import TASKS, make_prompt
from mcjax.eval.retrieval import _engine
from mcjax.eval.setup import plan as make_plan
from mcjax.megacontext.allocator import span_scores, tail_blocks, unit_scores
from mcjax.megacontext.layout import recency_baseline
from mcjax.restore import load_run
from mcjax.runtime.mc import enter_as_gists
from mcjax.train.setup import build_parts

run = load_run(sys.argv[1], sys.argv[3:])
if os.environ.get("LENS") == "init":
    start = build_parts(run.cfg).fresh().params["lensnet"]
    run = dataclasses.replace(run, params=dict(run.params, lensnet=start))
length = int(sys.argv[2])
plan = make_plan(run, ("retrieval",))
ev, k = plan.ev, plan.k
filler = filler_tokens(load_datasets(run), run.tokenizer.bos_id)
engine = _engine(plan, "megacontext", length, 1)


def recency_start(gists, length: int):
    """The layout training's policy start has (`data/variants.policy_start`): `recency_baseline`
    over the blocks present within W − R entries; the absent slots as in `gists`."""
    rt, n = engine.rt, -(-length // k)
    lod = np.array(gists)
    lod[:n] = recency_baseline(n, k, rt.w - rt.r, max_lod=rt.alloc.max_lod, sink_tokens=rt.alloc.sink_tokens,
                               recent_tokens=rt.alloc.recent_tokens)
    return jnp.asarray(lod, gists.dtype)


def rank_in(start, first: int, last: int) -> str:
    """LensNet's rank of the needle's best block among the gists of layout `start`, its
    expand scores as the allocator ranks them (spans included)."""
    rt, st = engine.rt, engine.state
    wc = rt.working_context(run.params, st._replace(block_lod=start[None]), rt.w)
    scores = rt.lensnet.apply({"params": run.params["lensnet"]}, wc)
    one = jax.tree.map(lambda x: x[0], wc)
    n1, p = len(start), rt.alloc
    us = span_scores(unit_scores(one, scores[0], n1, k), start, p.span_blocks, -(-p.sink_tokens // k),
                     p.span_back, tail_blocks(n1, p, st.tree.length[0]))
    best = np.where(np.asarray(start) == 1, np.asarray(us.expand[:n1]), -np.inf)
    mine = best[first:last + 1].max()
    where = f"rank {int((best > mine).sum()) + 1}" if np.isfinite(mine) else "not a gist"  # the head or tail, or LOD2
    return f"{where} of {int(np.isfinite(best).sum())} gists"


def needle_rank(first: int, last: int) -> str:
    """LensNet's rank of the needle's best block among the gists of the layout the ingest's
    refocus starts from; with RANK=recency also in training's policy start."""
    rt, st = engine.rt, engine.state
    lod0, length = st.block_lod[0], int(st.tree.length[0])
    # every free raw block a gist; with runtime.ingest_exchange the LOD2 superblocks too, as the
    # last chunk's refocus starts (when all of it fits W + P)
    capacity = rt.w + engine.chunk_for(length) if run.cfg.runtime.ingest_exchange else 0
    start = enter_as_gists(lod0, length, rt.alloc, -1, capacity)
    expanded = int(((np.asarray(lod0) == 0) & (np.asarray(start) == 1)).sum())
    out = f"{rank_in(start, first, last)} ({expanded} expanded)"
    if os.environ.get("RANK") == "recency":
        out += f"; recency start: {rank_in(recency_start(start, length), first, last)}"
    return out


rows, t0 = [], time.time()
for task in TASKS:
    if os.environ.get("TASK", task) != task:
        continue
    for d in ev.retrieval_depths:
        for s in range(ev.retrieval_samples):
            p = make_prompt(run.tokenizer, filler, task, length, d, s, ev.seed)
            engine.reset(ev.seed)  # as retrieval.score_prompts: ingest, then the answer teacher-forced
            engine.ingest([p.tokens], chunk=engine.chunk_for(length))
            lod = np.asarray(engine.state.block_lod)[0]  # the layout the answer is read from
            first, last = p.needle_start // k, (p.needle_start + p.needle_tokens - 1) // k
            rank = f"  {needle_rank(first, last)}" if os.environ.get("RANK") else ""  # before the answer moves the state
            logp, greedy = engine.score(p.answer[None])
            exact, nll = bool((greedy[0] == p.answer).all()), float(-logp[0].sum())
            raw = bool((lod[first:last + 1] == 0).all())
            rows.append((task, exact, raw))
            print(f"{task:8s} depth {d:3d} sample {s}: needle blocks {first}-{last} LOD {lod[first:last + 1].tolist()}  "
                  f"{'raw ' if raw else 'gist'}  exact {'yes' if exact else 'no '}  nll {nll:6.2f}  "
                  f"raw blocks {int((lod == 0).sum())}/{len(lod)}{rank}  ({time.time() - t0:.0f}s)", flush=True)
for task in TASKS:
    if os.environ.get("TASK", task) != task:
        continue
    r = np.array([(e, w) for t, e, w in rows if t == task], bool)
    print(f"{task}: exact {r[:, 0].mean():.2f}; needle raw {r[:, 1].mean():.2f}; exact when raw "
          f"{r[r[:, 1], 0].mean() if r[:, 1].any() else float('nan'):.2f}, when not "
          f"{r[~r[:, 1], 0].mean() if (~r[:, 1]).any() else float('nan'):.2f}")
