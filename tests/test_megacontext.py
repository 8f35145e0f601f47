"""The MegaContext components chained: tokens -> tree -> working context -> LensNet / base GPT."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.megacontext.layout import assemble, recency_baseline
from mcjax.megacontext.tree import build_tree
from mcjax.model.gistnet import GistNet
from mcjax.model.gpt import GPT
from mcjax.model.lensnet import LensNet

K, N1, D, V = 4, 32, 32, 61
T = K * N1
W = 48


def _noisy(params, seed):
    """Every weight perturbed (fresh residual branches are zero, which would hide dependence)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def nets():
    gpt = GPT(vocab_size=V, depth=1, dim=D, head_dim=16)
    gist = GistNet(dim=D, kind="transformer", layers=1, pooling="query", num_heads=2)
    lens = LensNet(dim=D, layers=1, num_heads=2)
    tok = jnp.zeros((1, T), jnp.int32)
    gp = _noisy(nn.unbox(gpt.init(jax.random.key(0), tok)), 1)
    sp = _noisy(nn.unbox(gist.init(jax.random.key(2), jnp.zeros((1, K, D)))), 3)
    wc = jax.vmap(lambda l: assemble(l, jnp.zeros((T, D)), jnp.zeros((N1, D)), jnp.zeros((N1 // K, D)), W))(
        jnp.zeros((1, N1), jnp.int8))
    lp = _noisy(nn.unbox(lens.init(jax.random.key(4), wc)), 5)
    return gpt, gp, gist, sp, lens, lp


def _pipeline(nets, tokens, layout, upto_blocks=N1):
    """WC of the first `upto_blocks` blocks under `layout`, its LensNet scores and GPT hidden states."""
    gpt, gp, gist, sp, lens, lp = nets
    emb = gpt.apply(gp, tokens[None], method=GPT.embed)
    tree = build_tree(lambda x, mask=None: gist.apply(sp, x, mask), emb, K, 2)
    n = upto_blocks
    wc = assemble(jnp.asarray(layout), tree.lod0[0, : n * K], tree.lod1[0, :n], tree.lod2[0, : n // K], W)
    wc = jax.tree.map(lambda x: x[None], wc)
    scores = lens.apply(lp, wc)
    hidden = gpt.apply(gp, embeddings=wc.emb, positions=wc.pos, spans=wc.span)
    return tree, wc, scores, hidden


@pytest.mark.parametrize("p_block", [8, 17, 24])
def test_later_tokens_change_nothing_before_them(nets, p_block):
    """Changing tokens at positions ≥ p changes no tree node, WC entry, LensNet score or
    base-model state that covers only tokens before p."""
    p = p_block * K
    rng = np.random.default_rng(p)
    a = jnp.asarray(rng.integers(0, V, T), jnp.int32)
    b = a.at[p:].set((a[p:] + 1 + jnp.arange(T - p)) % V)
    layout = recency_baseline(N1, K, W)
    ta, wa, _, ha = _pipeline(nets, a, layout)
    tb, wb, _, hb = _pipeline(nets, b, layout)
    # tree: blocks and superblocks that end at or before p
    np.testing.assert_array_equal(np.asarray(ta.lod1[0, :p_block]), np.asarray(tb.lod1[0, :p_block]))
    np.testing.assert_array_equal(np.asarray(ta.lod2[0, : p // (K * K)]), np.asarray(tb.lod2[0, : p // (K * K)]))
    # assembly: entries ending at or before p; the base model is causal over the WC order
    before = np.asarray((wa.pos + wa.span <= p) & wa.valid)[0]
    assert before.any()
    np.testing.assert_array_equal(np.asarray(wa.emb)[0][before], np.asarray(wb.emb)[0][before])
    np.testing.assert_allclose(np.asarray(ha)[0][before], np.asarray(hb)[0][before], atol=1e-6)
    assert not np.allclose(np.asarray(ha)[0][~before & np.asarray(wa.valid)[0]],
                           np.asarray(hb)[0][~before & np.asarray(wa.valid)[0]])
    # LensNet reads only its WC: a WC of the first p tokens scores the same
    prefix = recency_baseline(p_block, K, W)
    sa = _pipeline(nets, a, prefix, p_block)[2]
    sb = _pipeline(nets, b, prefix, p_block)[2]
    np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))


def test_base_model_takes_gist_spans(nets):
    """Gaussian RoPE through the GPT: all-ones spans equal plain positions; gist spans differ."""
    gpt, gp, *_ = nets
    emb = jax.random.normal(jax.random.key(9), (1, 8, D))
    pos = jnp.arange(8)[None] * 4
    plain = gpt.apply(gp, embeddings=emb, positions=pos)
    ones = gpt.apply(gp, embeddings=emb, positions=pos, spans=jnp.ones_like(pos))
    gists = gpt.apply(gp, embeddings=emb, positions=pos, spans=jnp.full_like(pos, 4))
    np.testing.assert_allclose(np.asarray(plain), np.asarray(ones), atol=1e-5)
    assert not np.allclose(np.asarray(plain), np.asarray(gists), atol=1e-3)
