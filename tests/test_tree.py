"""The LOD tree: batched build, causality, and streaming appends that match the batched build."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.megacontext.tree import StreamTree, Tree, append, build_tree, check_append, empty_stream, refresh
from mcjax.model.gistnet import GistNet

B, T, D, K = 2, 64, 16, 4


def toy_gist(x, mask=None):
    """A cheap stand-in compressor: position-weighted masked mean, then tanh. x [..., K, D]."""
    if mask is None:
        mask = jnp.ones(x.shape[:-1], bool)
    w = jnp.where(mask, (1.0 + jnp.arange(x.shape[-2])) / x.shape[-2], 0.0)
    s = jnp.sum(jnp.where(mask[..., None], x, 0) * w[..., None], axis=-2)
    return jnp.tanh(s / jnp.maximum(mask.sum(-1, keepdims=True), 1))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)


@pytest.fixture(scope="module")
def gistnet_fn():
    """A real (small, random-weight) GistNet as gist_fn."""
    net = GistNet(dim=D, kind="transformer", layers=1, pooling="query", head="mlp", num_heads=2)
    x = jnp.zeros((1, K, D))
    shapes = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), x))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    return lambda x, mask=None: net.apply(params, x, mask)


@pytest.fixture(scope="module")
def gistnet_build(gistnet_fn):
    """build_tree with the GistNet, jitted once for [B, T, D] and shared by the tests."""
    return jax.jit(lambda x: build_tree(gistnet_fn, x, K, 2))


def expected_stream(gist_fn, seq, length):
    """What a stream holding seq[:length] must contain. seq [C, D] -> (lod1 [C/K, D], lod2 [C/K², D])."""
    c = seq.shape[0]
    pos = jnp.arange(c).reshape(c // K, K)
    lod1 = gist_fn(seq.reshape(c // K, K, D), pos < length)
    blk = jnp.arange(c // K).reshape(c // (K * K), K)
    return lod1, gist_fn(lod1.reshape(-1, K, D), blk * K < length)


# ----------------------------------------------------------------------------- build_tree


def test_build_tree_one_call_per_level(tokens):
    calls = []

    def counting(x, mask=None):
        calls.append((x.shape, mask))
        return toy_gist(x, mask)

    tree = jax.jit(lambda x: build_tree(counting, x, K, max_lod=2))(tokens)
    assert isinstance(tree, Tree)
    assert [c[0] for c in calls] == [(B * T // K, K, D), (B * T // K**2, K, D)] and calls[0][1] is None
    assert tree.lod0.shape == (B, T, D) and tree.lod1.shape == (B, T // K, D) and tree.lod2.shape == (B, T // K**2, D)
    blocks = np.asarray(tokens).reshape(B, T // K, K, D)
    want1, want2 = jax.jit(lambda b, l1: (toy_gist(b), toy_gist(l1.reshape(B, -1, K, D))))(blocks, tree.lod1)
    np.testing.assert_allclose(tree.lod1, want1, atol=1e-6)
    np.testing.assert_allclose(tree.lod2, want2, atol=1e-6)


def test_build_tree_without_lod2(tokens):
    assert jax.eval_shape(lambda x: build_tree(toy_gist, x, K, max_lod=1), tokens).lod2.shape == (B, 0, D)
    short = jax.eval_shape(lambda x: build_tree(toy_gist, x, K, max_lod=2), tokens[:, : 2 * K])  # T < K²
    assert short.lod1.shape == (B, 2, D) and short.lod2.shape == (B, 0, D)
    with pytest.raises(ValueError, match="multiple"):
        build_tree(toy_gist, tokens[:, :10], K)


def test_build_tree_skips_the_protected_tail(tokens):
    calls = []

    def counting(x, mask=None):
        calls.append(x.shape)
        return toy_gist(x, mask)

    full = jax.jit(lambda x: build_tree(toy_gist, x, K, max_lod=2))(tokens)
    # 16 blocks, the last 5 never compressed: 11 LOD1 gists, 2 of the 4 superblocks
    tree = jax.jit(lambda x: build_tree(counting, x, K, max_lod=2, tail_blocks=5))(tokens)
    assert calls == [(B * 11, K, D), (B * 2, K, D)]
    assert tree.lod1.shape == full.lod1.shape and tree.lod2.shape == full.lod2.shape
    np.testing.assert_array_equal(tree.lod1[:, :11], full.lod1[:, :11])
    np.testing.assert_array_equal(tree.lod2[:, :2], full.lod2[:, :2])
    assert not np.asarray(tree.lod1[:, 11:]).any() and not np.asarray(tree.lod2[:, 2:]).any()
    with pytest.raises(ValueError, match="tail_blocks"):
        build_tree(toy_gist, tokens, K, tail_blocks=16)


def test_build_tree_is_causal(tokens, gistnet_build):
    build = gistnet_build
    base = build(tokens)
    for p in (5, 16, 37, 48):
        changed = tokens.at[:, p:].set(jnp.asarray(np.random.default_rng(p).standard_normal((B, T - p, D)), jnp.float32))
        tree = build(changed)
        n1, n2 = p // K, p // K**2  # blocks / superblocks ending at or before p
        np.testing.assert_array_equal(tree.lod1[:, :n1], base.lod1[:, :n1])
        np.testing.assert_array_equal(tree.lod2[:, :n2], base.lod2[:, :n2])
        assert not np.allclose(tree.lod1[:, n1:], base.lod1[:, n1:])  # the rest did see the change
        assert not np.allclose(tree.lod2[:, n2:], base.lod2[:, n2:])


# ----------------------------------------------------------------------------- streaming


@functools.cache
def _jitted_append(gist_fn):
    return jax.jit(functools.partial(append, gist_fn))


def _stream(gist_fn, seq, length, chunk, check_every=None, tree=None):
    """Append seq[:length] (from tree.length on) in chunks of `chunk` rows with a jitted append
    (the last chunk partly valid). Checks the stream invariant after every append when
    check_every is a gist_fn."""
    step = _jitted_append(gist_fn)
    expect = jax.jit(functools.partial(expected_stream, check_every or gist_fn))
    tree = empty_stream(seq.shape[0], D, k=K) if tree is None else tree
    for start in range(int(tree.length), length, chunk):
        new = seq[start : start + chunk]
        new = jnp.pad(new, ((0, chunk - new.shape[0]), (0, 0)), constant_values=7.0)  # padding rows
        tree = step(tree, new, jnp.int32(min(chunk, length - start)))
        if check_every is not None:
            lod1, lod2 = expect(seq, tree.length)
            np.testing.assert_allclose(tree.lod1, lod1, atol=1e-6, err_msg=f"chunk {chunk} at {int(tree.length)}")
            np.testing.assert_allclose(tree.lod2, lod2, atol=1e-6, err_msg=f"chunk {chunk} at {int(tree.length)}")
    return tree


@pytest.mark.parametrize("chunk", [1, 5, K, 3 * K + 2])
def test_stream_matches_build_tree(chunk, tokens):
    seq, length = tokens[0], 61  # ends in a partial block (60..63) and a partial superblock (48..63)
    tree = _stream(toy_gist, seq, length, chunk, check_every=toy_gist)
    assert int(tree.length) == length and tree.length.dtype == jnp.int32
    full = build_tree(toy_gist, seq[None], K)
    np.testing.assert_allclose(tree.lod1[:15], full.lod1[0, :15], atol=1e-6)  # complete blocks
    np.testing.assert_allclose(tree.lod2[:3], full.lod2[0, :3], atol=1e-6)  # complete superblocks
    np.testing.assert_allclose(tree.lod1[15], toy_gist(seq[60:64], jnp.arange(4) < 1), atol=1e-6)
    np.testing.assert_array_equal(tree.lod0[:length], seq[:length])
    np.testing.assert_array_equal(tree.lod0[length:], 0)  # padding rows past n_valid are not written


def test_stream_with_gistnet(tokens, gistnet_fn, gistnet_build):
    seq = tokens[1]
    tree = _stream(gistnet_fn, seq, 61, 5)
    full = jax.tree.map(lambda v: v[1], gistnet_build(tokens))
    # the partial last block (1 token) and superblock (its 4 blocks all hold tokens), masked
    last_block, last_super = jax.jit(gistnet_fn)(
        jnp.stack([seq[60:64], tree.lod1[12:16]]), jnp.stack([jnp.arange(4) < 1, jnp.arange(4) < 4])
    )
    np.testing.assert_allclose(tree.lod1[:15], full.lod1[:15], atol=1e-5)
    np.testing.assert_allclose(tree.lod2[:3], full.lod2[:3], atol=1e-5)
    np.testing.assert_allclose(tree.lod1[15], last_block, atol=1e-5)
    np.testing.assert_allclose(tree.lod2[3], last_super, atol=1e-5)
    # filling the stream to capacity reproduces build_tree everywhere
    tree = _stream(gistnet_fn, seq, 64, 5, tree=tree)
    assert int(tree.length) == 64
    np.testing.assert_allclose(tree.lod1, full.lod1, atol=1e-5)
    np.testing.assert_allclose(tree.lod2, full.lod2, atol=1e-5)


def test_stream_clamps_at_capacity_and_host_check_raises(tokens):
    seq, step = tokens[0, :32], _jitted_append(toy_gist)
    tree = step(empty_stream(32, D, k=K), seq[:30], jnp.int32(30))
    check_append(tree, 2, n=5)
    with pytest.raises(ValueError, match="capacity"):
        check_append(tree, 3)
    with pytest.raises(ValueError, match="n_valid"):
        check_append(tree, 4, n=3)
    over = step(tree, seq[27:32] + 100.0, jnp.int32(5))  # 3 rows too many: clamped
    assert int(over.length) == 32
    np.testing.assert_array_equal(over.lod0[:30], seq[:30])  # nothing earlier overwritten
    np.testing.assert_array_equal(over.lod0[30:], seq[27:29] + 100.0)
    lod1, lod2 = jax.jit(functools.partial(expected_stream, toy_gist))(over.lod0, 32)
    np.testing.assert_allclose(over.lod1, lod1, atol=1e-6)
    np.testing.assert_allclose(over.lod2, lod2, atol=1e-6)
    full = step(over, seq[:5], jnp.int32(4))  # a full stream stays as it is
    assert int(full.length) == 32
    for a, b in zip(full, over):
        np.testing.assert_array_equal(a, b)


def test_stream_vmaps_over_a_batch(tokens):
    streams = jax.tree.map(lambda v: jnp.stack([v, v]), empty_stream(T, D, k=K))
    step = jax.jit(jax.vmap(functools.partial(append, toy_gist)))
    streams = step(streams, tokens[:, :8], jnp.array([8, 3], jnp.int32))
    streams = step(streams, tokens[:, 8:16], jnp.array([8, 8], jnp.int32))
    np.testing.assert_array_equal(streams.length, [16, 11])
    expect = jax.jit(functools.partial(expected_stream, toy_gist))
    for i, n_first in enumerate((8, 3)):
        seq = jnp.concatenate([tokens[i, :n_first], tokens[i, 8:16], jnp.zeros((T - n_first - 8, D))])
        lod1, lod2 = expect(seq, n_first + 8)
        np.testing.assert_allclose(streams.lod1[i], lod1, atol=1e-6)
        np.testing.assert_allclose(streams.lod2[i], lod2, atol=1e-6)


def test_empty_stream_shapes_and_checks():
    s = empty_stream(32, D, jnp.bfloat16, k=K)
    assert isinstance(s, StreamTree) and (s.capacity, s.block_size) == (32, K)
    assert (s.lod0.shape, s.lod1.shape, s.lod2.shape, s.length.shape) == ((32, D), (8, D), (2, D), ())
    assert s.lod0.dtype == jnp.bfloat16 and int(s.length) == 0
    s1 = empty_stream(8, D, k=K, max_lod=1)
    assert s1.lod2.shape == (0, D)
    s1 = _jitted_append(toy_gist)(s1, jnp.ones((5, D)), jnp.int32(5))
    assert int(s1.length) == 5 and s1.lod2.shape == (0, D)
    np.testing.assert_allclose(s1.lod1[1], toy_gist(jnp.ones((4, D)), jnp.arange(4) < 1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        empty_stream(24, D, k=K)


def test_id_stream_with_embed_equals_the_embedding_stream(tokens):
    """A tree of token ids (the runtime engine's) with `embed` holds the same gists as a tree
    of their embeddings; `refresh` after writing ids one by one equals `append`."""
    table = tokens[0, :50]  # 50 "vocabulary" embeddings
    embed = lambda ids: table[ids]  # noqa: E731
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 50, T), jnp.int32)
    by_emb = _stream(toy_gist, table[ids], 45, 7)
    by_ids = empty_stream(T, D, k=K, ids=True)
    assert by_ids.lod0.shape == (T,) and by_ids.lod0.dtype == jnp.int32
    step = jax.jit(lambda t, new, n: append(toy_gist, t, new, n, embed))
    for start in range(0, 45, 7):
        by_ids = step(by_ids, jnp.pad(ids[start : start + 7], (0, 7 - ids[start : start + 7].shape[0])), jnp.int32(min(7, 45 - start)))
    np.testing.assert_array_equal(by_ids.lod0[:45], ids[:45])
    np.testing.assert_allclose(by_ids.lod1, by_emb.lod1, atol=1e-6)
    np.testing.assert_allclose(by_ids.lod2, by_emb.lod2, atol=1e-6)
    # decode-style: write 8 ids one at a time, then refresh the rows they filled, once
    grown = by_ids._replace(lod0=by_ids.lod0.at[45:53].set(ids[45:53]), length=jnp.int32(53))
    grown = jax.jit(lambda t: refresh(toy_gist, t, jnp.int32(45), 8, embed))(grown)
    want = step(by_ids, ids[45:53], jnp.int32(8))
    np.testing.assert_allclose(grown.lod1, want.lod1, atol=1e-6)
    np.testing.assert_allclose(grown.lod2, want.lod2, atol=1e-6)
