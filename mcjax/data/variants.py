"""Working-context layouts for MegaContext training, sampled on the host (numpy).

Each training sequence gets a *recency baseline* (the last W_max tokens at LOD0, older
blocks in gists only where they do not fit) and N random *variants* that compress the
sequence down to a target length. The target anneals over training: from
`curriculum_start` × T entries at step 0 to `train_wc_length` × T after
`curriculum_ratio` of the steps, then holds.

A variant is drawn as follows (blocks of K tokens; the last `recent_tokens` and the first
`sink_tokens` stay LOD0):
  1. every complete superblock of K blocks outside the tail collapses to one LOD2 gist
     with probability `lod2_probability`, unless that would take the layout below target;
  2. LOD0 blocks outside the tail, in a random order, collapse to LOD1 gists until the
     layout has at most `target` entries (or none is left).
So a variant has at most `target` entries and, wherever the granularity allows, more
than `target − K` (a LOD1 collapse removes K − 1 entries).

With `megacontext.num_policy_variants` = P > 0, P more slots hold the *policy start*: the
recency layout at the target (the most recent blocks at LOD0 within `target` entries); the
device replaces each copy by LensNet + allocator's edit of it (`mc_step.MCForward.policy`).

Everything is deterministic in (seed, step, row): a resumed run draws the same layouts.
Layouts are int8 `[..., 1 + N + P, N1]`, baseline first; the device assembles them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcjax.config import min_wc_entries
from mcjax.megacontext.layout import recency_baseline


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """What the sampler needs from the config (see `from_config`)."""

    num_blocks: int  # N1 = T / K
    block_size: int  # K
    capacity: int  # W_max: the baseline's entries
    recent_tokens: int  # protected tail, a multiple of K
    max_lod: int
    num_variants: int  # N
    lod2_probability: float
    num_policy: int = 0  # P: on-policy slots after the random variants
    sink_tokens: int = 0  # protected head, a multiple of K

    @classmethod
    def from_config(cls, cfg) -> VariantSpec:
        d, mc = cfg.dataset, cfg.megacontext
        return cls(
            num_blocks=d.context_tokens // d.block_size,
            block_size=d.block_size,
            capacity=cfg.wc_capacity,
            recent_tokens=mc.recent_tokens,
            max_lod=mc.max_lod,
            num_variants=mc.num_random_variants,
            lod2_probability=mc.lod2_probability if mc.max_lod >= 2 else 0.0,
            num_policy=mc.num_policy_variants,
            sink_tokens=mc.sink_tokens,
        )

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def curriculum_target(step: int, total_steps: int, cfg) -> int:
    """Target variant length in entries at `step`: linear from curriculum_start·T down to
    train_wc_length·T over the first curriculum_ratio of training, then constant."""
    mc, t = cfg.megacontext, cfg.dataset.context_tokens
    span = mc.curriculum_ratio * total_steps
    frac = 1.0 if span <= 0 else min(1.0, step / span)
    length = mc.curriculum_start + (mc.train_wc_length - mc.curriculum_start) * frac
    return int(round(length * t))


def sample_variant(rng: np.random.Generator, spec: VariantSpec, target: int) -> np.ndarray:
    """One random compressed layout with at most `target` entries (see the module doc). int8 [N1]."""
    n1, k = spec.num_blocks, spec.block_size
    free = n1 - spec.recent_tokens // k  # blocks before the protected tail
    head = spec.sink_tokens // k  # blocks of the protected head
    lod = np.zeros(n1, np.int8)
    count = n1 * k
    if spec.lod2_probability > 0:
        for s in range(-(-head // k) * k, (free // k) * k, k):  # complete superblocks wholly between head and tail
            if rng.random() < spec.lod2_probability and count - (k * k - 1) >= target:
                lod[s : s + k] = 2
                count -= k * k - 1
    for b in head + rng.permutation(free - head):
        if count <= target:
            break
        if lod[b] == 0:
            lod[b] = 1
            count -= k - 1
    return lod


TRAIN, EVAL = 0, 1  # random streams: training layouts, validation layouts


def sample_layouts(
    spec: VariantSpec, target: int, *, seed: int, step: int, rows: np.ndarray, stream: int = TRAIN
) -> np.ndarray:
    """Baseline + N variants of at most min(target, W_max) entries + P policy starts, for each row.

    rows int [B]: global row ids, for determinism.

    Returns int8 [B, 1 + N + P, N1]. Row r at step s draws from its own generator seeded by
    (stream, seed, s, r), so layouts do not depend on the batch split over processes.
    """
    base = recency_baseline(spec.num_blocks, spec.block_size, spec.capacity, max_lod=spec.max_lod, sink_tokens=spec.sink_tokens,
                            recent_tokens=spec.recent_tokens)
    target = min(target, spec.capacity)
    n = spec.num_variants
    out = np.empty((len(rows), 1 + n + spec.num_policy, spec.num_blocks), np.int8)
    out[:, 1 + n :] = policy_start(spec, target) if spec.num_policy else 0
    for i, r in enumerate(rows):
        rng = np.random.default_rng((stream, seed, step, int(r)))
        out[i, 0] = base
        for v in range(n):
            out[i, 1 + v] = sample_variant(rng, spec, target)
    return out


def policy_start(spec: VariantSpec, target: int) -> np.ndarray:
    """The layout on-policy variants start from: the recency layout within min(target, W_max)
    entries (at least the most compressed layout's). int8 [N1]."""
    k = spec.block_size
    least = min_wc_entries(spec.num_blocks, k, spec.recent_tokens, spec.max_lod, spec.sink_tokens)
    return recency_baseline(spec.num_blocks, k, max(min(target, spec.capacity), least), max_lod=spec.max_lod,
                            sink_tokens=spec.sink_tokens, recent_tokens=spec.recent_tokens)


def variant_capacity(target: int, spec: VariantSpec) -> int:
    """Static WC width of the variants at a target length: min(target, W_max) rounded up to a
    multiple of min(T, W_max)/8 (at least one block). It depends on the target alone, so every
    process compiles the same program, and the step compiles for at most a handful of widths
    over the whole curriculum. 0 when there are no variants."""
    if spec.num_variants + spec.num_policy == 0:
        return 0
    bucket = max(spec.block_size, min(spec.tokens, spec.capacity) // 8)
    return min(spec.tokens, -(-min(target, spec.capacity) // bucket) * bucket)
