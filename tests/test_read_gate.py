"""The base's read gate on gist entries (gistnet.read_gate): attention logits toward gist keys
get a per-layer, per-head bias. Checked against a numpy softmax, against the working context
with its gists left out (a closed gate), through the KV cache, and in a training step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from mcjax.config import config_from_dict
from mcjax.model import kv_cache as kc
from mcjax.model.attention import causal_attention, gate_channel
from mcjax.model.gistnet import read_bias
from mcjax.model.gpt import GPT
from mcjax.model.hf_config import LlamaSpec
from mcjax.model.llama import Llama

B, T, N, KV, H = 2, 9, 4, 2, 8


def _reference(q, k, v, bias, keys):
    """Causal softmax attention in float64 numpy with the gate added to the logits."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, N // KV, axis=2), np.repeat(v, N // KV, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    logits += np.where(np.asarray(keys)[:, None, None, :], np.asarray(bias, np.float64)[None, :, None, None], 0.0)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def test_gated_attention_equals_a_numpy_softmax():
    """Both ways of adding the gate — XLA's logit bias, and the extra head channel cuDNN gets
    (computed here by XLA) — equal the reference, grouped-query heads included."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, n, H)) for key, n in zip(ks, (N, KV, KV)))
    bias = jnp.array([-1.0, 0.5, -3.0, 2.0])
    keys = jax.random.bernoulli(ks[3], 0.4, (B, T))
    ref = _reference(q, k, v, bias, keys)
    np.testing.assert_allclose(causal_attention(q, k, v, "xla", (bias, keys)), ref, atol=1e-5)
    channel = jax.nn.dot_product_attention(*gate_channel(q, k, v, bias, keys), is_causal=True, scale=H**-0.5)
    np.testing.assert_allclose(channel[..., :H], ref, atol=1e-5)
    assert np.abs(causal_attention(q, k, v, "xla") - ref).max() > 0.05  # the gate matters here


def _gpt():
    model = GPT(vocab_size=50, depth=2, dim=32, head_dim=8)
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)  # no zero layers
    return model, params


def _llama():
    spec = LlamaSpec(model_type="llama", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, vocab_size=50, rms_norm_eps=1e-6, rope_theta=10000.0,
                     rope_type="default")
    model = Llama(spec=spec)
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))["params"]
    return model, params


BASES = {"gpt": _gpt, "llama": _llama}


def _wc(seed: int, heads: int):
    """Entries [1, T, D] at increasing positions, some of them gists (not the first)."""
    rng = np.random.default_rng(seed)
    gist = rng.random(T) < 0.4
    gist[0] = False
    pos = np.cumsum(np.where(gist, 4, 1)) - 1
    emb = jnp.asarray(rng.normal(size=(1, T, 32)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, heads)), jnp.float32)
    return emb, jnp.asarray(pos)[None], jnp.asarray(gist)[None], bias


@pytest.mark.parametrize("base", BASES)
def test_a_closed_gate_leaves_the_gists_out(base):
    """With the gate shut (bias −10⁹) every raw entry's output is exactly that of the working
    context with its gist entries removed (positions kept: RoPE is by position)."""
    model, params = BASES[base]()
    emb, pos, gist, _ = _wc(3, 4)
    closed = jnp.full((2, 4), -1e9)
    out = model.apply({"params": params}, embeddings=emb, positions=pos, gist_gate=(closed, gist))
    raw = ~np.asarray(gist[0])
    alone = model.apply({"params": params}, embeddings=emb[:, raw], positions=pos[:, raw])
    np.testing.assert_allclose(np.asarray(out)[:, raw], alone, atol=1e-5)
    open_ = model.apply({"params": params}, embeddings=emb, positions=pos)
    assert np.abs(np.asarray(open_)[:, raw] - np.asarray(alone)).max() > 1e-3  # gists are read without it


@pytest.mark.parametrize("base", BASES)
def test_kv_cache_with_the_gate_equals_the_full_forward(base):
    """Prefill 5 entries, then extend by the other 4 one at a time (gists among both), each
    under the gate: every hidden state equals the gated full forward."""
    model, params = BASES[base]()
    emb, pos, gist, bias = _wc(4, 4)
    full = model.apply({"params": params}, embeddings=emb, positions=pos, gist_gate=(bias, gist))
    hidden, cache = kc.prefill(model, params, emb[:, :5], pos[:, :5], None, (bias, gist[:, :5]))
    np.testing.assert_allclose(hidden, full[:, :5], atol=1e-5)
    big = kc.empty_cache(model, 1, T)
    cache = kc.KVCache(*(tuple(b.at[:, :, :5].set(c) for b, c in zip(bs, cs)) for bs, cs in zip(big, cache)))
    slots_gist = jnp.zeros((1, T), bool).at[:, :5].set(gist[:, :5])
    for i in range(5, T):
        old = (jnp.arange(T) < i)[None, None]
        h, cache = kc.extend(model, params, emb[:, i : i + 1], pos[:, i : i + 1], None, cache, old,
                             jnp.ones((1, 1, 1), bool), jnp.array([[i]]), (bias, slots_gist, gist[:, i : i + 1]))
        slots_gist = slots_gist.at[:, i].set(gist[:, i])
        np.testing.assert_allclose(h[:, 0], full[:, i], atol=1e-5)


def test_a_megacontext_step_trains_the_gate(tmp_path):
    """The read gate is a GistNet param: zero at init (bias = read_gate_init), it gets a
    gradient from the variants' loss, and read_bias is None without it."""
    from mcjax.train.mc_step import MCForward, initial_stats, mc_loss
    from mcjax.train.setup import build_parts

    raw = tiny_config(tmp_path, dataset={"block_size": 8, "horizon": 8}, gistnet={"kind": "mean", "read_gate": True,
                      "read_gate_init": -2.0}, megacontext={"enabled": True, "recent_tokens": 16, "train_wc_length": 0.5,
                      "curriculum_start": 0.5, "num_random_variants": 2})
    cfg = config_from_dict(raw)
    parts = build_parts(cfg)
    params = parts.fresh().params
    assert params["gistnet"]["read_gate"].shape == (2, 2)  # depth 2, 64 / 32 heads
    np.testing.assert_allclose(read_bias(params["gistnet"], -2.0), -2.0)
    fw = MCForward(parts.model, cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 300)
    layouts = jnp.asarray(np.array([[[0] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 1, 0, 0]]] * 2, np.int8))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params)  # no zero layers
    loss = jax.jit(lambda p: mc_loss(fw, p, tokens, layouts, initial_stats(), 64, jax.random.key(0))[0])
    opened = np.abs(np.asarray(jax.grad(loss)(params)["gistnet"]["read_gate"])).max()
    assert opened > 1e-4
    shut = dict(params, gistnet=dict(params["gistnet"], read_gate=jnp.full((2, 2), -1e9)))
    assert np.abs(np.asarray(jax.grad(loss)(shut)["gistnet"]["read_gate"])).max() < 1e-6 * opened  # nothing reads gists


