"""Pretrained Llama-family bases: the Flax model against HF `transformers` (the reference
PyTorch implementation, CPU), safetensors loading, LoRA, the KV cache, configs and errors,
and MegaContext training on a frozen base with its checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference implementation: the README's install (pip install -e '.[dev]')")
pytest.importorskip("transformers")

from conftest import cli_env, tiny_config  # noqa: E402
from hf_tiny import FAMILIES, VOCAB, write_checkpoint  # noqa: E402
from hf_tiny import flax_logits as _logits  # noqa: E402
from hf_tiny import load_flax as _load  # noqa: E402
from mcjax.config import config_from_dict  # noqa: E402
from mcjax.errors import ConfigError, UserError  # noqa: E402
from mcjax.model import kv_cache as kc  # noqa: E402
from mcjax.model.hf_config import read_spec  # noqa: E402
from mcjax.model.llama import Llama, LoraSpec, merge_lora  # noqa: E402

TOL = 1e-4  # f32 on both sides: max |Δlogit| (logits are O(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (directory, reference torch model)}, written once for the module."""
    root = tmp_path_factory.mktemp("hf")
    texts = ["To be, or not to be, that is the question. " * 40]
    return {f: (root / f, write_checkpoint(root / f, f, texts=texts)) for f in FAMILIES}


def _reference(torch_model, ids):
    with torch.no_grad():
        return torch_model(torch.as_tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 80))  # longer than the llama3 scaling's original 64


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(checkpoints, family):
    """GQA (4 query heads over 2 kv heads), tied (llama, smollm3) and untied (qwen2) heads,
    Llama-3 rope scaling, q/k/v biases (qwen2), NoPE layers (smollm3), a sharded checkpoint (qwen2)."""
    directory, ref_model = checkpoints[family]
    model, params = _load(directory)
    ref = _reference(ref_model, IDS)
    got = _logits(model, params, IDS)
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits
    assert np.abs(got - ref).max() < TOL
    if family == "qwen2":
        assert len(list(directory.glob("model-*.safetensors"))) > 1 and "lm_head" in params


def test_spans_of_one_and_explicit_positions_are_plain_rope(checkpoints):
    directory, ref_model = checkpoints["llama"]
    model, params = _load(directory)
    pos = jnp.broadcast_to(jnp.arange(80), (2, 80))
    base = _logits(model, params, IDS)
    same = _logits(model, params, IDS, positions=pos, spans=jnp.ones((2, 80), jnp.int32))
    np.testing.assert_allclose(same, base, atol=1e-5)


def test_lora_at_init_changes_nothing_and_merges_exactly(checkpoints):
    directory, ref_model = checkpoints["llama"]
    lora = LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "down"))
    model, params = _load(directory, lora)
    ref = _reference(ref_model, IDS)
    assert np.abs(_logits(model, params, IDS) - ref).max() < TOL
    # a trained adapter: logits move, and folding it into the weights gives the same function
    params["lora"] = {k: v + 0.05 * jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(params["lora"].items())}
    moved = _logits(model, params, IDS)
    assert np.abs(moved - ref).max() > 0.01
    plain = Llama(model.spec, dtype=jnp.float32)
    merged = merge_lora(model, params)
    assert "lora" not in merged
    np.testing.assert_allclose(_logits(plain, merged, IDS), moved, atol=1e-4)


