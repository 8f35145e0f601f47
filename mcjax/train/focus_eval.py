"""Validation of focus during training: does LensNet's layout beat recency at the same budget?

With `megacontext.focus_eval`, each validation row is read in three working contexts:

  recency   the recency baseline at W_max (the most recent blocks raw, older ones in gists);
  random    a random compressed layout (`variants.sample_variant`) of at most the target
            entries (megacontext.eval_wc_length × T, capped at W_max);
  lensnet   LensNet + the focus allocator's greedy edit of the recency layout at that
            target (`mc_step.policy_params(explore=False)`: LensNet's best-ranked swaps,
            megacontext.policy_rounds rounds of up to allocator.max_replacements each).

When the target is W_max (the long-context configs), all three have the same budget. Per
row and layout it measures the horizon NLL (the last dataset.horizon tokens, raw in all
three) and, for the val split's synthetic task rows (`data/tasks.py`: the answer is the
row's last tokens), the answer's NLL and whether every answer token is the argmax
(teacher-forced exact match). The loop sums these over the validation rows and logs

  val/focus/horizon_loss_{kind}       natural-text rows' horizon NLL
  val/focus/gap_recency, gap_random   recency − lensnet, random − lensnet (> 0: LensNet helps)
  val/focus/entries_{kind}            mean WC entries
  val/retrieval/{task}/exact_{kind}   share of task rows answered exactly
  val/retrieval/{task}/answer_nll_{kind}
  val/retrieval/exact_{kind}          over all task rows
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.data.tasks import TASKS
from mcjax.megacontext import losses as L
from mcjax.model.xent import softcap_logits
from mcjax.train.mc_step import MCForward, policy_params

KINDS = ("recency", "random", "lensnet")
ANSWER_WINDOW = 16  # answers are at most this many tokens (the last entries of every WC: raw tail)


def make_focus_probe(model, cfg):
    """(params, tokens [B, T+1], layouts int8 [B, 3, N1] (baseline, random, policy start),
    answer_tokens int [B], variant_capacity) -> per row and kind, f32 [B, 3]: horizon_nll,
    answer_nll, answer_exact, entries."""
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

    def probe(params, tokens, layouts, answer_tokens, variant_capacity: int):
        b = tokens.shape[0]
        tree = fw.tree(params, tokens)
        chosen, _ = fw.policy(params, tree, layouts[:, 2], 1, variant_capacity, key, greedy)
        base = measure(params, tree, layouts[:, :1], fw.capacity, tokens, answer_tokens)
        var = measure(params, tree, jnp.concatenate([layouts[:, 1:2], chosen.astype(layouts.dtype)], axis=1),
                      variant_capacity, tokens, answer_tokens)
        return {k: jnp.concatenate([base[k].reshape(b, 1), var[k].reshape(b, 2)], axis=1) for k in base}

    return probe


def row_sums(rows: dict[str, np.ndarray], task: np.ndarray) -> dict[str, float]:
    """One batch's per-row results ([B, 3] each; task int [B], 0 = natural text) as sums the
    loop can add up over batches: focus/… over natural rows, retrieval/<task>/… over task rows."""
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
    return out
