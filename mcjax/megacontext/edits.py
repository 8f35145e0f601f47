"""Per-block counterfactual utilities: what one edit of an on-policy layout does to the horizon.

A layout-level ΔNLL spreads one number over every block a variant compresses, so the one
block that holds what the horizon needs gets almost no signal. Here the labels reach the
block: from a sequence's on-policy layout ℓ (LensNet + allocator's own choice), a candidate
set of C = `megacontext.edit_candidates` single edits is drawn — the allocator's units
(`allocator.py`): expand a LOD1 block or a LOD2 superblock, collapse a raw block or an
all-LOD1 superblock; the protected tail never moves — each edit is applied alone, and the
base model measures the horizon NLL of every edited layout in one batched forward (no
gradient). Candidates are half *exploited*, half *explored* (`edit_explore`): the first by
Gumbel-top-k over LensNet's own unit scores (sampling ∝ exp(score / T)), the rest uniformly
among the remaining eligible units — nothing tells the sampler where an answer is.

With `edit_group` = G > 1 each candidate moves G distinct units at once (group testing: one
forward asks whether any of G blocks matters, so a sequence tests C·G blocks per step where
the one that holds the answer is otherwise rarely drawn). Its label is the group's value,
and LensNet's prediction of it a soft maximum over its members' scores,
τ·log Σ exp(score/τ) (τ = GROUP_TEMPERATURE; the score itself for G = 1): the gradient
reaches the members in proportion to how much each is believed to carry the group, and a
block that keeps turning up in useful groups rises (multiple-instance learning).

Group credit alone does not sharpen with G: while LensNet's member scores are alike, each
member gets 1/G of its group's push, and the one block that matters sits in a tested group
with probability C·G/N, so it is pushed C/N per step whatever G is. *Narrowing*
(`edit_halvings` = h) turns a group's label into a block's: after the C candidates, the best
expand group of each sequence is halved h times — each round labels the first half of the
current members (one more forward per sequence, at the width of half as many expands) and
keeps that half when it holds at least half of the parent's value, else the other half with
the parent's value less the tested half's (adaptive group testing: with one block that
matters, ⌈log2 G⌉ rounds end on it). The h halves join the candidate set as C + 1 … C + h,
ranked with the others on the same scale, so the block that carries a group reaches a
label of its own.

The label of an edit is the *raw value* of its unit: how much lower the horizon NLL is with
the unit at the finer level,
    expand   e:  v = NLL(ℓ) − NLL(ℓ + e)        (expanding helps: v > 0)
    collapse e:  v = NLL(ℓ + e) − NLL(ℓ)        (collapsing hurts: v > 0)
and LensNet's prediction of it is the score the allocator ranks the unit by: a gist's own
score for an expand (`UnitScores.expand`), the mean score of the unit's entries for a
collapse (−`UnitScores.collapse`). `ranking_loss` is a Bradley–Terry loss over the pairs of
one sequence's valid candidates with soft labels σ((v_i − v_j)/s), s a running scale of the
labels — so expands and collapses are ranked on one scale, as the allocator's swaps need.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcjax.megacontext.allocator import AllocatorParams, UnitScores, eligible_units, free_blocks, never_changed

GROUP_TEMPERATURE = 0.1  # τ of the soft maximum over a group's member scores


class Candidates(NamedTuple):
    """C candidate edits of one layout, each of G units (the first `expands` of them expands)."""

    units: jnp.ndarray  # int32 [C, G]: member unit ids (block b < N1; superblock N1 + s)
    members: jnp.ndarray  # bool [C, G]: an eligible unit was there to draw
    expand: jnp.ndarray  # bool [C]
    valid: jnp.ndarray  # bool [C]: at least one member


def _pick(key, ok, score, count: int, group: int, explore: float, temperature: float):
    """`count` groups of `group` distinct units where `ok` [M]: Gumbel-top-k on
    score/temperature for the first count − round(count·explore) groups, uniform for the rest.
    -> (units int32 [count, group], drawn bool [count, group])."""
    m = ok.shape[0]
    n_rand = int(round(count * explore)) * group
    n_best = count * group - n_rand
    k1, k2 = jax.random.split(key)
    units, valid = [], []
    taken = jnp.zeros((m,), bool)
    if n_best:
        rank = jnp.where(ok, score / temperature + jax.random.gumbel(k1, (m,)), -jnp.inf)
        top, best = jax.lax.top_k(rank, min(n_best, m))
        units.append(best)
        valid.append(top > -jnp.inf)
        taken = taken.at[best].set(top > -jnp.inf)
    if n_rand:
        rank = jnp.where(ok & ~taken, jax.random.gumbel(k2, (m,)), -jnp.inf)
        top, rand = jax.lax.top_k(rank, min(n_rand, m))
        units.append(rand)
        valid.append(top > -jnp.inf)
    units, valid = jnp.concatenate(units).astype(jnp.int32), jnp.concatenate(valid)
    short = count * group - units.shape[0]  # fewer units than slots: empty members
    if short:
        units, valid = jnp.pad(units, (0, short)), jnp.pad(valid, (0, short))
    return units.reshape(count, group), valid.reshape(count, group)


def candidates(key, lod: jnp.ndarray, us: UnitScores, p: AllocatorParams, expands: int, collapses: int,
               explore: float, temperature: float, group: int = 1) -> Candidates:
    """The candidate edits of one layout `lod` int8 [N1] (all tokens present, the tail and
    levels as `p` says; no cooldown) from its unit scores `us` (read under stop-gradient),
    `group` units each."""
    n1 = lod.shape[0]
    free = free_blocks(never_changed(n1), jnp.zeros((n1,), bool), 0, p)
    expandable, collapsible = eligible_units(lod, free, p)
    ke, kc = jax.random.split(key)
    score = jax.tree.map(jax.lax.stop_gradient, us)
    parts = [_pick(k, ok, s, n, group, explore, temperature)
             for k, ok, s, n in ((ke, expandable, score.expand, expands), (kc, collapsible, score.collapse, collapses)) if n]
    units = jnp.concatenate([u for u, _ in parts])
    members = jnp.concatenate([v for _, v in parts])
    return Candidates(units, members, jnp.arange(units.shape[0]) < expands, members.any(-1))


def apply_edit(lod: jnp.ndarray, units, members, expand, k: int) -> jnp.ndarray:
    """`lod` int8 [N1] with each member unit of units int [G] (where members bool [G]) moved a
    level — expand: LOD1 → 0 for a block, LOD2 → 1 for a superblock; collapse: the reverse.
    The members are distinct units of one level, so their blocks never overlap."""
    n1 = lod.shape[0]
    blocks = jnp.arange(n1)
    units = jnp.atleast_1d(units)[:, None]
    is_block = units < n1
    inside = jnp.where(is_block, blocks == units, blocks // k == units - n1) & jnp.atleast_1d(members)[:, None]  # [G, N1]
    level = jnp.where(is_block, jnp.where(expand, 0, 1), jnp.where(expand, 1, 2))  # [G, 1]
    return jnp.where(inside.any(0), (inside * level).sum(0), lod).astype(lod.dtype)


def halve(current: jnp.ndarray) -> jnp.ndarray:
    """The half of a group's current members (bool [..., G]) that a narrowing round tests: the
    first ⌈n/2⌉ of its n members in slot order."""
    rank = jnp.cumsum(current, axis=-1) - 1
    return current & (rank < (current.sum(-1, keepdims=True) + 1) // 2)


def narrow(current, tested, parent_value, tested_value):
    """One narrowing step: the tested half (bool [..., G]) when its value holds at least half
    of the parent's, else the rest of the current members, with the parent's value less the
    tested half's as that rest's estimate. -> (members bool [..., G], value [...])."""
    keep = jnp.asarray(tested_value >= parent_value / 2)
    return (jnp.where(keep[..., None], tested, current & ~tested),
            jnp.where(keep, tested_value, parent_value - tested_value))


def best_expand(cand: Candidates, value: jnp.ndarray):
    """The expand candidate of highest value of one layout's candidates [C] (values [C]):
    (units int32 [G], members bool [G] (none when no expand is valid), value [])."""
    ok = cand.valid & cand.expand
    i = jnp.argmax(jnp.where(ok, value, -jnp.inf))
    return cand.units[i], cand.members[i] & ok.any(), jnp.where(ok.any(), value[i], 0.0)


def predicted_value(us: UnitScores, cand: Candidates) -> jnp.ndarray:
    """LensNet's prediction of each candidate's raw value, f32 [C] (differentiable in `us`): the
    soft maximum over its members' scores (the member's score itself for one member)."""
    s = jnp.where(cand.expand[:, None], us.expand[cand.units], -us.collapse[cand.units])  # [C, G]
    s = jnp.where(cand.members, s / GROUP_TEMPERATURE, -jnp.inf)
    return GROUP_TEMPERATURE * jax.nn.logsumexp(jnp.where(cand.valid[:, None], s, 0.0), axis=-1)


def raw_value(edited_nll: jnp.ndarray, base_nll: jnp.ndarray, expand: jnp.ndarray) -> jnp.ndarray:
    """The label of each edit: horizon NLL [..., C] of the edited layouts against the layout's
    own [...] -> f32 [..., C] (see the module doc)."""
    delta = edited_nll - base_nll[..., None]
    return jnp.where(expand, -delta, delta)


def ranking_loss(pred: jnp.ndarray, value: jnp.ndarray, valid: jnp.ndarray, scale, temperature: float) -> jnp.ndarray:
    """Mean Bradley–Terry loss over the pairs of valid candidates within each sequence.

    pred f32 [B, C] (LensNet; differentiable), value f32 [B, C] (labels, stop-gradient),
    valid bool [B, C]; scale: the labels' running scale; P(i above j) = σ((pred_i − pred_j)/T)
    against the soft label σ((v_i − v_j)/scale). 0 where no sequence has a valid pair."""
    i, j = jnp.triu_indices(pred.shape[-1], k=1)
    v = jax.lax.stop_gradient(value)
    label = jax.nn.sigmoid((v[:, i] - v[:, j]) / scale)
    logit = (pred[:, i] - pred[:, j]) / temperature
    pair = (valid[:, i] & valid[:, j]).astype(jnp.float32)
    loss = jax.nn.softplus(logit) - label * logit
    return (loss * pair).sum() / jnp.maximum(pair.sum(), 1.0)


def metrics(pred: jnp.ndarray, value: jnp.ndarray, cand: Candidates, loss, narrowed: int = 0) -> dict:
    """Scalars of one batch of edits [B, C]: the loss; the labels' mean by action; per
    sequence the best edit's value and that of the edit LensNet ranks first (its regret is
    the gap); the Pearson correlation of prediction and label; the share of valid slots; with
    `narrowed` halving rounds (the last candidates), the value and size of the last half."""
    from mcjax.megacontext.losses import masked_mean, pearson

    valid = cand.valid
    rows = valid.any(-1)
    best = jnp.max(jnp.where(valid, value, -jnp.inf), axis=-1)
    first = jnp.argmax(jnp.where(valid, pred, -jnp.inf), axis=-1)
    chosen = jnp.take_along_axis(value, first[:, None], axis=-1)[:, 0]
    return {
        "mc/edit_loss": jax.lax.stop_gradient(loss),
        "mc/edit_value_expand_mean": masked_mean(value, valid & cand.expand),
        "mc/edit_value_collapse_mean": masked_mean(value, valid & ~cand.expand),
        "mc/edit_value_best": masked_mean(best, rows),
        "mc/edit_value_chosen": masked_mean(chosen, rows),
        "mc/edit_corr_mean": jnp.nanmean(pearson(pred, value, valid)),
        "mc/edit_valid": valid.mean(dtype=jnp.float32),
    } | ({
        "mc/edit_value_narrowed": masked_mean(value[:, -1], valid[:, -1]),
        "mc/edit_narrowed_members": masked_mean(cand.members[:, -1].sum(-1).astype(jnp.float32), valid[:, -1]),
    } if narrowed else {})