def test_kv_cache_prefill_and_decode_equal_the_full_forward(checkpoints):
    """Grouped-query heads through the cache: prefill S entries, then extend one at a time."""
    directory, _ = checkpoints["smollm3"]
    model, params = _load(directory)
    ids = jnp.asarray(IDS[:, :24])
    full = model.apply({"params": params}, ids)
    emb = kc.embed(model, params, ids)
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    hidden, cache = kc.prefill(model, params, emb[:, :16], pos[:, :16])
    np.testing.assert_allclose(hidden, full[:, :16], atol=1e-5)
    big = kc.empty_cache(model, 2, 24)
    cache = kc.KVCache(*(tuple(b.at[:, :, :16].set(c) for b, c in zip(bs, cs)) for bs, cs in zip(big, cache)))
    for i in range(16, 24):
        old = jnp.broadcast_to(jnp.arange(24) < i, (2, 1, 24))
        h, cache = kc.extend(model, params, emb[:, i : i + 1], pos[:, i : i + 1], None, cache, old,
                             jnp.ones((2, 1, 1), bool), jnp.full((2, 1), i))
        np.testing.assert_allclose(h[:, 0], full[:, i], atol=1e-5)
    assert cache.k[0].shape == (2, 2, 24, 16)  # K = 2 kv heads, not N = 4


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_compute_the_same_layers(checkpoints, family):
    """kv_cache.fuse_projections (the engines' params): q | k | v and gate | up in one matmul
    each, qwen2's q/k/v biases with them — a prefill through the fused params equals the
    model's forward, and the separate matrices are gone."""
    directory, _ = checkpoints[family]
    model, params = _load(directory)
    fused = kc.fuse_projections(params)
    blocks = fused["blocks"]
    assert {"qkv", "gate_up"} <= blocks.keys() and not {"q", "k", "v", "gate", "up"} & blocks.keys()
    assert ("qkv_bias" in blocks) == (family == "qwen2")
    ids = jnp.asarray(IDS[:, :24])
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    hidden, _ = kc.prefill(model, fused, kc.embed(model, fused, ids), pos)
    np.testing.assert_allclose(hidden, model.apply({"params": params}, ids), atol=1e-5)


