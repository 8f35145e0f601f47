"""The GPT, RoPE, the fused cross-entropy and the optimizer, at tiny sizes, checking numbers."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.model.gpt import GPT
from mcjax.model.rope import apply_rope, rope_angles
from mcjax.model.xent import softcap_logits, token_nll
from mcjax.train.flops import flops_per_token, mfu
from mcjax.train.muon import newton_schulz
from mcjax.train.optim import lr_multiplier, param_group

V, D, T = 97, 64, 16


@pytest.fixture(scope="module")
def model_and_params():
    model = GPT(vocab_size=V, depth=2, dim=D, head_dim=32, softcap=15.0)
    return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))


@pytest.fixture(scope="module")
def trained_like(model_and_params):
    """Params with every weight perturbed: at init the residual branches are zero (identity blocks)."""
    model, p = model_and_params
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, noisy)


def _tokens(seed, shape=(2, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def test_param_shapes(model_and_params):
    _, p = model_and_params
    shapes = jax.tree.map(lambda x: x.shape, p["params"])
    assert shapes["wte"] == (V, D) and shapes["lm_head"] == (D, V)
    assert shapes["blocks"]["wq"] == (2, D, D) and shapes["blocks"]["w_fc"] == (2, D, 4 * D)
    assert shapes["blocks"]["w_proj"] == (2, 4 * D, D)


def test_initial_loss_is_log_vocab(model_and_params):
    """The head starts at zero (nanochat init): every logit is 0, so NLL = ln V exactly."""
    model, p = model_and_params
    h = model.apply(p, _tokens(0))
    nll = token_nll(h.reshape(-1, D), p["params"]["lm_head"], _tokens(1).reshape(-1), softcap=15.0)
    np.testing.assert_allclose(np.asarray(nll), math.log(V), rtol=1e-6)


def test_embeddings_input_equals_token_input(trained_like):
    model, p = trained_like
    toks = _tokens(2)
    emb = model.apply(p, toks, method=GPT.embed)
    pos = jnp.broadcast_to(jnp.arange(T), toks.shape)
    a = model.apply(p, toks)
    b = model.apply(p, embeddings=emb, positions=pos)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_positions_matter(trained_like):
    model, p = trained_like
    toks = _tokens(3)
    emb = model.apply(p, toks, method=GPT.embed)
    shifted = model.apply(p, embeddings=emb, positions=jnp.broadcast_to(jnp.arange(T) * 3, toks.shape))
    assert not np.allclose(np.asarray(shifted), np.asarray(model.apply(p, toks)))


def test_causal(trained_like):
    """Changing tokens at positions ≥ 9 changes no hidden state before position 9."""
    model, p = trained_like
    a = _tokens(4)
    b = a.at[:, 9:].set((a[:, 9:] + 1) % V)
    ha, hb = model.apply(p, a), model.apply(p, b)
    np.testing.assert_allclose(np.asarray(ha[:, :9]), np.asarray(hb[:, :9]), atol=1e-6)
    assert not np.allclose(np.asarray(ha[:, 9:]), np.asarray(hb[:, 9:]))


def test_rope_preserves_norm_and_is_relative():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)

    def rot(x, pos):
        cos, sin = rope_angles(jnp.array([[pos]]), 32, 10000.0)
        return apply_rope(x, cos, sin)

    np.testing.assert_allclose(float(jnp.linalg.norm(rot(q, 7.0))), float(jnp.linalg.norm(q)), rtol=1e-5)
    dot = lambda a, b: float(jnp.sum(a * b))  # noqa: E731
    np.testing.assert_allclose(dot(rot(q, 10.0), rot(k, 4.0)), dot(rot(q, 106.0), rot(k, 100.0)), rtol=1e-4)


@pytest.mark.parametrize("mode", ["fused", "recompute"])
@pytest.mark.parametrize("chunk", [0, 8, 37, 100])
def test_token_nll_matches_autodiff(mode, chunk):
    """Value and both gradients equal plain autodiff of softcap + log-softmax, any chunking."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 50, 37))
    g = jnp.asarray(rng.uniform(size=37), jnp.float32)

    def ref(h, w):
        z = softcap_logits(h, w, 3.0)
        return (jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, tgt[:, None], -1)[:, 0]) @ g

    def ours(h, w):
        return token_nll(h, w, tgt, softcap=3.0, chunk_tokens=chunk, mode=mode) @ g

    (va, ga), (vb, gb) = jax.value_and_grad(ours, (0, 1))(h, w), jax.value_and_grad(ref, (0, 1))(h, w)
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-6)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_token_nll_rejects_unknown_mode():
    with pytest.raises(ValueError, match="fused"):
        token_nll(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros(2, jnp.int32), softcap=0.0, mode="fast")


