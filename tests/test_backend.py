"""Backend-dependent choices (mcjax/backend.py), each forced on CPU through MCJAX_BACKEND: the
compute dtype, the attention kernel (splash, the Pallas TPU kernel, run in Pallas' interpreter
and checked against XLA's attention), the loss path, the mesh defaults for TPU slices, and a
MegaContext run that takes the TPU branch of all of them end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_env, tiny_config, write_config
from mcjax.backend import backend
from mcjax.config import config_from_dict, mesh_shape
from mcjax.errors import ConfigError, UserError
from mcjax.model.attention import causal_attention
from mcjax.model.gpt import resolve
from mcjax.model.xent import _pallas_mode
from mcjax.train.sharding import slice_major_grid


@pytest.fixture
def forced(monkeypatch):
    def force(name: str) -> None:
        monkeypatch.setenv("MCJAX_BACKEND", name)

    return force


def test_backend_is_jax_default_unless_forced(forced, monkeypatch):
    monkeypatch.delenv("MCJAX_BACKEND", raising=False)
    assert backend() == jax.default_backend() == "cpu"
    forced("tpu")
    assert backend() == "tpu"
    forced("cuda")
    with pytest.raises(UserError, match="MCJAX_BACKEND='cuda': must be one of cpu, gpu, tpu"):
        backend()


@pytest.mark.parametrize("name, dtype, head_dim, want", [
    ("cpu", "auto", 128, (jnp.float32, "xla")),
    ("gpu", "auto", 64, (jnp.bfloat16, "cudnn")),
    ("gpu", "float32", 64, (jnp.float32, "xla")),  # cuDNN flash attention is bf16 only
    ("tpu", "auto", 128, (jnp.bfloat16, "splash")),
    ("tpu", "auto", 64, (jnp.bfloat16, "xla")),  # below the kernel's 128 lanes
    ("tpu", "auto", None, (jnp.bfloat16, "xla")),  # the encoders: no TPU kernel
])
def test_resolve_dtype_and_attention(forced, name, dtype, head_dim, want):
    forced(name)
    r = resolve(dtype, "auto", head_dim)
    assert (r.dtype, r.attention) == want
    assert resolve(dtype, "xla", head_dim).attention == "xla"  # an explicit kernel is kept


@pytest.mark.parametrize("name, want", [("gpu", "gpu"), ("tpu", ""), ("cpu", "")])
def test_loss_takes_the_pallas_gpu_pass_only_on_gpu(forced, name, want):
    forced(name)
    z = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
    assert _pallas_mode(z, 15.0, "auto") == want  # "" = XLA's pass


def _mesh_cfg(**mesh):
    return config_from_dict(tiny_config(Path("/tmp"), mesh=mesh,
                                        training={"batch_size": 16, "micro_batch_size": 16}))


@pytest.mark.parametrize("name, mesh, devices, slices, want", [
    ("tpu", {}, 1, 1, (1, 1, 1)),  # v5e-1
    ("tpu", {}, 4, 1, (1, 4, 1)),  # v4-8: 4 chips, fsdp over the slice
    ("tpu", {}, 8, 1, (1, 8, 1)),  # v5e-8
    ("tpu", {}, 16, 2, (2, 8, 1)),  # two v5e-8 slices: data over DCN
    ("tpu", {"data": 2}, 8, 1, (2, 4, 1)),  # data set: fsdp fills
    ("tpu", {"fsdp": 2}, 8, 1, (4, 2, 1)),  # fsdp set: data fills
    ("tpu", {"data": -1}, 8, 1, (8, 1, 1)),  # an explicit fill wins
    ("tpu", {"tensor": 2}, 8, 1, (1, 4, 2)),
    ("gpu", {}, 8, 1, (8, 1, 1)),  # GPU and CPU: data parallel
    ("cpu", {"data": 2}, 8, 1, (2, 4, 1)),
])
def test_mesh_defaults_per_backend(name, mesh, devices, slices, want):
    shape = mesh_shape(_mesh_cfg(**mesh), devices, name, slices)
    assert (shape["data"], shape["fsdp"], shape["tensor"]) == want


def test_mesh_auto_in_a_config_file_and_bad_values(tmp_path):
    from mcjax.config import load_config

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, mesh={"data": "auto", "fsdp": 2})))
    assert (cfg.mesh.data, cfg.mesh.fsdp) == ("auto", 2)
    with pytest.raises(ConfigError, match="mesh.fsdp: expected an integer or one of auto, got str .many."):
        load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, mesh={"fsdp": "many"})))
    with pytest.raises(ConfigError, match=r"mesh.data: must be ≥ 1, -1 \(fill\) or auto, got 0"):
        load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, mesh={"data": 0})))


def test_slices_are_contiguous_blocks_of_the_data_axis():
    devices = [SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, platform="cpu", device_kind="cpu")
               for i in range(8)]
    grid = slice_major_grid((4, 2, 1), devices, 2, "c.yaml")
    assert grid.shape == (4, 2, 1)
    assert [{d.slice_index for d in grid[i].flat} for i in range(4)] == [{0}, {0}, {1}, {1}]
    assert sorted(d.id for d in grid.flat) == list(range(8))
    with pytest.raises(ConfigError, match="mesh.data: 1 is not a multiple of the 2 TPU slices"):
        slice_major_grid((1, 8, 1), devices, 2, "c.yaml")


def _qkv(t: int, heads: int = 4, kv: int = 2, h: int = 64, b: int = 2):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (b, t, n, h), jnp.float32) for k, n in zip(keys, (heads, kv, kv))]


def test_splash_equals_xla_attention_with_gqa_and_its_gradients():
    q, k, v = _qkv(256)
    ref = causal_attention(q, k, v, "xla")
    out = jax.jit(lambda q, k, v: causal_attention(q, k, v, "splash"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    w = jax.random.normal(jax.random.key(1), ref.shape)

    def grads(kernel):
        return jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, kernel) * w), argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(jax.jit(lambda: grads("splash"))(), grads("xla")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_splash_falls_back_to_xla_off_its_block_grid():
    q, k, v = _qkv(96)  # not a multiple of 128
    np.testing.assert_array_equal(np.asarray(causal_attention(q, k, v, "splash")),
                                  np.asarray(causal_attention(q, k, v, "xla")))


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mcjax.model.attention import causal_attention
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = [jax.random.normal(key, (4, 128, n, 32)) for key, n in zip(keys, (4, 2, 2))]
sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
q, k, v = [jax.device_put(x, sh) for x in (q, k, v)]
with jax.set_mesh(mesh):
    f = jax.jit(lambda q, k, v: causal_attention(q, k, v, "splash"))
    text = f.lower(q, k, v).as_text()
    out = f(q, k, v)
ref = causal_attention(*[np.asarray(x) for x in (q, k, v)], "xla")
manual = "manual_computation" in text or "SPMDFullToShardShape" in text  # Shardy or GSPMD
print(json.dumps({"shard_map": manual and "tensor<1x128x2x32xf32>" in text,  # one shard of q
                  "err": float(np.abs(np.asarray(out) - np.asarray(ref)).max()), "devices": len(out.sharding.device_set)}))
"""


