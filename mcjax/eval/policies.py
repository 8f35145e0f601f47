"""Layouts the eval suites compare, for rows of N1 blocks whose last `tail` blocks stay raw
(and the first `head` blocks, the protected head of megacontext.sink_tokens: "before the
tail" below means between the head and the tail).

  full        every block at LOD0: the full-context reference (L entries)
  lod1        every block before the tail at LOD1 (32× there)
  lod2        every complete superblock before the tail at LOD2 (1024× there), the
              remaining blocks before the tail at LOD1
  floor       the least a budget allows: lod1, then the oldest superblocks at LOD2 until
              it fits — where every other budgeted policy starts
  recency     the floor, then the newest gists expanded to LOD0 while the budget allows:
              the most recent blocks raw, older ones in gists
  random      uniformly random compression at the budget: random superblocks to LOD2 until
              the floor fits, then random raw blocks to LOD1 until the layout does
  lensnet     what the runtime engine holds after ingesting the row with W_max = budget + R
              (LensNet scores, the focus allocator's forced collapses and edits;
              `lensnet_layouts`)
Budgeted layouts hold at most `budget` entries (recency and random within K − 1 of it
where the granularity allows). All are numpy int8 [N1] and valid (`check_layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mcjax.eval.setup import Plan, derive
from mcjax.megacontext.layout import entry_count, recency_baseline


def full(n1: int) -> np.ndarray:
    return np.zeros(n1, np.int8)


def lod1(n1: int, k: int, tail_blocks: int, head: int = 0) -> np.ndarray:
    """Every block between the first `head` and the last `tail_blocks` at LOD1."""
    lod = np.zeros(n1, np.int8)
    lod[head : n1 - tail_blocks] = 1
    return lod


def superblocks(n1: int, k: int, tail_blocks: int, head: int = 0) -> np.ndarray:
    """Indices of the complete superblocks wholly between the head and the tail."""
    return np.arange(-(-head // k), (n1 - tail_blocks) // k)


def lod2(n1: int, k: int, tail_blocks: int, head: int = 0) -> np.ndarray:
    lod = lod1(n1, k, tail_blocks, head)
    for s in superblocks(n1, k, tail_blocks, head):
        lod[s * k : (s + 1) * k] = 2
    return lod


def floor(n1: int, k: int, tail_blocks: int, budget: int, max_lod: int = 2, head: int = 0) -> np.ndarray | None:
    """The lod1 layout with the oldest superblocks at LOD2 until ≤ budget; None if none fits."""
    lod = lod1(n1, k, tail_blocks, head)
    for s in superblocks(n1, k, tail_blocks, head) if max_lod >= 2 else ():
        if entry_count(lod, k) <= budget:
            return lod
        lod[s * k : (s + 1) * k] = 2
    return lod if entry_count(lod, k) <= budget else None


def recency(n1: int, k: int, tail_blocks: int, budget: int, max_lod: int = 2, head: int = 0) -> np.ndarray | None:
    """The training's recency baseline (`layout.recency_baseline`) at this budget; None if none fits."""
    try:
        return recency_baseline(n1, k, budget, max_lod=max_lod, sink_tokens=head * k, recent_tokens=tail_blocks * k)
    except ValueError:
        return None


def random(rng: np.random.Generator, n1: int, k: int, tail_blocks: int, budget: int, max_lod: int = 2,
           head: int = 0) -> np.ndarray | None:
    lod = np.zeros(n1, np.int8)
    gists = lod1(n1, k, tail_blocks, head)
    supers = rng.permutation(superblocks(n1, k, tail_blocks, head)) if max_lod >= 2 else np.zeros(0, int)
    chosen = 0
    while entry_count(np.where(lod == 2, 2, gists), k) > budget:
        if chosen == len(supers):
            return None
        s = supers[chosen]
        lod[s * k : (s + 1) * k] = 2
        chosen += 1
    count = entry_count(lod, k)
    for b in head + rng.permutation(n1 - tail_blocks - head):
        if count <= budget:
            break
        if lod[b] == 0:
            lod[b], count = 1, count - (k - 1)
    return lod


def compression_ratio(lod: np.ndarray, k: int, tail_blocks: int) -> float:
    """Tokens per entry before the tail (1 for raw blocks, 32 for LOD1, 1024 for LOD2 at K = 32)."""
    head = np.asarray(lod)[: len(lod) - tail_blocks]
    entries = entry_count(head, k) if len(head) else 0
    return float(len(head) * k / entries) if entries else 1.0


