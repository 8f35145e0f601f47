"""The LOD tree of a token history: token embeddings (LOD0), block gists (LOD1), superblock
gists (LOD2), built whole for training or grown token by token for inference.

`build_tree` (training) makes one batched GistNet call per level: `[B*N1, K, D] -> [B*N1, D]`
over the tokens, then `[B*N2, K, D] -> [B*N2, D]` over the LOD1 gists of complete
superblocks. A LOD1 gist depends only on its block's K tokens, a LOD2 gist only on its K
blocks, so gists never see the future. Training never compresses the protected recent
tail, so those blocks' gists are skipped (`tail_blocks`; zeros in the tree).

`StreamTree` (inference) holds a fixed capacity C (a multiple of K²) and a valid length.
`append` writes up to n new rows and recomputes only the touched nodes: a static
ceil(n/K)+1 blocks from the one holding the old end, and the superblocks over them. After
every append, for every block b and superblock s,
  lod1[b] = gist_fn(lod0 block b, mask = token position < length)   (zeros if empty),
  lod2[s] = gist_fn(lod1 children of s, mask = child holds a token < length),
so complete nodes equal `build_tree`'s and partial ones are GistNet over their real part.

`gist_fn(x [..., K, D], mask [..., K] | None) -> [..., D]` is the compressor, e.g.
`lambda x, mask=None: gistnet.apply(params, x, mask)`; mask True marks real entries.

The runtime engine keeps token ids instead of embeddings in LOD0 (`empty_stream(...,
ids=True)`: 4 bytes a token instead of 2·D) and passes `embed` (ids -> embeddings, the
GPT's lookup) to `append`/`refresh`, which embed a block's tokens only to gist them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

GistFn = Callable[..., jnp.ndarray]


class Tree(NamedTuple):
    """The LOD tree of a batch of sequences of T tokens (K tokens per block).

    lod0 [B, T, D]: token embeddings. lod1 [B, N1, D]: one gist per block (N1 = T/K).
    lod2 [B, N2, D]: one gist per complete superblock of K blocks (N2 = T // K²; 0 rows when
    max_lod is 1 or T < K²). One sequence's levels are what `layout.assemble` takes.
    """

    lod0: jnp.ndarray
    lod1: jnp.ndarray
    lod2: jnp.ndarray


def build_tree(gist_fn: GistFn, lod0: jnp.ndarray, k: int, max_lod: int = 2, tail_blocks: int = 0) -> Tree:
    """Gist every block, then every complete superblock. lod0 [B, T, D], T a multiple of k.

    `tail_blocks`: the last blocks are a protected tail that no layout compresses, so
    their gists and those of the superblocks overlapping them are never read: they are
    not built, and their rows are zeros. One gist_fn call per level (none for a level
    with nothing to build). Pure; jit it with the step (k, max_lod, tail_blocks static).
    """
    b, t, d = lod0.shape
    if t % k:
        raise ValueError(f"sequence length {t} is not a multiple of the block size {k}")
    n1, n2 = t // k, t // (k * k) if max_lod >= 2 else 0
    if not 0 <= tail_blocks < n1:
        raise ValueError(f"tail_blocks must lie in [0, {n1}) for {n1} blocks, got {tail_blocks}")
    built1, built2 = n1 - tail_blocks, min(n2, (n1 - tail_blocks) // k)

    def gists(x, rows: int, total: int):  # x [B, rows·k, D] -> [B, total, D], zeros after `rows`
        if rows == 0:
            return jnp.zeros((b, total, d), lod0.dtype)
        g = gist_fn(x.reshape(b * rows, k, d)).reshape(b, rows, d)
        return g if rows == total else jnp.concatenate([g, jnp.zeros((b, total - rows, d), g.dtype)], axis=1)

    lod1 = gists(lod0[:, : built1 * k], built1, n1)
    return Tree(lod0, lod1, gists(lod1[:, : built2 * k], built2, n2).astype(lod1.dtype))


# ----------------------------------------------------------------------------- streaming


class StreamTree(NamedTuple):
    """One growing history of capacity C tokens (C a multiple of K²; vmap for a batch).

    lod0 [C, D]: embeddings, rows ≥ length are zeros — or token ids int32 [C] (the runtime
    engine; `embed` turns them into embeddings where a gist needs them). lod1 [C/K, D],
    lod2 [C/K², D] (0 rows for max_lod 1): gists of the valid part of each block /
    superblock, zeros where empty. length int32 []: valid tokens. K = C // lod1.shape[0].
    """

    lod0: jnp.ndarray
    lod1: jnp.ndarray
    lod2: jnp.ndarray
    length: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.lod0.shape[0]

    @property
    def block_size(self) -> int:
        return self.lod0.shape[0] // self.lod1.shape[0]


def empty_stream(capacity: int, dim: int, dtype=jnp.float32, *, k: int, max_lod: int = 2, ids: bool = False) -> StreamTree:
    """An empty StreamTree of `capacity` tokens of width `dim`, blocks of k tokens; with
    `ids`, LOD0 holds token ids int32 [C] instead of embeddings.

    ValueError unless capacity is a positive multiple of k² (of k with max_lod 1).
    """
    unit = k * k if max_lod >= 2 else k
    if capacity <= 0 or capacity % unit:
        raise ValueError(f"stream capacity {capacity} must be a positive multiple of {unit}")
    n2 = capacity // (k * k) if max_lod >= 2 else 0
    return StreamTree(
        lod0=jnp.zeros((capacity,), jnp.int32) if ids else jnp.zeros((capacity, dim), dtype),
        lod1=jnp.zeros((capacity // k, dim), dtype),
        lod2=jnp.zeros((n2, dim), dtype),
        length=jnp.zeros((), jnp.int32),
    )


def check_append(tree: StreamTree, n_valid: int, n: int | None = None) -> None:
    """Host-side guard before `append`: ValueError if n_valid is negative, exceeds the n
    rows given, or would run past the capacity (append itself clamps silently)."""
    length = int(tree.length)
    if n_valid < 0 or (n is not None and n_valid > n):
        raise ValueError(f"n_valid {n_valid} must be in [0, {n if n is not None else 'n'}]")
    if length + n_valid > tree.capacity:
        raise ValueError(f"appending {n_valid} tokens to {length} overflows the stream capacity {tree.capacity}")


def _write_rows(lod0: jnp.ndarray, new: jnp.ndarray, length, count) -> jnp.ndarray:
    """lod0 [C, ...] with rows length..length+count-1 replaced by new[:count] (new [n, ...], n ≤ C).

    Reads the n-row window that starts at length (clamped by dynamic_slice to fit), keeps
    old rows outside [length, length+count), and writes the window back.
    """
    n = new.shape[0]
    start = jnp.clip(length, 0, lod0.shape[0] - n)
    window = jax.lax.dynamic_slice_in_dim(lod0, start, n)
    src = start + jnp.arange(n) - length  # index into new of each window row
    take = (src >= 0) & (src < count)
    take = take.reshape(take.shape + (1,) * (new.ndim - 1))
    rows = jnp.where(take, new[jnp.clip(src, 0, n - 1)].astype(lod0.dtype), window)
    return jax.lax.dynamic_update_slice_in_dim(lod0, rows, start, axis=0)


def _regist(gist_fn: GistFn, level: jnp.ndarray, parent: jnp.ndarray, first, count: int, k: int, valid_children, lift=None):
    """Recompute `count` consecutive parents from index `first` (past-the-end ones dropped).

    level [M*k, D] children (or [M*k] ids that `lift` embeds); parent [M, D];
    valid_children(child_index int [count, k]) -> bool mask of real children. Returns the
    updated parent [M, D].
    """
    idx = first + jnp.arange(count)  # [count]
    child = idx[:, None] * k + jnp.arange(k)  # [count, k]
    x = level[jnp.clip(child, 0, level.shape[0] - 1)]  # [count, k, D] (or ids [count, k])
    if lift is not None:
        x = lift(x)
    gists = gist_fn(x, valid_children(child)).astype(parent.dtype)
    return parent.at[idx].set(gists, mode="drop")


def append(gist_fn: GistFn, tree: StreamTree, new: jnp.ndarray, n_valid, embed=None) -> StreamTree:
    """Append the first n_valid of the n rows `new [n, D]` (token ids [n] for an id tree,
    with `embed`) — n static, n_valid an int32 scalar, traced or not — and refresh the
    touched gists. Jit-friendly: the work is a static ceil(n/K)+1 LOD1 nodes and
    ceil((ceil(n/K)+1)/K)+1 LOD2 nodes whatever n_valid is.

    n_valid is clamped to [0, n], and past capacity to the rows that fit: length stops at
    C and nothing earlier is overwritten (call `check_append` on the host to raise instead).
    """
    c = tree.capacity
    n = new.shape[0]
    if n > c:
        raise ValueError(f"cannot append {n} rows to a stream of capacity {c}")
    length = tree.length.astype(jnp.int32)
    count = jnp.clip(jnp.asarray(n_valid, jnp.int32), 0, jnp.minimum(n, c - length))
    grown = tree._replace(lod0=_write_rows(tree.lod0, new, length, count), length=length + count)
    return refresh(gist_fn, grown, length, n, embed)


def refresh(gist_fn: GistFn, tree: StreamTree, start, n: int, embed=None) -> StreamTree:
    """Recompute the gists over the rows start..start+n-1 (n static, start an int32
    scalar): the blocks holding them and the superblocks over those, as `append` does after
    writing them. The runtime engine writes decoded tokens one at a time and calls this
    once per block of them. `embed` turns id rows into embeddings (id trees)."""
    k, end = tree.block_size, tree.length
    first_block = jnp.asarray(start, jnp.int32) // k
    nb = -(-n // k) + 1
    lod1 = _regist(gist_fn, tree.lod0, tree.lod1, first_block, nb, k, lambda pos: pos < end, embed)
    lod2 = tree.lod2
    if lod2.shape[0]:
        ns = -(-nb // k) + 1
        lod2 = _regist(gist_fn, lod1, lod2, first_block // k, ns, k, lambda blk: blk * k < end)
    return tree._replace(lod1=lod1, lod2=lod2)