def test_splash_runs_per_shard_under_the_context_mesh():
    """8 devices (data 2 × fsdp 2 × tensor 2): the kernel runs inside shard_map on each shard."""
    res = subprocess.run([sys.executable, "-c", "import json\n" + _SHARDED], env=cli_env(8),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shard_map"] and got["devices"] == 8 and got["err"] < 2e-5, got


def test_a_megacontext_run_takes_the_tpu_branch_end_to_end(tmp_path):
    """`MCJAX_BACKEND=tpu mcjax train` on 8 CPU devices: the mesh goes to fsdp (one slice), the
    models compute in bf16, the base model's attention is splash (head width 128; the baseline
    WC of 128 entries runs the kernel per shard in Pallas' interpreter, the 64-entry variants
    XLA's attention) and the loss takes XLA's path. Two steps train to finite losses (the same
    run with base_model.attention=xla ended at the same loss, 5.4019, when this was written)."""
    raw = tiny_config(
        tmp_path,
        dataset={"context_tokens": 128, "max_source_bytes": 120_000},
        base_model={"depth": 1, "model_dim": 128, "head_dim": 128},
        gistnet={"layers": 1},
        lensnet={"layers": 1, "dim": 32},
        megacontext={"enabled": True, "recent_tokens": 32, "num_random_variants": 1,
                     "curriculum_start": 1.0, "train_wc_length": 0.5},
        training={"batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "eval_tokens": 0},
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    env = cli_env(8)
    env["MCJAX_BACKEND"] = "tpu"
    res = subprocess.run([sys.executable, "-m", "mcjax.cli", "train", "--config", str(cfg)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "8 device(s) {'data': 1, 'fsdp': 8, 'tensor': 1}" in res.stdout, res.stdout[-2000:]
    assert "for tpu (MCJAX_BACKEND): bfloat16, attention splash" in res.stdout, res.stdout[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "artifacts/runs/tiny/metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
