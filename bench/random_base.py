"""Write a Llama-family checkpoint of a real model's shapes with random weights, in the HF
layout (config.json + model.safetensors, bf16), for benchmarks where no download is possible.

    python bench/random_base.py smollm2-360m /tmp/smollm2-360m
    python bench/random_base.py llama3.2-1b /tmp/llama3.2-1b
    python bench/random_base.py smollm3-3b /tmp/smollm3-3b

Weights are N(0, 0.02) (norm weights 1), so speed and memory are those of the real model;
the text it would write is noise. No torch needed: the safetensors file is written directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

SHAPES = {  # the public config.json values of these models
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49152,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm3-3b": dict(model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=128256,
                       rms_norm_eps=1e-6, rope_theta=5000000.0, tie_word_embeddings=True, max_position_embeddings=65536,
                       no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)], no_rope_layer_interval=4),
}


def tensors(c: dict):
    d, f, h = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * h, c["num_key_value_heads"] * h
    yield "model.embed_tokens.weight", (c["vocab_size"], d), "normal"
    yield "model.norm.weight", (d,), "ones"
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (q, d)), ("self_attn.k_proj", (kv, d)), ("self_attn.v_proj", (kv, d)),
                            ("self_attn.o_proj", (d, q)), ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))):
            yield p + name + ".weight", shape, "normal"
        yield p + "input_layernorm.weight", (d,), "ones"
        yield p + "post_attention_layernorm.weight", (d,), "ones"


def write(kind: str, out: Path) -> None:
    arch = "SmolLM3ForCausalLM" if SHAPES[kind]["model_type"] == "smollm3" else "LlamaForCausalLM"
    c = dict(SHAPES[kind], hidden_act="silu", architectures=[arch])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(c, indent=1))
    rng = np.random.default_rng(0)
    header, offset, specs = {}, 0, list(tensors(c))
    for name, shape, _ in specs:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with (out / "model.safetensors").open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape, init in specs:
            x = np.ones(shape, np.float32) if init == "ones" else rng.standard_normal(shape, np.float32) * 0.02
            f.write(x.astype(ml_dtypes.bfloat16).tobytes())
    print(f"{kind}: {offset / 1e9:.2f} GB of bf16 weights in {out}")


if __name__ == "__main__":
    write(sys.argv[1], Path(sys.argv[2]))
