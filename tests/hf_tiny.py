"""Tiny random Hugging Face checkpoints of each supported family, written by the tests in the
HF layout (config.json, safetensors — sharded for one — and a tokenizer.json), with the
reference PyTorch model that wrote them (HF `transformers`, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from mcjax.data.corpus import read_documents
from mcjax.data.tokenizer import train_bpe

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
