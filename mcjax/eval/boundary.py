"""Boundary artifacts: does a fact hurt more when it straddles a block edge?

Rows of eval.boundary_length tokens (+1): held-out narrative filler with a code-like
definition "\\n{name} = {number};\\n" whose critical token — the number's first — sits at
offset o ∈ 0..K−1 of block b (the middle block of the first superblock, or of the blocks
before the tail when no superblock fits), and at the end the use "\\n{name} =" and its
answer " {number}", both inside the raw tail:

  <|bos|> filler … [definition, critical token at b·K + o] … filler  use answer

Each row is scored in full and with the definition compressed: `block` (only the blocks
the definition touches at LOD1), `lod1` (every block before the tail at LOD1, 32×) and
`lod2` (complete superblocks at LOD2, 1024×). Per offset: ΔNLL@H (last H tokens) and the
answer's ΔNLL (summed over its tokens) against the full context, eval.boundary_samples
rows each (words, numbers and filler drawn from numpy seeded by (seed, o, sample)).
Table `boundary`: offset, sample, setting, horizon, delta_nll, answer_nll, answer_nll_full,
answer_delta_nll.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mcjax.eval import policies as P
from mcjax.eval.data import EvalData, filler_tokens
from mcjax.eval.forward import Scorer, horizon_mean
from mcjax.eval.passkey import WORDS
from mcjax.eval.result import SuiteResult, stats, table
from mcjax.eval.setup import Plan

COLUMNS = {
    "offset": pa.int32(), "sample": pa.int32(), "setting": pa.string(), "horizon": pa.int32(),
    "delta_nll": pa.float64(), "answer_nll": pa.float64(), "answer_nll_full": pa.float64(),
    "answer_delta_nll": pa.float64(),
}


def make_row(plan: Plan, filler: np.ndarray, length: int, offset: int, sample: int) -> tuple[np.ndarray, int, list[int]]:
    """(row int32 [length+1], answer tokens, blocks the definition touches)."""
    tok, k = plan.run.tokenizer, plan.k
    rng = np.random.default_rng((plan.ev.seed, 1 + offset, sample))
    word, number = WORDS[int(rng.integers(len(WORDS)))], int(rng.integers(1_000_000, 10_000_000))
    name = word.replace("-", "_")
    pieces = [f"\n{name} =", f" {number}", ";\n", f"\n{name} =", f" {number}"]
    pre, num, post, question, answer = (np.asarray(x, np.int32) for x in tok.encode_batch(pieces))
    n1, tb, hb = length // k, plan.tail // k, plan.head // k
    supers = (n1 - tb) // k
    block = supers * k // 2 if supers else hb + (n1 - tb - hb) // 2  # never in the protected head
    start = block * k + offset - len(pre)  # the definition's first token
    tail_text = len(question) + len(answer)
    if tail_text > plan.tail:
        raise ValueError(f"the use and its answer ({tail_text} tokens) do not fit in the raw tail of {plan.tail} "
                         f"(max(megacontext.recent_tokens, eval.horizons)); raise eval.horizons")
    if start < 1:
        raise ValueError(f"rows of {length} tokens leave no room before the definition; raise eval.boundary_length")
    defn = np.concatenate([pre, num, post])
    room = length + 1 - 1 - len(defn) - tail_text  # filler tokens around the definition
    at = start - 1
    fill = np.take(filler, np.arange(room) + int(rng.integers(len(filler))), mode="wrap").astype(np.int32)
    row = np.concatenate([[tok.bos_id], fill[:at], defn, fill[at:], question, answer]).astype(np.int32)
    touched = sorted({p // k for p in range(start, start + len(defn))})
    return row, len(answer), touched


def run(plan: Plan, datasets: list[EvalData], bar) -> SuiteResult:
    ev, k = plan.ev, plan.k
    length = plan.boundary_length()
    n1, tb, hb = length // k, plan.tail // k, plan.head // k
    scorer = Scorer(plan, length)
    filler = filler_tokens(datasets, plan.run.tokenizer.bos_id)
    items = [(o, s, *make_row(plan, filler, length, o, s)) for o in range(k) for s in range(ev.boundary_samples)]
    rows = np.stack([it[2] for it in items])
    settings = {"block": np.stack([_block_layout(n1, touched) for *_, touched in items])}
    settings["lod1"] = np.broadcast_to(P.lod1(n1, k, tb, hb), rows.shape[:1] + (n1,))
    skipped = []
    if plan.max_lod >= 2 and len(P.superblocks(n1, k, tb, hb)):
        settings["lod2"] = np.broadcast_to(P.lod2(n1, k, tb, hb), rows.shape[:1] + (n1,))
    else:
        skipped.append(f"boundary lod2: rows of {length} tokens hold no complete superblock before the tail "
                       f"(set eval.boundary_length ≥ {k * k + plan.tail})")
    bar.set_postfix_str(f"boundary L={length}")
    ref = scorer.tail_nll(rows, P.full(n1), bar.update)[:, 0]
    records = []
    for name, layouts in settings.items():
        nll = scorer.tail_nll(rows, np.ascontiguousarray(layouts)[:, None], bar.update)[:, 0]
        for i, (o, s, _, n_ans, _) in enumerate(items):
            a_nll, a_full = float(nll[i, -n_ans:].sum()), float(ref[i, -n_ans:].sum())
            for h in plan.horizons:
                records.append(dict(offset=o, sample=s, setting=name, horizon=h,
                                    delta_nll=float(horizon_mean(nll[i], h) - horizon_mean(ref[i], h)),
                                    answer_nll=a_nll, answer_nll_full=a_full, answer_delta_nll=a_nll - a_full))
    summary = summarize(records, plan.horizons)
    scal = {f"{s['setting']}/h{s['horizon']}/worst_offset_delta_nll": s["worst"] for s in summary}
    return SuiteResult("boundary", {"boundary": table(records, COLUMNS)},
                       {"length": length, "rows": summary}, scal, skipped)


def _block_layout(n1: int, touched: list[int]) -> np.ndarray:
    lod = np.zeros(n1, np.int8)
    lod[touched] = 1
    return lod


def summarize(records: list[dict], horizons) -> list[dict]:
    """Per setting and horizon: mean ΔNLL per offset, its worst offset, and the mean answer ΔNLL per offset."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        for h in horizons:
            rs = [r for r in records if r["setting"] == setting and r["horizon"] == h]
            offsets = sorted({r["offset"] for r in rs})
            by = [stats([r["delta_nll"] for r in rs if r["offset"] == o])["mean"] for o in offsets]
            ans = [stats([r["answer_delta_nll"] for r in rs if r["offset"] == o])["mean"] for o in offsets]
            out.append({"setting": setting, "horizon": h, "delta_nll_by_offset": by, "answer_delta_nll_by_offset": ans,
                        "worst": float(max(by)), "worst_offset": int(offsets[int(np.argmax(by))]),
                        "mean": float(np.mean(by))})
    return out
