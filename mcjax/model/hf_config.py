"""The architecture of a local Hugging Face Llama-family checkpoint, read from its config.json.

`read_spec(directory)` -> `LlamaSpec`: every number the Flax model (`llama.py`) needs, checked
once here so the model can assume them. A `.gguf` path is read from the file's metadata instead
(`gguf_base.read_gguf_spec`). Supported `model_type`s: llama (Llama 2, 3.x,
SmolLM, SmolLM2), qwen2 (Qwen2/2.5: biases on q, k, v) and smollm3 (NoPE every few layers).
RoPE: "default", "linear" and "llama3" scaling. Anything else is one UserError line naming
the file and the key. Nothing is downloaded: the directory is the user's own copy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mcjax.errors import UserError

SUPPORTED = ("llama", "qwen2", "smollm3")
ROPE_TYPES = ("default", "linear", "llama3")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # of one layer, the names LoRA targets


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    model_type: str
    hidden_size: int  # D
    intermediate_size: int  # F, the SwiGLU width
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K (grouped-query attention: N a multiple of K)
    head_dim: int  # H
    vocab_size: int  # V, rows of the embedding
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_layers: tuple[bool, ...] = ()  # per layer: RoPE (True) or NoPE; () = RoPE everywhere

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]


def read_spec(directory: str | Path) -> LlamaSpec:
    """The LlamaSpec of `directory`/config.json (or of a .gguf file's metadata); UserError (one
    line) if it is missing, unreadable or describes an architecture this project does not implement."""
    from mcjax.model import gguf_base

    if gguf_base.is_gguf(directory):
        return gguf_base.read_gguf_spec(directory)
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (base_model.path must be a local Hugging Face model directory)")
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise UserError(f"{path}: expected a JSON object")

    def get(key, kind, default=None):
        value = c.get(key, default)
        if value is None:
            raise UserError(f"{path}: missing {key}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{path}: {key}: expected an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: {key}: expected a number, got {value!r}")
        return kind(value)

    mtype = c.get("model_type")
    if mtype not in SUPPORTED:
        raise UserError(f"{path}: model_type {mtype!r} is not supported (supported: {', '.join(SUPPORTED)})")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{path}: hidden_act {act!r} is not supported (the SwiGLU MLP uses silu)")
    if c.get("use_sliding_window"):
        raise UserError(f"{path}: use_sliding_window is true: sliding-window attention is not supported")
    d, n = get("hidden_size", int), get("num_attention_heads", int)
    kv = get("num_key_value_heads", int, n)
    head_dim = get("head_dim", int, d // n if n else 0)
    if n < 1 or kv < 1 or n % kv:
        raise UserError(f"{path}: num_attention_heads ({n}) must be a positive multiple of num_key_value_heads ({kv})")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"{path}: head_dim {head_dim} must be an even number ≥ 2")
    layers = get("num_hidden_layers", int)

    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{path}: rope_scaling: expected an object, got {rope!r}")
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise UserError(f"{path}: rope type {rtype!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    extra = {}
    if rtype in ("linear", "llama3"):
        if "factor" not in rope:
            raise UserError(f"{path}: rope scaling {rtype!r} needs a factor")
        extra["rope_factor"] = float(rope["factor"])
    if rtype == "llama3":
        extra.update(
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(
                rope.get("original_max_position_embeddings", c.get("max_position_embeddings", 8192))
            ),
        )

    rope_layers: tuple[bool, ...] = ()
    if mtype == "smollm3":
        flags = c.get("no_rope_layers")
        if flags is None:
            every = get("no_rope_layer_interval", int, 4)
            flags = [int((i + 1) % every != 0) for i in range(layers)]
        if len(flags) < layers:
            raise UserError(f"{path}: no_rope_layers has {len(flags)} entries for {layers} layers")
        rope_layers = tuple(bool(f) for f in flags[:layers])
    bias = bool(c.get("attention_bias", False))
    return LlamaSpec(
        model_type=mtype,
        hidden_size=d,
        intermediate_size=get("intermediate_size", int),
        num_layers=layers,
        num_heads=n,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=get("vocab_size", int),
        rms_norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_type=rtype,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bias or mtype == "qwen2",
        o_bias=bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
        rope_layers=rope_layers,
        **extra,
    )
