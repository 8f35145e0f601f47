"""Validation of focus during training: does LensNet's layout beat recency at the same budget?

With `megacontext.focus_eval`, each validation row is read in four working contexts:

  recency   the recency baseline at W_max (the most recent blocks raw, older ones in gists);
  random    a random compressed layout (`variants.sample_variant`) of at most the target
            entries (megacontext.eval_wc_length × T, capped at W_max);
  lensnet   LensNet + the focus allocator's greedy edit of the recency layout at that
            target (`mc_step.policy_params(explore=False)`: LensNet's best-ranked swaps,
            megacontext.policy_rounds rounds of up to allocator.max_replacements each);
  attention the same edit ranked by the training-free rival instead of LensNet (the base's
            attention mass from the protected tail: `megacontext/attention_rival.py`).

When the target is W_max (the long-context configs), all four have the same budget. Per
row and layout it measures the horizon NLL (the last dataset.horizon tokens, raw in all
three) and, for the val split's synthetic task rows (`data/tasks.py`: the answer is the
row's last tokens), the answer's NLL and whether every answer token is the argmax
(teacher-forced exact match). On task rows whose fact position prep recorded (the block
holding the asked fact's first token), it also measures where each scorer ranks that block
among the allocator's expand candidates — the blocks the recency layout compresses, head and
tail aside, by their gist's score (0 = first; 0 too when the block is raw already) — and
whether each layout holds it raw. The loop sums these over the validation rows and logs

  val/focus/horizon_loss_{kind}       natural-text rows' horizon NLL
  val/focus/gap_recency, gap_random   recency − lensnet, random − lensnet (> 0: LensNet helps)
  val/focus/entries_{kind}            mean WC entries
  val/retrieval/{task}/exact_{kind}   share of task rows answered exactly
  val/retrieval/{task}/answer_nll_{kind}
  val/retrieval/exact_{kind}          over all task rows
  val/needle/recall_at_{k}_{scorer}   share of task rows whose fact block ranks < k (lensnet, attention)
  val/needle/rank_{scorer}            mean rank of the fact block
  val/needle/raw_{kind}               share of task rows whose layout holds the fact block raw
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.data.tasks import TASKS
from mcjax.megacontext import losses as L
from mcjax.model.xent import softcap_logits
from mcjax.train.mc_step import MCForward, policy_params

KINDS = ("recency", "random", "lensnet", "attention")
SCORERS = ("lensnet", "attention")  # whose ranking of the fact block is measured
RECALL_AT = (1, 4, 16)
ANSWER_WINDOW = 16  # answers are at most this many tokens (the last entries of every WC: raw tail)


def needle_rank(u, start, needle, head_blocks: int, tail_blocks: int):
    """Where a scorer ranks the fact's block among the allocator's expand candidates: how many
    blocks the start layout compresses (between head and tail) score above it. u f32 [B, N1]:
    per-block scores (`losses.block_scores`); start int [B, N1]; needle int [B]: the fact's
    block (−1: none). -> f32 [B]: that count, 0 when the block is raw already, −1 without one."""
    n1 = start.shape[-1]
    free = (jnp.arange(n1) < n1 - tail_blocks) & (jnp.arange(n1) >= head_blocks) & (start > 0)
    at = jnp.maximum(needle, 0)[:, None]
    above = ((u > jnp.take_along_axis(u, at, axis=1)) & free).sum(-1).astype(jnp.float32)
    raw = jnp.take_along_axis(start, at, axis=1)[:, 0] == 0
    return jnp.where(needle >= 0, jnp.where(raw, 0.0, above), -1.0)


def make_focus_probe(model, cfg):
    """(params, tokens [B, T+1], layouts int8 [B, 3, N1] (baseline, random, policy start),
    answer_tokens int [B], needle int [B] (the fact's block; −1: none or unknown),
    variant_capacity) -> per row and kind f32 [B, 4]: horizon_nll, answer_nll, answer_exact,
    entries, needle_raw; per row and scorer f32 [B, 2]: needle_rank (−1 without a needle)."""
    fw = MCForward(model, cfg)
    greedy = policy_params(cfg, explore=False)
    key = jax.random.key(0)  # unused by the greedy policy
    h = cfg.dataset.horizon
    a_max = min(ANSWER_WINDOW, cfg.megacontext.recent_tokens)

    def measure(params, tree, lay, cap, tokens, answer_tokens):
        """WCs of layouts [B, M, N1] at width cap -> dict of f32 [B·M]."""
        m = lay.shape[1]
        wc = fw.assemble(tree, lay, cap)
        tok, ans = jnp.repeat(tokens, m, axis=0), jnp.repeat(answer_tokens, m)
        nll, hidden = fw.entry_nll(params, wc, tok)
        n = wc.valid.sum(-1)
        idx = n[:, None] - a_max + jnp.arange(a_max)  # the last a_max entries: raw tail tokens
        head = fw.gpt.apply({"params": params["gpt"]}, method="head")
        logits = softcap_logits(jnp.take_along_axis(hidden, idx[..., None], axis=1), head, fw.gpt.softcap)
        want = jnp.take_along_axis(tok, jnp.take_along_axis(wc.target, idx, axis=1), axis=1)
        in_answer = jnp.arange(a_max) >= a_max - ans[:, None]
        right = logits.argmax(-1) == want
        return {
            "horizon_nll": (nll * L.horizon_mask(wc, tok.shape[1] - 1, h)).sum(-1) / h,
            "answer_nll": (jnp.take_along_axis(nll, idx, axis=1) * in_answer).sum(-1) / jnp.maximum(ans, 1),
            "answer_exact": (right | ~in_answer).all(-1).astype(jnp.float32),
            "entries": n.astype(jnp.float32),
        }

    def rank(wc, scores, start, needle):
        u = jax.vmap(L.block_scores, in_axes=(0, 0, 0, None))(wc, scores, start, fw.k)  # [B, N1]
        return needle_rank(u, start, needle, fw.head_blocks, fw.tail_blocks)

    def probe(params, tokens, layouts, answer_tokens, needle, variant_capacity: int):
        b = tokens.shape[0]
        tree = fw.tree(params, tokens)
        start = layouts[:, 2]
        picks, ranks = [], []
        wc = fw.assemble(tree, start[:, None], variant_capacity)
        for scorer in (fw.scores, fw.rival_scores):
            chosen, _ = fw.policy(params, tree, start, 1, variant_capacity, key, greedy, scorer)
            picks.append(chosen.astype(layouts.dtype))
            ranks.append(rank(wc, jax.lax.stop_gradient(scorer(params, wc)), start, needle))
        all_lay = jnp.concatenate([layouts[:, :2], *picks], axis=1)  # [B, 4, N1]
        base = measure(params, tree, layouts[:, :1], fw.capacity, tokens, answer_tokens)
        var = measure(params, tree, all_lay[:, 1:], variant_capacity, tokens, answer_tokens)
        out = {k: jnp.concatenate([base[k].reshape(b, 1), var[k].reshape(b, 3)], axis=1) for k in base}
        held = jnp.take_along_axis(all_lay, jnp.maximum(needle, 0)[:, None, None], axis=2)[..., 0] == 0
        out["needle_raw"] = jnp.where(needle[:, None] >= 0, held, False).astype(jnp.float32)
        out["needle_rank"] = jnp.stack(ranks, axis=1)
        return out

    return probe


def row_sums(rows: dict[str, np.ndarray], task: np.ndarray) -> dict[str, float]:
    """One batch's per-row results ([B, kinds] each; task int [B], 0 = natural text) as sums the
    loop can add up over batches: focus/… over natural rows, retrieval/<task>/… over task rows,
    needle/… over task rows with a known fact block."""
    out: dict[str, float] = {}
    natural = task == 0
    out["focus/rows"] = float(natural.sum())
    for j, kind in enumerate(KINDS):
        out[f"focus/horizon_nll/{kind}"] = float(rows["horizon_nll"][natural, j].sum())
        out[f"focus/entries/{kind}"] = float(rows["entries"][:, j].sum())
    out["focus/all_rows"] = float(len(task))
    for i, name in enumerate(TASKS, 1):
        mine = task == i
        if not mine.any():
            continue
        out[f"retrieval/{name}/rows"] = float(mine.sum())
        for j, kind in enumerate(KINDS):
            out[f"retrieval/{name}/exact/{kind}"] = float(rows["answer_exact"][mine, j].sum())
            out[f"retrieval/{name}/answer_nll/{kind}"] = float(rows["answer_nll"][mine, j].sum())
    known = rows["needle_rank"][:, 0] >= 0
    if known.any():
        out["needle/rows"] = float(known.sum())
        for j, kind in enumerate(KINDS):
            out[f"needle/raw/{kind}"] = float(rows["needle_raw"][known, j].sum())
        for j, scorer in enumerate(SCORERS):
            r = rows["needle_rank"][known, j]
            out[f"needle/rank/{scorer}"] = float(r.sum())
            for k in RECALL_AT:
                out[f"needle/recall_at_{k}/{scorer}"] = float((r < k).sum())
    return out


def focus_metrics(s: dict[str, float]) -> dict[str, float]:
    """The val/focus/* and val/retrieval/* metrics of the module doc from summed `row_sums`."""
    out: dict[str, float] = {}
    if s.get("focus/all_rows"):
        for kind in KINDS:
            out[f"val/focus/entries_{kind}"] = s[f"focus/entries/{kind}"] / s["focus/all_rows"]
    if s.get("focus/rows"):
        loss = {kind: s[f"focus/horizon_nll/{kind}"] / s["focus/rows"] for kind in KINDS}
        out.update({f"val/focus/horizon_loss_{kind}": v for kind, v in loss.items()})
        out["val/focus/gap_recency"] = loss["recency"] - loss["lensnet"]
        out["val/focus/gap_random"] = loss["random"] - loss["lensnet"]
    names = [n for n in TASKS if s.get(f"retrieval/{n}/rows")]
    for name in names:
        rows = s[f"retrieval/{name}/rows"]
        for kind in KINDS:
            out[f"val/retrieval/{name}/exact_{kind}"] = s[f"retrieval/{name}/exact/{kind}"] / rows
            out[f"val/retrieval/{name}/answer_nll_{kind}"] = s[f"retrieval/{name}/answer_nll/{kind}"] / rows
    if names:
        total = sum(s[f"retrieval/{n}/rows"] for n in names)
        for kind in KINDS:
            out[f"val/retrieval/exact_{kind}"] = sum(s[f"retrieval/{n}/exact/{kind}"] for n in names) / total
    if s.get("needle/rows"):
        rows = s["needle/rows"]
        out.update({f"val/needle/raw_{kind}": s[f"needle/raw/{kind}"] / rows for kind in KINDS})
        for scorer in SCORERS:
            out[f"val/needle/rank_{scorer}"] = s[f"needle/rank/{scorer}"] / rows
            out.update({f"val/needle/recall_at_{k}_{scorer}": s[f"needle/recall_at_{k}/{scorer}"] / rows for k in RECALL_AT})
    return out
