"""A GGUF file (llama.cpp's single-file format) as a pretrained base: its `LlamaSpec` from the
metadata, and its tensors under the HF names that `hf_weights._reader` loads.

`open_gguf(path)` -> `gguf.GGUFReader` (memory-mapped, cached per file version): one UserError
line naming the file when it is missing, truncated or not GGUF at all.

`read_gguf_spec(path)` -> LlamaSpec from `general.architecture` ("llama": Llama 2/3.x,
SmolLM/SmolLM2; "qwen2": q/k/v biases) and the `{arch}.*` keys: block_count, embedding_length,
feed_forward_length, attention.head_count(_kv), attention.key_length or rope.dimension_count
(head_dim), attention.layer_norm_rms_epsilon, rope.freq_base, rope.scaling.type/factor
("none" or "linear"); vocab_size or the token list's length. Tied embeddings when there is no
`output.weight`; biases where the file has them. Llama-3 RoPE scaling is written by llama.cpp
as a tensor of per-frequency divisors, `rope_freqs.weight` [H/2]: it is read as "llama3"
scaling when it equals that rule for some (factor, original context) — with HF's default low
and high frequency factors 1 and 4 — and is an error otherwise.

`GGUFTensors(path)`: the tensor source `hf_weights._reader` reads (the same interface as
`SafetensorsDir`): `tensors` keyed by HF names ("embed_tokens.weight",
"layers.{i}.self_attn.q_proj.weight", ...), `check(name, shape)`, `array(name)` and `release()`.
A tensor is dequantized (`gguf.quants.dequantize`, to f32, in HF's [out, in] layout) once, on its
first `array`, and kept until `release()`; so every device's shard of a param is sliced from one
dequantized copy. llama.cpp's converter permutes the rows of the llama architecture's q and k
projections (and biases) for its interleaved RoPE: `w.reshape(n, 2, rows/n/2, cols)
.swapaxes(1, 2)` with n = heads (q) or kv heads (k); `array` undoes it, so the weights are HF's.
Qwen2 files are written with NEOX (split-half) RoPE and are not permuted.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from mcjax.errors import UserError
from mcjax.model.hf_config import LlamaSpec

SUFFIX = ".gguf"
ARCHITECTURES = ("llama", "qwen2")
# ggml tensor types mcjax dequantizes (each checked against an independent implementation in
# tests/test_gguf.py); the others are refused by name.
DEQUANTIZED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> HF name (without the "model." prefix `_reader` adds for a full checkpoint)
_GLOBAL = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def is_gguf(path: str | Path) -> bool:
    """Does `path` name a GGUF file (by its suffix)?"""
    return Path(path).suffix.lower() == SUFFIX


def open_gguf(path: str | Path):
    """The GGUFReader of `path` (memory-mapped; the same reader while the file is unchanged).
    UserError, one line naming the file, when it is missing, truncated or not GGUF."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    stat = path.stat()
    return _open(str(path.absolute()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError (bad magic, short arrays), OSError, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid GGUF file, or truncated ({type(e).__name__}: {first})") from None


class _Meta:
    """Typed access to a GGUF's metadata keys; UserError naming the file and key."""

    def __init__(self, path: Path, reader):
        self.path, self.fields = path, reader.fields

    def get(self, key: str, kind=None, default=None):
        field = self.fields.get(key)
        if field is None:
            if default is None:
                raise UserError(f"{self.path}: GGUF metadata has no {key}")
            return default
        value = field.contents()
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{self.path}: GGUF metadata {key}: expected an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{self.path}: GGUF metadata {key}: expected a number, got {value!r}")
        return kind(value) if kind else value


def metadata(path: str | Path) -> _Meta:
    """The metadata of the GGUF at `path` (`.get(key, kind, default)`)."""
    path = Path(path).expanduser()
    return _Meta(path, open_gguf(path))


def architecture(path: str | Path) -> str:
    """general.architecture, checked against ARCHITECTURES (UserError naming what is supported)."""
    meta = metadata(path)
    arch = meta.get("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{meta.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return arch


def read_gguf_spec(path: str | Path) -> LlamaSpec:
    """The LlamaSpec of a GGUF file (module doc); UserError (one line) naming the file and key
    when it is unreadable or describes an architecture this project does not implement."""
    path = Path(path).expanduser()
    arch = architecture(path)
    meta, tensors = metadata(path), GGUFTensors(path)
    for t in tensors.tensors.values():  # refused at config time, before prep or a run writes anything
        tensors.check_type(t)
    a = f"{arch}."
    d, n = meta.get(a + "embedding_length", int), meta.get(a + "attention.head_count", int)
    kv = meta.get(a + "attention.head_count_kv", int, n)
    if n < 1 or kv < 1 or n % kv:
        raise UserError(f"{path}: {a}attention.head_count ({n}) must be a positive multiple of head_count_kv ({kv})")
    head_dim = meta.get(a + "attention.key_length", int, d // n)
    rotary = meta.get(a + "rope.dimension_count", int, head_dim)
    if rotary != head_dim or meta.get(a + "attention.value_length", int, head_dim) != head_dim:
        raise UserError(f"{path}: {a}rope.dimension_count {rotary} and value_length must equal the head width {head_dim} (partial RoPE is not supported)")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"{path}: head width {head_dim} must be an even number ≥ 2")
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    vocab = meta.get(a + "vocab_size", int, len(tokens.data) if tokens is not None else tensors.shape("embed_tokens.weight")[0])
    theta = meta.get(a + "rope.freq_base", float, 10000.0)
    spec = LlamaSpec(
        model_type=arch,
        hidden_size=d,
        intermediate_size=meta.get(a + "feed_forward_length", int),
        num_layers=meta.get(a + "block_count", int),
        num_heads=n,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=meta.get(a + "attention.layer_norm_rms_epsilon", float),
        rope_theta=theta,
        rope_type="default",
        tie_word_embeddings="lm_head.weight" not in tensors.tensors,
        qkv_bias=arch == "qwen2" or "layers.0.self_attn.q_proj.bias" in tensors.tensors,
        o_bias="layers.0.self_attn.o_proj.bias" in tensors.tensors,
        mlp_bias="layers.0.mlp.gate_proj.bias" in tensors.tensors,
    )
    return _with_rope_scaling(spec, meta, tensors)


def _with_rope_scaling(spec: LlamaSpec, meta: _Meta, tensors: GGUFTensors) -> LlamaSpec:
    """`spec` with the file's RoPE scaling: rope.scaling.type "linear" (÷ factor), or Llama 3's
    read from rope_freqs.weight (module doc)."""
    a = f"{spec.model_type}."
    kind = meta.get(a + "rope.scaling.type", str, "none")
    if kind not in ("none", "linear"):
        raise UserError(f"{meta.path}: {a}rope.scaling.type {kind!r} is not supported (supported: none, linear, and Llama 3's rope_freqs.weight)")
    if kind == "linear":
        spec = dataclasses.replace(spec, rope_type="linear", rope_factor=meta.get(a + "rope.scaling.factor", float))
    if "rope_freqs.weight" not in tensors.tensors:
        return spec
    divisors = tensors.array("rope_freqs.weight").astype(np.float64)
    tensors.release()
    if np.allclose(divisors, 1.0):
        return spec
    if kind != "none" or divisors.shape != (spec.head_dim // 2,):
        raise UserError(f"{meta.path}: rope_freqs.weight {list(divisors.shape)} with rope.scaling.type {kind!r}: not Llama 3 RoPE scaling")
    factor = float(divisors.max())
    # a divisor strictly between 1 and the factor is on the smooth ramp: r = 1 / ((1 - s)/f + s),
    # s = (original / wavelength - 1) / (4 - 1) with HF's default low/high frequency factors 1, 4
    h = spec.head_dim
    omega = spec.rope_theta ** (-np.arange(0, h, 2) / h)
    ramp = np.flatnonzero((divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4)))
    original = meta.get(a + "rope.scaling.original_context_length", int, 8192)
    if len(ramp):
        i = ramp[0]
        s = (1 / divisors[i] - 1 / factor) / (1 - 1 / factor)
        original = int(round(2 * np.pi / omega[i] * (1 + 3 * s)))
    llama3 = dataclasses.replace(spec, rope_type="llama3", rope_factor=factor, rope_original_max_positions=original)
    from mcjax.model.llama import rope_frequencies_of

    if not np.allclose(omega / divisors, np.asarray(rope_frequencies_of(llama3)), rtol=1e-4, atol=0):
        raise UserError(
            f"{meta.path}: rope_freqs.weight is not Llama 3 RoPE scaling (nearest: factor {factor:g}, "
            f"original context {original}, low/high frequency factors 1 and 4)"
        )
    return llama3


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor (None for one the Llama tree never reads)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER:
        return f"layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL:
        return f"{_GLOBAL[parts[0]]}.{parts[1]}"
    return gguf_name if gguf_name == "rope_freqs.weight" else None


def gguf_name(hf: str) -> str:
    """The GGUF name of an HF tensor name (the inverse of `hf_name`, for messages)."""
    stem, _, kind = hf.rpartition(".")
    parts = stem.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3:
        inner = {h: g for g, h in _LAYER.items()}.get(parts[2])
        return f"blk.{parts[1]}.{inner}.{kind}" if inner else hf
    outer = {h: g for g, h in _GLOBAL.items()}.get(stem)
    return f"{outer}.{kind}" if outer else hf


class GGUFTensors:
    """Every tensor of a GGUF file that the Llama tree reads, by HF name (module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        reader = open_gguf(self.path)
        self.meta = _Meta(self.path, reader)
        self.arch = self.meta.get("general.architecture", str)
        self.tensors = {name: t for t in reader.tensors if (name := hf_name(t.name)) is not None}
        self._cache: dict[str, np.ndarray] = {}

    def _entry(self, name: str):
        if name not in self.tensors:
            raise UserError(f"{self.path}: tensor {gguf_name(name)} not found")
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """[out, in] of a weight (ggml lists its dimensions innermost first)."""
        return tuple(int(x) for x in reversed(self._entry(name).shape))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """UserError naming the GGUF tensor when it is missing, of a type mcjax cannot dequantize
        or of another shape than the metadata implies."""
        t = self._entry(name)
        self.check_type(t)
        got = self.shape(name)
        if got != tuple(shape):
            raise UserError(
                f"{self.path}: tensor {t.name} is [{', '.join(map(str, got))}], the metadata needs [{', '.join(map(str, shape))}]"
            )

    def check_type(self, t) -> None:
        """UserError naming a tensor (a ReaderTensor) of a type mcjax cannot dequantize."""
        if t.tensor_type.name not in DEQUANTIZED:
            raise UserError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which mcjax cannot dequantize "
                f"(supported: {', '.join(DEQUANTIZED)})"
            )

    def array(self, name: str) -> np.ndarray:
        """Tensor `name`, f32 in HF's layout: dequantized on first use, kept until `release`."""
        if name not in self._cache:
            from gguf.quants import dequantize

            t = self._entry(name)
            a = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
            self._cache[name] = self._unpermute(name, a)
        return self._cache[name]

    def _unpermute(self, name: str, a: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's q/k row permutation (llama architecture only; module doc)."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            return a
        n = self.meta.get("llama.attention.head_count", int)
        if ".k_proj." in name:
            n = self.meta.get("llama.attention.head_count_kv", int, n)
        rows = a.shape[0]
        return np.ascontiguousarray(a.reshape(n, rows // n // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))

    def release(self) -> None:
        """Drop the dequantized copies (after a param is built from them)."""
        self._cache.clear()
