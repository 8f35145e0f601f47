"""Tiny random Hugging Face checkpoints of each supported family, written by the tests in the
HF layout (config.json, safetensors — sharded for one — and a tokenizer.json), with the
reference PyTorch model that wrote them (HF `transformers`, CPU); and the Flax model of a
base (a directory or a .gguf) loaded onto a mesh of the local devices."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T

from conftest import tiny_config
from mcjax.config import config_from_dict
from mcjax.data.corpus import read_documents
from mcjax.data.tokenizer import train_bpe
from mcjax.model.hf_config import read_spec
from mcjax.model.hf_weights import load_llama
from mcjax.model.llama import Llama, LoraSpec
from mcjax.train.sharding import logical_shardings, make_mesh

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=None, bos_token_id=0, eos_token_id=0,
)
FAMILIES = ("llama", "qwen2", "smollm3")


def hf_config(family: str):
    """llama: GQA, tied embeddings, Llama-3 rope scaling; qwen2: q/k/v biases, untied; smollm3:
    NoPE every second layer, tied."""
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return T.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=rope)
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if family == "smollm3":
        return T.SmolLM3Config(**COMMON, no_rope_layer_interval=2, tie_word_embeddings=True)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0):
    """The reference model with random weights (norm weights and biases perturbed too, so every
    tensor matters), in f32, eval mode."""
    torch.manual_seed(seed)
    cls = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "smollm3": T.SmolLM3ForCausalLM}[family]
    model = cls(hf_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_checkpoint(directory: Path, family: str, seed: int = 0, *, texts=None):
    """Write the tiny model (qwen2: sharded into several files with an index) and a BPE
    tokenizer.json into `directory`; returns the reference model."""
    model = hf_model(family, seed)
    model.save_pretrained(directory, max_shard_size="100KB" if family == "qwen2" else "1GB")
    if texts is None:
        texts = [d[1] for d in read_documents("builtin:shakespeare", key="source", where="tests", max_bytes=300_000)]
    train_bpe(texts, VOCAB).save(Path(directory) / "tokenizer.json")
    return model


def load_flax(path: Path, lora: LoraSpec | None = None, mesh_cfg: dict | None = None):
    """(model, params) of the base at `path` (a directory or a .gguf) on a mesh of the local
    devices (f32)."""
    spec = read_spec(path)
    model = Llama(spec, dtype=jnp.float32, lora_spec=lora)
    cfg = config_from_dict(tiny_config(path.parent / "cfg", mesh=mesh_cfg or {"data": 1}))
    mesh = make_mesh(cfg, jax.devices()[: np.prod([v for v in (mesh_cfg or {"data": 1}).values()])])
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    sh = logical_shardings(boxed, mesh)
    params = load_llama(path, spec, {k: v for k, v in sh.items() if k != "lora"}, jnp.float32)
    if lora is not None:
        params["lora"] = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))["params"]["lora"]
    return model, params


def flax_logits(model, params, ids, **kw) -> np.ndarray:
    """f32 [B, S, V] logits of token ids [B, S]."""
    h = model.apply({"params": params}, jnp.asarray(ids), **kw)
    return np.asarray(h @ model.apply({"params": params}, method="head"))
