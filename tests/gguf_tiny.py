"""Small GGUF files written by the tests with `gguf.GGUFWriter`: a tiny HF model (hf_tiny.py)
laid out the way llama.cpp's convert_hf_to_gguf.py writes it (names, q/k rows permuted for the
llama architecture, Llama 3 RoPE scaling as rope_freqs.weight, the vocabulary as metadata), and
single tensors of random valid quantized blocks for the dequantization tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

# Byte offsets of the f16 scales in one block of each quantized type (ggml's block_* structs);
# every other byte may be anything. Random scale bytes could be inf/NaN, so they are set apart.
SCALES = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}

QUANTIZABLE = (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # gguf.quants.quantize's


def random_blocks(kind: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, cols / block * bytes]: random blocks of `kind` (its f16 scales finite where
    SCALES knows them)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in SCALES.get(kind, ()):
        raw[:, at : at + 2] = rng.uniform(-2, 2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def write_tensor_file(path: Path, name: str, kind: Q, rows: int = 4, cols: int = 512, seed: int = 0) -> np.ndarray:
    """A GGUF (architecture llama, no other metadata) holding one [rows, cols] tensor `name` of
    ggml type `kind`; returns the bytes (or values, for F32/F16/BF16) written."""
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(seed)
    if kind == Q.F32:
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        w.add_tensor(name, data)
    elif kind == Q.F16:
        data = rng.standard_normal((rows, cols)).astype(np.float16)
        w.add_tensor(name, data)
    elif kind == Q.BF16:
        data = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        data = data.reshape(rows, 2 * cols)
        w.add_tensor(name, data, raw_dtype=kind)
    else:
        data = random_blocks(kind, rows, cols, seed)
        w.add_tensor(name, data, raw_dtype=kind)
    _finish(w)
    return data


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _permute(w: np.ndarray, n: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order for ggml's interleaved RoPE (llama architecture)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_model(path: Path, model, tokenizer_json: Path, *, arch: str, kinds: dict[str, Q] | None = None,
                tokens: list[str] | None = None, add_bos: bool = False, bos: str = "<|bos|>", pre: str = "gpt2") -> None:
    """The tiny HF `model` (hf_tiny.hf_model: llama or qwen2) as a GGUF of `arch`, every tensor
    F32 unless `kinds` maps its GGUF name to another type (quantized with gguf.quants where it
    can, else random blocks), and the
    BPE of `tokenizer_json` as its vocabulary (`tokens` replaces the token list, e.g. shuffled),
    padded to the model's vocab_size as llama.cpp pads it ("[PAD{i}]")."""
    c = model.config
    n, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(d)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(d // n)
    w.add_vocab_size(c.vocab_size)

    spec = json.loads(Path(tokenizer_json).read_text())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    listed = tokens or [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    listed += [f"[PAD{i}]" for i in range(len(listed), c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(listed)
    w.add_token_types([3 if t in special else 5 if t.startswith("[PAD") else 1 for t in listed])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(listed.index(bos))
    w.add_add_bos_token(add_bos)

    kinds = kinds or {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"
            if arch == "llama" and rest[-2] in ("q_proj", "k_proj"):
                a = _permute(a, n if rest[-2] == "q_proj" else kv)
        kind = kinds.get(gname, Q.F32)
        if kind == Q.F32:
            w.add_tensor(gname, a)
        elif kind in QUANTIZABLE:
            w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:  # a type gguf-py cannot quantize: random blocks
            w.add_tensor(gname, random_blocks(kind, *a.shape), raw_dtype=kind)
    if c.rope_parameters.get("rope_type") == "llama3":  # as convert_hf_to_gguf writes it: ω / ω_scaled
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](c, torch.device("cpu"))
        h = d // n
        base = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, h, 2, dtype=torch.float32) / h))
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    _finish(w)