def lensnet_layouts(plan: Plan, rows: np.ndarray, budget: int, progress: Callable[[int], None] | None = None,
                    seed: int = 0) -> np.ndarray:
    """The layouts the MegaContext runtime engine holds after ingesting each row's L tokens
    (`runtime.ingest_chunk` at a time, LensNet + allocator after each chunk) with W_max =
    budget + R and no collapse margin, so its final layout has ≤ budget entries; the
    allocator's settings are the run's. rows int [R, L+1] -> int8 [R, L/K]."""
    from mcjax.runtime import Engine

    length = rows.shape[1] - 1
    rt = plan.cfg.runtime
    cfg = derive(plan.cfg, {"megacontext.wc_capacity": budget + rt.refocus_interval, "megacontext.recent_tokens": plan.tail,
                            "runtime.collapse_margin": 0, "runtime.max_tokens": length})
    batch = min(plan.ev.batch, len(rows))
    engine = Engine(dataclasses.replace(plan.run, cfg=cfg), kind="mc", batch=batch)
    n1 = length // plan.k
    out = np.empty((len(rows), n1), np.int8)
    chunk = engine.chunk_for(length)
    for start in range(0, len(rows), batch):
        group = [r[:length] for r in rows[start : start + batch]]
        engine.reset(seed)
        engine.ingest(group + [[]] * (batch - len(group)), chunk=chunk)
        out[start : start + len(group)] = np.asarray(engine.state.block_lod)[: len(group), :n1]
        if progress is not None:
            progress(len(group))
    return out


_FILL_PROGRAMS: dict = {}


def scored_fill(plan: Plan, rows: np.ndarray, budgets, scorer: str, passes: int = 2,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Layouts chosen in one shot by a per-entry scorer within each row's budget (an int, or
    int [R]; each at least the floor's entries): from the floor,
    `passes` times assemble the working context, score its entries and let the focus
    allocator's fill expand the best-scored gists into the budget (no thresholds, no swaps).
    scorer: "lensnet" (the run's LensNet) or "attention" (the training-free rival,
    `megacontext/attention_rival.py`: the base's attention mass from the raw tail, over
    megacontext.rival_layers). rows int [R, L+1] -> int8 [R, L/K]."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from mcjax.megacontext.allocator import AllocatorParams, fill_units, never_changed, refocus
    from mcjax.train.mc_step import MCForward

    length = rows.shape[1] - 1
    k, tb, hb = plan.k, plan.tail // plan.k, plan.head // plan.k
    n1 = length // k
    budgets = np.broadcast_to(np.asarray(budgets, np.int32), (len(rows),))
    budget = int(budgets.max())  # the working contexts' width; each row fills to its own budget
    cfg = derive(plan.cfg, {"dataset.context_tokens": length, "megacontext.wc_capacity": budget,
                            "megacontext.recent_tokens": plan.tail})
    key = (plan.run.model, scorer, repr(sorted(cfg.to_dict().items())))
    if key not in _FILL_PROGRAMS:
        fw = MCForward(plan.run.model, cfg)
        alloc = AllocatorParams(k=k, w_max=budget, recent_tokens=plan.tail, sink_tokens=plan.head, max_lod=plan.max_lod,
                                max_replacements=1, expand_threshold=2.0, collapse_threshold=2.0, cooldown_steps=0, iterations=1,
                                fill_units=fill_units(budget, k))

        def one_pass(params, tokens, lod, limit):
            wc = fw.assemble(fw.tree(params, tokens), lod[:, None], budget)  # [R, budget]
            scores = fw.scores(params, wc) if scorer == "lensnet" else fw.rival_scores(params, wc)
            def move(lod, wc, scores, limit):
                return refocus(lod, wc, scores, never_changed(n1), 0, jax.random.key(0), dc.replace(alloc, w_max=limit))[0]

            return jax.vmap(move)(lod, wc, scores, limit)

        _FILL_PROGRAMS[key] = jax.jit(one_pass)
    step = _FILL_PROGRAMS[key]
    out = np.empty((len(rows), n1), np.int8)
    batch = max(1, plan.ev.batch)
    for lo in range(0, len(rows), batch):
        idx = np.minimum(np.arange(lo, lo + batch), len(rows) - 1)  # fixed-size calls: the last padded
        lod = jnp.asarray(np.stack([floor(n1, k, tb, int(b), plan.max_lod, hb) for b in budgets[idx]]))
        for _ in range(passes):
            lod = step(plan.run.params, jnp.asarray(rows[idx]), lod, jnp.asarray(budgets[idx]))
        n = min(batch, len(rows) - lo)
        out[lo : lo + n] = np.asarray(lod)[:n]
        if progress is not None:
            progress(n)
    return out
