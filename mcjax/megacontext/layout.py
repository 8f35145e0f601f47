"""Working-context layouts and their assembly into fixed-shape working contexts.

A layout is one int array `block_lod [N1]` ∈ {0, 1, 2}: for each block of K tokens, the
level of detail at which the working context (WC) shows it. LOD0 shows its K tokens,
LOD1 its one gist, LOD2 one gist for a whole superblock of K blocks (K² tokens), so a
LOD2 superblock has all of its K blocks at 2. Entry counts per block are K, 1 and 1/K.

`assemble` (pure jnp, jit- and vmap-friendly) turns a layout and the LOD tree into a WC of
static capacity W: per-block entry counts → cumulative offsets → for each slot j < W the
block it falls in (`searchsorted`) and its offset there → one gather per level.

Host-side helpers (numpy): `check_layout`, `entry_count`, the all-LOD0 and
recency-baseline builders, and `render` (an ASCII strip: `.` LOD0, `─` LOD1, `═` LOD2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOD_CHARS = {0: ".", 1: "─", 2: "═"}


class WorkingContext(NamedTuple):
    """A WC of capacity W (leading batch axes allowed).

    emb [W, D]: entry embeddings (zeros in padding slots).
    lod [W] int32: level of each entry; pos [W] int32: global position of its first token;
    span [W] int32: tokens it covers (1, K or K²); valid [W] bool: a real entry, not padding.
    target [W] int32: index of the entry's next-token target, the first token after its
    span (pos + span); target_valid [W] bool: valid and target < T. No entry ever has a
    target inside its own span.
    """

    emb: jnp.ndarray
    lod: jnp.ndarray
    pos: jnp.ndarray
    span: jnp.ndarray
    valid: jnp.ndarray
    target: jnp.ndarray
    target_valid: jnp.ndarray


def rope_positions(wc: WorkingContext, mode: str = "global") -> jnp.ndarray:
    """The base model's RoPE position of each entry of WCs [..., W] (megacontext.positions):
    "global" its first token's position in the history (`wc.pos`); "compact" its slot — the
    valid entries are packed first, so they read 0, 1, 2, … and every entry stays within W
    positions of the WC's end, however far back in the history its tokens lie (padding: 0)."""
    if mode == "global":
        return wc.pos
    if mode != "compact":
        raise ValueError(f"megacontext.positions {mode!r}: expected 'global' or 'compact'")
    slots = jnp.broadcast_to(jnp.arange(wc.pos.shape[-1], dtype=wc.pos.dtype), wc.pos.shape)
    return jnp.where(wc.valid, slots, 0)


LONG = 256  # an axis longer than this (a runtime history's blocks) takes the log-depth paths below


def prefix_sum(x: jnp.ndarray) -> jnp.ndarray:
    """Inclusive prefix sum over the last axis. On GPU `jnp.cumsum` is a reduce-window whose
    work grows with the square of the length; a long axis takes a log-depth parallel scan."""
    if x.shape[-1] <= LONG:
        return jnp.cumsum(x, axis=-1)
    return jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 1)


def block_entry_counts(block_lod: jnp.ndarray, k: int, length=None) -> jnp.ndarray:
    """Entries each block contributes: K at LOD0, 1 at LOD1, 1 on a superblock's first block at LOD2.

    block_lod int [..., N1] -> int32 [..., N1]. `length` (int [...], optional): tokens present
    in a growing history; a LOD0 block then holds only its tokens below `length` (a partly
    filled last block fewer than K) and blocks past it hold none. Default: all N1·K present.
    """
    lod = block_lod.astype(jnp.int32)
    first_of_super = (jnp.arange(lod.shape[-1]) % k) == 0
    counts = jnp.where(lod == 0, k, jnp.where(lod == 1, 1, first_of_super.astype(jnp.int32)))
    if length is None:
        return counts
    raw = jnp.asarray(length, jnp.int32)[..., None] - jnp.arange(lod.shape[-1], dtype=jnp.int32) * k
    return jnp.where(raw <= 0, 0, jnp.where(lod == 0, jnp.minimum(raw, k), counts))


