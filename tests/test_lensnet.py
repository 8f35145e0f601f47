"""LensNet: one tanh score per working-context entry, padding-aware, reading only the WC."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.megacontext.layout import assemble, recency_baseline
from mcjax.model.lensnet import LensNet, entry_features

K, N1, D, W = 4, 16, 16, 40
T = K * N1
rng = np.random.default_rng(0)
LOD0 = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
LOD1 = jnp.asarray(rng.normal(size=(N1, D)), jnp.float32)
LOD2 = jnp.asarray(rng.normal(size=(N1 // K, D)), jnp.float32)


def wc_of(layouts):
    """A batch of working contexts [B, W, …] from host layouts."""
    return jax.vmap(lambda l: assemble(l, LOD0, LOD1, LOD2, W))(jnp.asarray(np.stack(layouts)))


LAYOUTS = [recency_baseline(N1, K, W), recency_baseline(N1, K, 24)]


@pytest.fixture(scope="module")
def lens():
    model = LensNet(dim=32, layers=2, num_heads=2)
    params = nn.unbox(model.init(jax.random.key(0), wc_of(LAYOUTS)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, noisy


def test_fresh_lensnet_has_no_opinion(lens):
    model, params, _ = lens
    assert float(jnp.abs(model.apply(params, wc_of(LAYOUTS))).max()) == 0.0


def test_scores_are_tanh_and_zero_on_padding(lens):
    model, _, p = lens
    wc = wc_of(LAYOUTS)
    s = np.asarray(model.apply(p, wc))
    assert s.shape == (2, W) and (np.abs(s) < 1).all()
    assert (s[~np.asarray(wc.valid)] == 0).all() and np.abs(s[np.asarray(wc.valid)]).max() > 0.01


def test_padding_changes_nothing(lens):
    model, _, p = lens
    wc = wc_of(LAYOUTS)
    pad = ~wc.valid
    garbage = wc._replace(
        emb=jnp.where(pad[..., None], 7.0, wc.emb),
        pos=jnp.where(pad, 999, wc.pos),
        span=jnp.where(pad, 32, wc.span),
        lod=jnp.where(pad, 2, wc.lod),
    )
    np.testing.assert_allclose(np.asarray(model.apply(p, garbage)), np.asarray(model.apply(p, wc)), atol=1e-6)


def test_reads_only_the_working_context(lens):
    """Tokens outside the WC's coverage (here: after it) cannot change any score."""
    model, _, p = lens
    layout = recency_baseline(N1 // 2, K, 20)  # a WC of the first T/2 tokens only
    a = assemble(jnp.asarray(layout), LOD0[: T // 2], LOD1[: N1 // 2], LOD2[: N1 // K // 2], W)
    b = assemble(jnp.asarray(layout), LOD0.at[T // 2 :].set(5.0)[: T // 2], LOD1[: N1 // 2], LOD2[: N1 // K // 2], W)
    batch = lambda wc: jax.tree.map(lambda x: x[None], wc)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(model.apply(p, batch(a))), np.asarray(model.apply(p, batch(b))))


def test_entry_features():
    wc = wc_of([recency_baseline(N1, K, 24)])  # LOD2 + LOD1 gists then LOD0 tail
    f = np.asarray(entry_features(wc))[0]
    valid = np.asarray(wc.valid)[0]
    end = np.asarray(wc.pos + wc.span)[0]
    np.testing.assert_allclose(f[valid, 0], np.log1p(np.asarray(wc.span)[0][valid]))
    np.testing.assert_allclose(f[valid, 1], np.log1p(T - end[valid]))
    assert f[valid][-1, 1] == 0.0  # the last entry ends the WC


def test_gaussian_rope_only_differs_for_gists(lens):
    _, _, p = lens
    gauss, simple = LensNet(dim=32, layers=2, num_heads=2), LensNet(dim=32, layers=2, num_heads=2, rope="simple")
    wc_tok = jax.vmap(lambda l: assemble(l, LOD0, LOD1, LOD2, T))(jnp.zeros((2, N1), jnp.int8))
    np.testing.assert_allclose(np.asarray(gauss.apply(p, wc_tok)), np.asarray(simple.apply(p, wc_tok)), atol=1e-5)
    wc = wc_of(LAYOUTS)
    assert not np.allclose(np.asarray(gauss.apply(p, wc)), np.asarray(simple.apply(p, wc)), atol=1e-4)


def test_every_param_gets_gradient(lens):
    model, _, p = lens
    wc = wc_of(LAYOUTS)
    g = jax.grad(lambda p: jnp.sum(model.apply(p, wc) * jnp.arange(W)))(p)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert float(jnp.abs(leaf).max()) > 0, jax.tree_util.keystr(path)
