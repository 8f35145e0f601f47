"""Where does a trained LensNet's greedy policy miss the fact? (CPU, a trained run's checkpoint)

The training probe's LensNet layout (`focus_eval`: `MCForward.policy` with the greedy allocator from
the recency layout at W_max) for val task rows, row by row: the task, the fact's block and its LOD
in the recency layout, whether the policy made it raw, the fact's rank among the blocks the start
layout compresses (the allocator's expand candidates, by their gist's score; 0 = first), how many
blocks the policy expanded (ROWS=i,j,…: only those val rows), and — with EXACT=1 — whether the base answers
exactly on that layout, and on two oracle layouts: recency with the fact's block raw, and with the
next block raw too (a fact of ~20 tokens often runs into it), each paid for by the oldest raw blocks.
SPLIT=1 (with EXACT): the first oracle becomes recency + the policy's expansions alone, paid for by
the oldest raw blocks instead of the policy's own collapses. ALLFACTS=1 (with EXACT): it becomes
recency + every key–value fact of the row raw with its next block (the asked one and its look-alikes). FACTS=1: also the blocks where the row's key–value facts start and the blocks the policy expanded.
DILATE=1: every gist scored max(its own score, its predecessor's), so the block after a wanted one
is expanded too (the logs of 2026-12-07; the allocator's own form, raw blocks included, is the
override allocator.span_blocks=2). NOLORA=1: every LoRA B matrix zeroed (the frozen base as it came, with the trained GistNet and LensNet). Extra arguments are overrides of the run's config (e.g. megacontext.policy_rounds=4
allocator.max_replacements=8): does more editing at eval time reach the fact?

usage (repo root): PYTHONPATH=. python bench/lens_learnability/probe_rows.py RUN NROWS [overrides...]
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.data.tasks import TASKS
from mcjax.data.variants import EVAL, VariantSpec, sample_layouts
from mcjax.megacontext import losses as L
from mcjax.restore import load_run
from mcjax.train.focus_eval import make_focus_probe
from mcjax.train.mc_step import MCForward, policy_params

RUN, NROWS, OVERRIDES = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
EXACT = os.environ.get("EXACT") == "1"
if os.environ.get("DILATE") == "1":  # a block's gist also takes its predecessor's score: a fact runs into the next block
    _scores = MCForward.scores

    def _dilated(self, params, wc):
        s = _scores(self, params, wc)
        follows = (wc.lod[..., 1:] == 1) & (wc.lod[..., :-1] == 1) & wc.valid[..., 1:]
        return s.at[..., 1:].set(jnp.where(follows, jnp.maximum(s[..., 1:], s[..., :-1]), s[..., 1:]))

    MCForward.scores = _dilated
run = load_run(RUN, OVERRIDES)
cfg, params = run.cfg, run.params
if os.environ.get("NOLORA") == "1":  # the base as it came: every LoRA B matrix zero
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "lora" in jax.tree_util.keystr(p) and jax.tree_util.keystr(p).endswith("_b']") else x, params)
    print("LoRA off:", sum(int("lora" in jax.tree_util.keystr(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)), "LoRA leaves")
fw = MCForward(run.model, cfg)
greedy = policy_params(cfg, explore=False)
k, cap = cfg.dataset.block_size, cfg.wc_capacity
spec = VariantSpec.from_config(cfg)
start = sample_layouts(spec, cap, seed=0, step=0, rows=np.array([0]), stream=EVAL)[0, 0]  # the recency layout
path = cfg.dataset.splits["val"].output_path
task, ans, needle = row_tasks(path)
src = ArrowSequences(path)
rows = [int(i) for i in np.flatnonzero((task > 0) & (needle >= 0))][:NROWS]
if os.environ.get("ROWS"):  # only these val rows
    rows = [int(i) for i in os.environ["ROWS"].split(",")]
print(f"{run.run_dir.name} step {run.step}: policy_rounds {cfg.megacontext.policy_rounds}, max_replacements "
      f"{cfg.allocator.max_replacements}; recency: {int((start == 0).sum())} raw / {int((start == 1).sum())} LOD1 / "
      f"{int((start == 2).sum())} LOD2 blocks; {len(rows)} val task rows", flush=True)


@jax.jit
def policy(params, tokens):
    tree = fw.tree(params, tokens)
    lay = jnp.asarray(start)[None]
    chosen, _ = fw.policy(params, tree, lay, 1, cap, jax.random.key(0), greedy)
    wc = fw.assemble(tree, lay[:, None], cap)
    u = L.block_scores(jax.tree.map(lambda x: x[0], wc), fw.scores(params, wc)[0], lay[0], k)
    return chosen[0, 0], u


probe = jax.jit(make_focus_probe(run.model, cfg), static_argnums=5) if EXACT else None
raw_region = np.flatnonzero(start == 0)
oldest_raw = raw_region[raw_region >= cfg.megacontext.sink_tokens // k]  # after the head


def oracle(blocks):
    """The recency layout with `blocks` raw, paid for by collapsing as many of its oldest raw blocks."""
    lay = start.copy()
    lay[oldest_raw[:len(blocks)]] = 1
    lay[blocks] = 0
    return lay
out, t0 = [], time.time()
for j, i in enumerate(rows):
    tok = jnp.asarray(src[i][None])
    chosen, u = jax.device_get(policy(params, tok))
    fb = int(needle[i]) // k
    cand = start > 0  # compressed in the start layout: what the allocator may expand
    rank = int(((u > u[fb]) & cand).sum()) if cand[fb] else -1
    raw = bool(chosen[fb] == 0)
    line = (f"row {i:4d} {TASKS[task[i] - 1]:8s} fact block {fb:3d} (LOD{start[fb]}) rank {rank:4d}  "
            f"raw {'yes' if raw else 'no '} (LOD{chosen[fb]} after; next block LOD{chosen[min(fb + 1, len(chosen) - 1)]})  expanded {int(((start > 0) & (chosen == 0)).sum()):3d}")
    facts = []
    if os.environ.get("FACTS") == "1" or os.environ.get("ALLFACTS") == "1":  # where the row's key–value facts start
        row = np.asarray(src[i])
        starts = [p for p in range(len(row) - 8) if run.tokenizer.decode(row[p:p + 6].tolist()).startswith("\nOne of the special")]
        facts = sorted({p // k for p in starts})
    if os.environ.get("FACTS") == "1":  # … against the policy's expansions
        print(f"  row {i}: key–value facts start in blocks {sorted({p // k for p in starts})}; the policy expanded "
              f"{np.flatnonzero(cand & (chosen == 0)).tolist()}", flush=True)
    exact = None
    if EXACT:
        # slots: recency ← the fact's block raw; random ← it and the next one raw; LensNet's policy
        first = oracle([fb])
        if os.environ.get("SPLIT") == "1":  # the policy's expansions alone, paid for by the oldest raw blocks
            first = oracle(np.flatnonzero((start > 0) & (chosen == 0)))
        if os.environ.get("ALLFACTS") == "1":  # every fact of the row raw with its next block
            first = oracle(sorted({b + d for b in facts for d in (0, 1)} - set(raw_region.tolist())))
        lay = np.stack([first, oracle([fb, fb + 1]), start])[None].astype(np.int8)
        per = jax.device_get(probe(params, tok, jnp.asarray(lay), jnp.asarray([ans[i]], jnp.int32),
                                   jnp.asarray([fb], jnp.int32), cap))
        got = per["answer_exact"][0] > 0  # kinds: recency, random, lensnet, attention
        exact = (bool(got[2]), bool(got[0]), bool(got[1]))
        first_name = ("every fact + next raw" if os.environ.get("ALLFACTS") == "1" else
                      "its expansions alone" if os.environ.get("SPLIT") == "1" else "fact's block raw")
        line += f"  exact: LensNet {'yes' if got[2] else 'no '}, {first_name} {'yes' if got[0] else 'no '}, " \
                f"+ the next {'yes' if got[1] else 'no '}"
    out.append((task[i], start[fb], rank, raw, exact))
    print(f"{line}  ({time.time() - t0:.0f}s)", flush=True)

arr = np.array([(t, lod, r, raw) for t, lod, r, raw, _ in out])
print("\nraw share by task:", {TASKS[t - 1]: f"{arr[arr[:, 0] == t, 3].mean():.2f} of {int((arr[:, 0] == t).sum())}"
                                for t in np.unique(arr[:, 0])})
ranks = arr[arr[:, 2] >= 0, 2]
print("rank among expand candidates: recall@1/4/8/16 " + " / ".join(f"{(ranks < q).mean():.2f}" for q in (1, 4, 8, 16))
      + f"; median {np.median(ranks):.0f}")
if EXACT:
    ex = np.array([e for *_, e in out], bool)  # [rows, (LensNet, fact's block raw, + the next)]
    for t in np.unique(arr[:, 0]):
        mine = arr[:, 0] == t
        lens = ex[mine, 0]
        print(f"{TASKS[t - 1]}: exact LensNet {lens.mean():.2f} (when its layout holds the fact's block raw "
              f"{lens[arr[mine, 3] == 1].mean():.2f}); the fact's block raw {ex[mine, 1].mean():.2f}, "
              f"+ the next block {ex[mine, 2].mean():.2f}")
