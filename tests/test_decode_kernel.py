"""The decode step's attention: the Pallas split-K kernel (in Pallas' interpreter on CPU)
against XLA's `decode_attention` and a numpy softmax, the kernel choice per backend, and
both engines decoding the same tokens with either kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_runtime import R, _stream, fake_run

from mcjax.backend import ENV
from mcjax.errors import UserError
from mcjax.model import kv_cache as kc
from mcjax.model.decode_kernel import decode_attention_pallas
from mcjax.runtime import Engine, Sampling


def _numpy_attention(q, k, v, lengths, gate):
    """One query per stream and head over the first lengths[b] slots, in float64."""
    b, n, h = q.shape
    kv = k.shape[1]
    out = np.zeros((b, n, h))
    for i in range(b):
        for j in range(n):
            s = k[i, j // (n // kv), : lengths[i]] @ q[i, j] / np.sqrt(h)
            if gate is not None:
                s = s + np.where(gate[1][i, : lengths[i]], gate[0][j], 0.0)
            p = np.exp(s - s.max())
            out[i, j] = p @ v[i, j // (n // kv), : lengths[i]] / p.sum()
    return out


@pytest.mark.parametrize(
    "b,n,kv,w,gated",
    [(3, 9, 3, 512, True), (2, 4, 4, 256, False), (1, 16, 1, 128, True)],  # GQA, MHA, 16 heads on one
)
def test_the_kernel_equals_xla_and_a_numpy_softmax(b, n, kv, w, gated):
    """Lengths of one slot, mid-split, at a split's edge and the whole cache; gist slots
    under a per-head bias; block_k 64 so W splits into several splits of several blocks."""
    h = 32
    ks = jax.random.split(jax.random.key(b * 100 + w), 5)
    q = jax.random.normal(ks[0], (b, n, h))
    k = jax.random.normal(ks[1], (b, kv, w, h))
    v = jax.random.normal(ks[2], (b, kv, w, h))
    lengths = jnp.asarray([1, w // 2 + 3, w, 64][:b], jnp.int32)
    gate = (3.0 * jax.random.normal(ks[3], (n,)), jax.random.bernoulli(ks[4], 0.3, (b, w))) if gated else None
    got = np.asarray(decode_attention_pallas(q, k, v, lengths, gate, block_k=64, interpret=True))
    xla = np.asarray(kc.decode_attention(q, k, v, lengths, gate))
    ref = _numpy_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), np.asarray(lengths),
                           None if gate is None else tuple(np.asarray(x) for x in gate))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(xla, ref, atol=1e-5)
    assert not np.allclose(got[0], _numpy_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                                                    np.full(b, w), None)[0])  # lengths matter


def test_the_kernel_choice_per_backend(tmp_path, monkeypatch):
    gpt = fake_run(tmp_path).model.gpt  # 4 heads, 4 key/value heads
    assert kc.decode_kernel_for("xla", gpt, 1024) == "xla"
    assert kc.decode_kernel_for("pallas", gpt, 1024) == "pallas_interpret"  # CPU: the interpreter
    monkeypatch.setenv(ENV, "gpu")
    assert kc.decode_kernel_for("pallas", gpt, 1024) == "pallas"
    assert kc.decode_kernel_for("pallas", gpt, 64) == "pallas"  # one block of 64
    with pytest.raises(UserError, match=r"runtime.decode_kernel pallas takes .*: this base has 1, W_max is 1000"):
        kc.decode_kernel_for("pallas", gpt, 1000)


def test_the_gpt_s_fused_projections_compute_the_same_layers(tmp_path):
    """kv_cache.fuse_projections on the GPT: wq | wk | wv in one matmul (the engines' params);
    a prefill through them equals the model's forward."""
    run = fake_run(tmp_path)
    gpt, params = run.model.gpt, run.params["gpt"]
    fused = kc.fuse_projections(params)
    assert "wqkv" in fused["blocks"] and not {"wq", "wk", "wv"} & fused["blocks"].keys()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 40)))
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    hidden, _ = kc.prefill(gpt, fused, kc.embed(gpt, fused, ids), pos)
    np.testing.assert_allclose(hidden, gpt.apply({"params": params}, ids), atol=1e-5)


@pytest.mark.parametrize("kind", ["mc", "plain"])
def test_both_kernels_decode_the_same_tokens(tmp_path, kind):
    """Greedy generation past W_max (the MegaContext engine refocuses, the plain one's ring
    wraps) through the read gate: the same tokens and next-token logits with either kernel."""
    gate = {"read_gate": True, "read_gate_init": -1.0}
    out = {}
    for kernel in ("xla", "pallas"):
        eng = Engine(fake_run(tmp_path / kernel, gistnet=gate, runtime={"decode_kernel": kernel}), kind=kind)
        eng.ingest([_stream(100, 3)])
        toks = np.concatenate(list(eng.generate(3 * R, Sampling(temperature=0.0))), axis=1)
        out[kernel] = toks, eng.next_logits()
    assert out["xla"][0].tolist() == out["pallas"][0].tolist()
    np.testing.assert_allclose(out["xla"][1], out["pallas"][1], atol=2e-4)