def test_sharded_load_equals_the_single_device_load(checkpoints):
    directory, _ = checkpoints["qwen2"]
    if jax.device_count() < 4:  # run this test again in a process with 8 CPU devices
        name = f"{__file__}::test_sharded_load_equals_the_single_device_load"
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
                             env=cli_env(8), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
        return
    _, one = _load(directory)
    _, four = _load(directory, mesh_cfg={"data": 1, "fsdp": 2, "tensor": 2})
    assert len(four["blocks"]["gate"].sharding.device_set) == 4
    assert four["blocks"]["gate"].addressable_shards[0].data.shape == (3, 32, 48)  # embed/fsdp, mlp/tensor
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- errors


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_unsupported_or_broken_checkpoints_are_one_line(checkpoints, tmp_path):
    directory, _ = checkpoints["llama"]
    with pytest.raises(UserError, match=r"config.json: model_type 'gpt2' is not supported \(supported: llama, qwen2, smollm3\)"):
        read_spec(_edit_config(directory, tmp_path / "a", model_type="gpt2"))
    with pytest.raises(UserError, match=r"config.json: rope type 'yarn' is not supported"):
        read_spec(_edit_config(directory, tmp_path / "b", rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UserError, match=r"num_attention_heads \(4\) must be a positive multiple of num_key_value_heads \(3\)"):
        read_spec(_edit_config(directory, tmp_path / "c", num_key_value_heads=3))
    with pytest.raises(UserError, match=r"/nowhere/config.json: not found"):
        read_spec(tmp_path / "nowhere")
    wide = _edit_config(directory, tmp_path / "d", intermediate_size=128)  # the weights are 96 wide
    with pytest.raises(UserError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight is \[96, 64\], the config.json needs \[128, 64\]"):
        _load(wide)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(UserError, match=r"/e: no \*.safetensors weights"):
        _load(empty)


def test_a_missing_tensor_names_it(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, _ = checkpoints["llama"]
    broken = _edit_config(directory, tmp_path / "m")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.post_attention_layernorm.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(UserError, match=r"tensor model.layers.2.post_attention_layernorm.weight not found in model.safetensors"):
        _load(broken)


def _pretrained_cfg(root: Path, directory: Path, **sections) -> dict:
    data = root / "data"
    raw = tiny_config(
        root,
        base_model={"name": "tiny-llama", "path": str(directory)},
        lora={"rank": 4, "alpha": 8.0, "lr": 0.01},
        megacontext={"enabled": True, "recent_tokens": 32, "num_random_variants": 1, "curriculum_start": 0.5, "train_wc_length": 0.5},
        gistnet={"layers": 1},
        lensnet={"layers": 1, "dim": 32},
        training={"batch_size": 8, "micro_batch_size": 8, "max_steps": 3, "eval_tokens": 256, "controller_lr": 0.01},
    )
    raw["dataset"].pop("vocab_size")
    raw["dataset"]["context_tokens"] = 128  # 4 blocks: variants at 50 % compress 2 of them
    raw["dataset"]["splits"] = {
        "train": {"source": "builtin:shakespeare", "output_path": str(data / "train.arrow")},
        "val": {"source": "builtin:shakespeare", "output_path": str(data / "val.arrow")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_config_takes_the_shape_from_config_json(checkpoints, tmp_path):
    directory, _ = checkpoints["qwen2"]
    cfg = config_from_dict(_pretrained_cfg(tmp_path, directory))
    m = cfg.base_model
    assert (m.depth, cfg.model_dim, m.head_dim, m.softcap, cfg.dataset.vocab_size) == (3, 64, 16, 0.0, VOCAB)
    assert cfg.dataset.tokenizer == str(directory / "tokenizer.json") and cfg.pretrained
    with pytest.raises(ConfigError, match=r"base_model.path: .*/absent is not a directory"):
        config_from_dict(_pretrained_cfg(tmp_path, tmp_path / "absent"))
    raw = _pretrained_cfg(tmp_path, directory)
    raw["base_model"] = {"name": "HuggingFaceTB/SmolLM2-360M"}
    with pytest.raises(ConfigError, match=r"set base_model.path to a local Hugging Face model directory or a .gguf file; there are no downloads"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"lora.targets: must list distinct projections of q, k, v, o, gate, up, down, got \['q', 'x'\]"):
        config_from_dict(_pretrained_cfg(tmp_path, directory, lora={"targets": ["q", "x"]}))
    with pytest.raises(ConfigError, match=r"lora.rank: LoRA adapts a pretrained base"):
        config_from_dict(tiny_config(tmp_path, lora={"rank": 4}))
    with pytest.raises(ConfigError, match=r"nothing to train"):
        config_from_dict(_pretrained_cfg(tmp_path, directory, lora={"rank": 0}, megacontext={"enabled": False}))


@pytest.mark.parametrize("name", ["smollm2_360m_mc", "llama32_1b_mc", "qwen25_05b_mc", "smollm3_3b_mc", "tiny_llama_mc_cpu"])
def test_shipped_pretrained_configs(checkpoints, name):
    from mcjax.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    with pytest.raises(ConfigError, match=r"base_model.path: .* is not a directory"):
        load_config(path)
    family = {"qwen25_05b_mc": "qwen2", "smollm3_3b_mc": "smollm3"}.get(name, "llama")
    cfg = load_config(path, [f"base_model.path={checkpoints[family][0]}", "gistnet.width=32"])
    assert cfg.pretrained and cfg.model_dim == 64 and cfg.megacontext.enabled and cfg.lora.rank > 0


def test_tokenizer_start_token_of_a_pretrained_tokenizer(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from mcjax.data.tokenizer import Tokenizer

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(tmp_path / "tokenizer.json").bos_id == 0  # <|endoftext|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|im_start|>"}}))
    assert Tokenizer.load(tmp_path / "tokenizer.json").bos_id == 1


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """A 3-step MegaContext run on the frozen tiny Llama with LoRA (shared by the tests below)."""
    from mcjax.train.loop import train

    root = tmp_path_factory.mktemp("llama_mc")
    raw = _pretrained_cfg(root, checkpoints["llama"][0])
    card = train(config_from_dict(raw), log=lambda *_: None)
    return root, raw, card


def test_training_moves_only_the_trainable_params(trained, checkpoints):
    from mcjax.restore import load_run
    from safetensors.numpy import load_file

    root, raw, card = trained
    assert np.isfinite(card["train/loss"]) and np.isfinite(card["val/mc_loss"])
    run = load_run(root / "artifacts/runs/tiny")
    p = run.params
    assert np.abs(np.asarray(p["gpt"]["lora"]["q_b"])).max() > 0  # zero at init: LoRA trained
    file = load_file(checkpoints["llama"][0] / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(p["gpt"]["blocks"]["q"][1]), file["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["gpt"]["embed"]), file["model.embed_tokens.weight"])
    # the gists start at the base's embedding scale, and the scale trains
    rms = float(np.sqrt(np.mean(np.square(file["model.embed_tokens.weight"]))))
    assert float(p["gistnet"]["scale"]) == pytest.approx(rms, rel=0.5) and float(p["gistnet"]["scale"]) != pytest.approx(rms, rel=1e-6)


def test_checkpoint_references_the_base_instead_of_copying_it(trained, checkpoints):
    from mcjax.checkpoint import Checkpointer
    from mcjax.model.hf_weights import content_hash

    root, raw, _ = trained
    ckpt = Checkpointer(root / "artifacts/checkpoints/tiny", keep=2, async_save=False)
    try:
        shapes = ckpt.param_shapes(3)
    finally:
        ckpt.close()
    meta = json.loads((root / "artifacts/checkpoints/tiny/3/meta/metadata").read_text())
    assert any("lora" in k for k in shapes) and not any("'embed'" in k or "'blocks'" in k for k in shapes)
    assert meta["base"] == {"path": str(checkpoints["llama"][0].absolute()), "sha256": content_hash(checkpoints["llama"][0])}


def test_resume_on_the_same_base_then_on_another_one(trained, tmp_path):
    from mcjax.restore import load_run
    from mcjax.train.loop import train

    root, raw, _ = trained
    before = load_run(root / "artifacts/runs/tiny").params
    raw = json.loads(json.dumps(raw))
    raw["training"]["max_steps"] = 4
    logs = []
    train(config_from_dict(raw), resume=True, log=logs.append)
    assert any("resumed 'tiny' from step 3" in str(line) for line in logs)
    after = load_run(root / "artifacts/runs/tiny").params
    assert not np.array_equal(np.asarray(before["gpt"]["lora"]["v_b"]), np.asarray(after["gpt"]["lora"]["v_b"]))
    np.testing.assert_array_equal(np.asarray(before["gpt"]["blocks"]["v"]), np.asarray(after["gpt"]["blocks"]["v"]))

    other = tmp_path / "other"
    write_checkpoint(other, "llama", seed=1, texts=["To be, or not to be, that is the question. " * 40])
    raw["base_model"]["path"] = str(other)
    raw["training"]["max_steps"] = 5
    with pytest.raises(UserError, match=r"checkpoints/tiny/4: trained on .*/llama \(sha256 [0-9a-f]{12}…\), but base_model.path .*/other has sha256"):
        train(config_from_dict(raw), resume=True, log=lambda *_: None)


def test_the_runtime_engine_scores_like_the_trained_model(trained):
    """The engine folds the adapters into the base once and decodes through the KV cache:
    teacher-forced log-probabilities equal the trained (unmerged) model's full forward."""
    from mcjax.restore import load_run
    from mcjax.runtime.engine import Engine

    root, _, _ = trained
    run = load_run(root / "artifacts/runs/tiny")
    engine = Engine(run, kind="plain", batch=1)
    ids = np.asarray(engine.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 2))[:48]
    assert ids.size == 48
    engine.ingest([ids[:16]])
    logp, _ = engine.score(ids[None, 16:48])
    gpt = run.model.gpt
    h = gpt.apply({"params": run.params["gpt"]}, jnp.asarray(ids[None, :47]))
    ref = jax.nn.log_softmax(h @ gpt.apply({"params": run.params["gpt"]}, method="head"), axis=-1)
    want = np.take_along_axis(np.asarray(ref[0, 15:47]), ids[16:48, None], axis=-1)[:, 0]
    np.testing.assert_allclose(logp[0], want, atol=1e-4)