def test_newton_schulz_orthogonalises():
    g = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 64)), jnp.float32)
    x = newton_schulz(g).astype(jnp.float32)
    s = np.linalg.svd(np.asarray(x), compute_uv=False)
    assert x.shape == g.shape
    assert 0.5 < s.min() and s.max() < 1.3  # the quintic iteration lands near 1, not exactly


def test_lr_schedule_shape():
    f = lambda s: float(lr_multiplier(s, 100, 0.1, 0.2, 0.0))  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == 1.0 and f(80) == 1.0
    assert f(90) == pytest.approx(0.5) and f(99) == pytest.approx(0.05)
    assert float(lr_multiplier(100, 100, 0.0, 0.2, 0.1)) == pytest.approx(0.1)


def test_param_groups():
    assert param_group("wte") == "embedding"
    assert param_group("gpt", "wte") == "embedding"
    assert param_group("gpt", "blocks", "wq") == "matrix"
    assert param_group("gistnet", "head", "w") == param_group("lensnet", "w_out") == "controller"
    assert param_group("lm_head") == "unembedding"
    assert param_group("blocks") == "matrix"


def test_flops_and_mfu():
    # d12: 6·(12·12·768² + 768·65536) + 12·12·768·2048
    assert flops_per_token(12, 768, 65536, 2048) == 6 * (12 * 12 * 768**2 + 768 * 65536) + 12 * 12 * 768 * 2048
    assert mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert math.isnan(mfu(1000.0, 1e9, 1, None))


def test_gaussian_rope_is_plain_rope_for_single_tokens():
    pos = jnp.asarray([[0, 5, 17, 300]])
    plain = rope_angles(pos, 32, 10000.0)
    gauss = rope_angles(pos, 32, 10000.0, spans=jnp.ones_like(pos))
    for a, b in zip(plain, gauss):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_gaussian_rope_centres_and_damps_by_frequency():
    """A 32-token gist: rotation at its centre, each frequency damped by exp(-½(σω)²), σ² = (32²−1)/12."""
    cos, sin = rope_angles(jnp.asarray([[64]]), 8, 100.0, spans=jnp.asarray([[32]]))
    omega = 100.0 ** (-np.arange(0, 8, 2) / 8)
    damp = np.exp(-0.5 * (np.sqrt((32**2 - 1) / 12) * omega) ** 2)
    np.testing.assert_allclose(np.asarray(cos[0, 0]), np.cos(79.5 * omega) * damp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sin[0, 0]), np.sin(79.5 * omega) * damp, rtol=1e-5, atol=1e-7)
    assert damp[0] < 1e-6 and damp[-1] > 0.5  # fast frequencies vanish, slow ones survive


def test_pallas_loss_kernel_matches_xla_path():
    """The GPU kernel of the fused loss (run in Pallas' interpreter) equals the XLA path."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 2048)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 2048, 8))
    g = jnp.asarray(rng.uniform(size=8), jnp.float32)

    def loss(kernel):
        return lambda h, w: token_nll(h, w, tgt, softcap=15.0, kernel=kernel) @ g

    (va, ga), (vb, gb) = (jax.value_and_grad(loss(k), (0, 1))(h, w) for k in ("pallas_interpret", "xla"))
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-6)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel"):
        token_nll(h, w, tgt, softcap=15.0, kernel="cuda")