def assemble(
    block_lod: jnp.ndarray,
    lod0: jnp.ndarray,
    lod1: jnp.ndarray,
    lod2: jnp.ndarray | None,
    capacity: int,
    *,
    length=None,
    embed=None,
) -> WorkingContext:
    """Gather the WC that `block_lod` describes, padded to `capacity` slots.

    block_lod int [N1]; lod0 [T, D]; lod1 [N1, D]; lod2 [N2, D] or None (N2 = T // K²).
    K = T // N1. One sequence: `jax.vmap` it over a batch (and over layouts of a sequence).
    A layout with more than `capacity` entries is truncated; callers keep layouts valid
    (`check_layout` on the host, the focus allocator on the device).

    A growing history (the runtime engine): `length` int [] is the tokens present (blocks
    past it are absent, a partly filled last block shows its tokens so far; targets at or
    past `length` are invalid), and with `embed` given `lod0` holds token ids int [T]
    whose LOD0 entries are `embed(ids [W]) -> [W, D]` (the GPT's embedding lookup).
    """
    t = lod0.shape[0]
    n1 = block_lod.shape[0]
    k = t // n1
    lod_of_block = block_lod.astype(jnp.int32)
    counts = block_entry_counts(lod_of_block, k, length)
    ends = prefix_sum(counts)
    starts = ends - counts
    j = jnp.arange(capacity, dtype=jnp.int32)
    method = "sort" if n1 > LONG else "scan"  # one sort kernel, not a loop of log2(N1) gathers
    b = jnp.clip(jnp.searchsorted(ends, j, side="right", method=method), 0, n1 - 1).astype(jnp.int32)
    offset = j - starts[b]
    lod = lod_of_block[b]
    valid = j < ends[-1]
    pos = jnp.where(lod == 0, b * k + offset, jnp.where(lod == 1, b * k, (b // k) * k * k))
    span = jnp.where(lod == 0, 1, jnp.where(lod == 1, k, k * k))

    # One gather from [lod0; lod1; lod2]. A WC shows every tree node at most once and padding
    # slots point past the table (distinct rows, filled with zeros), so the indices are unique:
    # the backward pass is a scatter without colliding writes.
    gists = [lod1]
    if lod2 is not None and lod2.shape[0] > 0:
        gists.append(lod2)
    if embed is None:
        table = jnp.concatenate([lod0] + [g.astype(lod0.dtype) for g in gists])
        src = jnp.where(lod == 0, pos, jnp.where(lod == 1, t + b, t + n1 + b // k))
        src = jnp.where(valid, src, table.shape[0] + j)
        emb = table.at[src].get(mode="fill", fill_value=0, unique_indices=True)
    else:  # token ids: LOD0 entries are looked up, gists gathered
        tokens = embed(lod0[jnp.where(valid & (lod == 0), pos, 0)])
        table = jnp.concatenate(gists).astype(tokens.dtype)
        src = jnp.where(valid & (lod > 0), jnp.where(lod == 1, b, n1 + b // k), table.shape[0])
        emb = jnp.where((valid & (lod == 0))[:, None], tokens, table.at[src].get(mode="fill", fill_value=0))

    pos = jnp.where(valid, pos, 0)
    span = jnp.where(valid, span, 0)
    target = pos + span
    end = t if length is None else jnp.asarray(length, jnp.int32)
    return WorkingContext(
        emb=emb,
        lod=jnp.where(valid, lod, 0),
        pos=pos,
        span=span,
        valid=valid,
        target=jnp.where(valid, target, 0),
        target_valid=valid & (target < end),
    )


# ----------------------------------------------------------------------------- host side


def entry_count(block_lod: np.ndarray, k: int) -> int:
    """Entries of a layout (numpy; the sum of `block_entry_counts`)."""
    lod = np.asarray(block_lod)
    first = (np.arange(lod.shape[-1]) % k) == 0
    return int(np.where(lod == 0, k, np.where(lod == 1, 1, first)).sum())


def check_layout(block_lod: np.ndarray, k: int, *, capacity: int | None = None, recent_tokens: int = 0,
                 sink_tokens: int = 0) -> None:
    """Raise ValueError unless the layout is valid.

    Valid: levels in {0, 1, 2}; LOD2 only on complete superblocks, all K blocks at once;
    at most `capacity` entries; the last `recent_tokens` and the first `sink_tokens` tokens at LOD0.
    """
    lod = np.asarray(block_lod)
    n1 = lod.shape[0]
    if lod.ndim != 1 or not np.isin(lod, (0, 1, 2)).all():
        raise ValueError(f"layout must be a 1-D array of levels 0, 1, 2, got {lod!r}")
    for s in range(0, n1, k):
        sup = lod[s : s + k]
        if (sup == 2).any() and (len(sup) < k or not (sup == 2).all()):
            raise ValueError(f"superblock at block {s}: LOD2 must cover all {k} blocks of a complete superblock")
    if capacity is not None and entry_count(lod, k) > capacity:
        raise ValueError(f"layout has {entry_count(lod, k)} entries, more than the capacity {capacity}")
    tail = -(-recent_tokens // k)
    if tail and (lod[n1 - tail :] != 0).any():
        raise ValueError(f"the last {recent_tokens} tokens ({tail} blocks) must be at LOD0")
    head = -(-sink_tokens // k)
    if head and (lod[:head] != 0).any():
        raise ValueError(f"the first {sink_tokens} tokens ({head} blocks) must be at LOD0")


def all_lod0(num_blocks: int) -> np.ndarray:
    """Every block at LOD0 (the full-context layout). int8 [N1]."""
    return np.zeros(num_blocks, np.int8)


def recency_baseline(num_blocks: int, k: int, capacity: int, *, max_lod: int = 2, sink_tokens: int = 0,
                     recent_tokens: int = 0) -> np.ndarray:
    """The recency baseline: the first `sink_tokens` tokens (the protected head) and the most
    recent blocks at LOD0, as many as fit in `capacity`.

    Older blocks are LOD1 gists; where even that does not fit, the oldest complete
    superblocks between the head and the last `recent_tokens` tokens collapse to LOD2 (when
    max_lod ≥ 2) until the layout fits with that tail raw. int8 [N1]. ValueError if no layout
    at that level fits.
    """
    head, tail = -(-sink_tokens // k), -(-recent_tokens // k)
    lod = np.ones(num_blocks, np.int8)
    lod[:head] = 0
    lod[num_blocks - tail:] = 0
    if max_lod >= 2:  # collapse the oldest superblocks until the all-gist layout fits
        for s in range(-(-head // k) * k, ((num_blocks - tail) // k) * k, k):
            if entry_count(lod, k) <= capacity:
                break
            lod[s : s + k] = 2
    if entry_count(lod, k) > capacity:
        raise ValueError(f"{num_blocks} blocks of {k} tokens do not fit in {capacity} entries at LOD ≤ {max_lod}")
    for b in range(num_blocks - tail - 1, -1, -1):  # expand from the end while the budget allows
        if lod[b] != 1:
            break
        lod[b] = 0
        if entry_count(lod, k) > capacity:
            lod[b] = 1
            break
    return lod


def render(block_lod: np.ndarray) -> str:
    """ASCII strip of a layout, one character per block: `.` LOD0, `─` LOD1, `═` LOD2."""
    return "".join(LOD_CHARS[int(v)] for v in np.asarray(block_lod))
