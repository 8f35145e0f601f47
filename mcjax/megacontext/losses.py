"""The MegaContext training signals, as pure functions of per-entry NLLs and LensNet scores.

Notation: a sequence of T tokens (+1 lookahead) has M = 1 + N layouts, the recency
baseline first. Every entry of a working context (WC) predicts the token right after its
span; `nll` is that entry's next-token NLL (0 on padding).

ΔNLL of a layout (`horizon_nll`): its mean NLL on the horizon — the last H tokens of the
sequence, LOD0 in every layout because the protected tail covers them — minus the
baseline's on the same tokens.

A layout's LensNet *cost* (`layout_costs`) — how much LensNet expects the layout to hurt:
  u_l(b) = LensNet's compression score of block b in layout l's WC: the score of the gist
           that covers b when b is compressed (LOD1 gist, or the LOD2 gist of its
           superblock), else the mean score of b's K token entries — the same per-block
           scores the focus allocator acts on (high = expand / keep, low = collapse);
  c_l    = (1/N1) Σ_b [b compressed in l] · ½ (u_l(b) + u_base(b)).
So c_l sums, over the blocks the layout compresses, what LensNet says about compressing
them both in the layout itself (gist scores: "expand me") and in the baseline (token-block
scores: "collapse me" when negative). The preference loss trains both kinds of score.

Bradley–Terry preference (`preference_loss`): for every pair i < j of layouts of one
sequence, P(i better than j) = σ((c_j − c_i) / τ); the soft label is σ(a_j − a_i) with
a = ΔNLL normalised by a running (EMA) mean and standard deviation, under stop-gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcjax.megacontext.layout import WorkingContext, block_entry_counts


def horizon_mask(wc: WorkingContext, tokens: int, horizon: int) -> jnp.ndarray:
    """Entries that are one of the last `horizon` tokens of a T-token sequence. bool [..., W]."""
    return wc.valid & (wc.lod == 0) & (wc.pos >= tokens - horizon)


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray, axis=None) -> jnp.ndarray:
    """Mean of x where mask (NaN where the mask is empty)."""
    m = mask.astype(jnp.float32)
    n = m.sum(axis=axis)
    return jnp.where(n > 0, (x * m).sum(axis=axis) / jnp.maximum(n, 1.0), jnp.nan)


def block_scores(wc: WorkingContext, scores: jnp.ndarray, block_lod: jnp.ndarray, k: int) -> jnp.ndarray:
    """u(b): per-block compression scores of one WC. scores f32 [W]; block_lod int [N1] -> f32 [N1].

    The score of b's gist when b is compressed (LOD1: its own; LOD2: its superblock's),
    else the mean of its K token scores — the focus allocator's unit scores
    (`allocator.unit_scores`), per block. Read from the layout by one gather with unique
    indices (each block's entries are contiguous in the WC), so the backward pass is a
    scatter without colliding writes.
    """
    lod = block_lod.astype(jnp.int32)
    n1, w = lod.shape[-1], scores.shape[-1]
    counts = block_entry_counts(lod, k)
    start = jnp.cumsum(counts) - counts  # each block's first entry (a LOD2 superblock's gist: its first block's)
    first = (jnp.arange(n1) // k) * k
    col = jnp.arange(k)
    read = (lod[:, None] == 0) | ((col == 0) & ((lod == 1) | ((lod == 2) & (jnp.arange(n1) == first)))[:, None])
    unused = w + n1 * k + jnp.arange(n1 * k).reshape(n1, k)  # distinct rows past any real entry
    src = jnp.where(read, start[:, None] + col, unused)
    s = jnp.where(wc.valid, scores.astype(jnp.float32), 0.0)
    vals = s.at[src].get(mode="fill", fill_value=0.0, unique_indices=True)  # [N1, K]
    own = jnp.where(lod == 0, vals.sum(-1) / k, vals[:, 0])
    return jnp.where(lod == 2, own[first], own)


def layout_costs(u: jnp.ndarray, block_lod: jnp.ndarray) -> jnp.ndarray:
    """c_l for the M layouts of a sequence. u f32 [M, N1] (row 0: baseline); block_lod int [M, N1] -> f32 [M]."""
    compressed = (block_lod > 0).astype(jnp.float32)
    return (compressed * 0.5 * (u + u[:1])).mean(axis=-1)


def preference_loss(costs: jnp.ndarray, deltas: jnp.ndarray, mean, std, temperature: float) -> jnp.ndarray:
    """Mean Bradley–Terry loss over the pairs i < j of each sequence's layouts.

    costs f32 [B, M] (LensNet, differentiable); deltas f32 [B, M] (ΔNLL, baseline 0);
    mean, std: the running ΔNLL statistics that normalise the labels. -> f32 [].
    """
    m = costs.shape[-1]
    if m < 2:
        return jnp.zeros((), jnp.float32)
    i, j = jnp.triu_indices(m, k=1)
    adv = jax.lax.stop_gradient((deltas - mean) / std)
    label = jax.nn.sigmoid(adv[:, j] - adv[:, i])  # P(i better than j): lower ΔNLL wins
    logit = (costs[:, j] - costs[:, i]) / temperature
    return (jax.nn.softplus(logit) - label * logit).mean()


def pearson(x: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray, axis=-1) -> jnp.ndarray:
    """Pearson correlation of x and y over `axis` where mask; NaN when either is constant."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(axis=axis, keepdims=True), 1.0)
    xc = (x - (x * m).sum(axis=axis, keepdims=True) / n) * m
    yc = (y - (y * m).sum(axis=axis, keepdims=True) / n) * m
    cov = (xc * yc).sum(axis=axis)
    var = (xc * xc).sum(axis=axis) * (yc * yc).sum(axis=axis)
    return jnp.where(var > 1e-12, cov / jnp.sqrt(jnp.maximum(var, 1e-12)), jnp.nan)


def ema_update(stats: dict, values: jnp.ndarray, decay: float, mask: jnp.ndarray | None = None) -> dict:
    """Fold a batch of values (those where `mask`, if given) into running bias-corrected
    mean/variance accumulators; a batch with nothing in the mask leaves them as they are.

    stats: {"mean", "sq", "count"} f32 scalars (raw EMA of x and x², steps folded in).
    """
    if mask is None:
        mask = jnp.ones(values.shape, bool)
    seen = mask.any()
    new = {
        "mean": decay * stats["mean"] + (1 - decay) * masked_mean(values, mask),
        "sq": decay * stats["sq"] + (1 - decay) * masked_mean(values * values, mask),
        "count": stats["count"] + 1.0,
    }
    return jax.tree.map(lambda n, o: jnp.where(seen, n, o), new, stats)


def ema_moments(stats: dict, decay: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean, std) of the bias-corrected EMA; (0, 1) before anything was folded in."""
    corr = 1.0 - decay ** stats["count"]
    seen = stats["count"] > 0
    mean = jnp.where(seen, stats["mean"] / jnp.maximum(corr, 1e-12), 0.0)
    var = jnp.where(seen, stats["sq"] / jnp.maximum(corr, 1e-12) - mean * mean, 1.0)
    return mean, jnp.sqrt(jnp.maximum(var, 1e-4))


def empty_ema() -> dict:
    return {"mean": jnp.zeros((), jnp.float32), "sq": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}