def test_the_gate_scale_multiplies_the_learned_offset_in_training_and_runtime(tmp_path):
    """gistnet.read_gate_scale: bias = read_gate_init + scale × offset, the same in training's
    forward (`MCForward.gist_gate`) and the runtime engine; a scale ≤ 0 is one clear error."""
    from mcjax.errors import ConfigError
    from mcjax.megacontext.layout import WorkingContext
    from mcjax.runtime.mc import MCRuntime
    from mcjax.train.mc_step import MCForward
    from mcjax.train.setup import build_parts

    gist = {"kind": "mean", "read_gate": True, "read_gate_init": -2.0, "read_gate_scale": 4.0}
    mc = {"enabled": True, "recent_tokens": 16, "train_wc_length": 0.5, "curriculum_start": 0.5}
    cfg = config_from_dict(tiny_config(tmp_path, dataset={"block_size": 8, "horizon": 8}, gistnet=gist, megacontext=mc))
    parts = build_parts(cfg)
    params = parts.fresh().params
    offset = jnp.asarray([[0.25, -0.5], [0.0, 1.0]], jnp.float32)
    params = dict(params, gistnet=dict(params["gistnet"], read_gate=offset))
    want = np.array([[-1.0, -4.0], [-2.0, 2.0]], np.float32)
    np.testing.assert_allclose(read_bias(params["gistnet"], -2.0, 4.0), want)
    wc = WorkingContext(*(jnp.zeros((1, 4)) for _ in WorkingContext._fields))._replace(lod=jnp.asarray([[0, 1, 1, 0]]))
    bias, is_gist = MCForward(parts.model, cfg).gist_gate(params, wc)
    np.testing.assert_allclose(bias, want)
    assert np.asarray(is_gist).tolist() == [[False, True, True, False]]
    np.testing.assert_allclose(MCRuntime(parts.model, cfg)._read_bias(params), want)
    with pytest.raises(ConfigError, match=r"gistnet.read_gate_scale: must be > 0 .*got 0.0$"):
        config_from_dict(tiny_config(tmp_path, dataset={"block_size": 8, "horizon": 8},
                                     gistnet=dict(gist, read_gate_scale=0.0), megacontext=mc))
