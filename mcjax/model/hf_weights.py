"""A pretrained base's weights — a local HF checkpoint's safetensors, or a GGUF file's tensors —
read straight into a sharded param pytree.

A tensor source holds the base's tensors under HF names: `SafetensorsDir(directory)` indexes
every tensor of `model.safetensors` or of the shards that `model.safetensors.index.json` names,
reading only the JSON headers (each tensor is then a read-only memory map);
`gguf_base.GGUFTensors(file)` maps a GGUF's tensors onto the same names, dequantized. Both have
`tensors` (by name), `check(name, shape)`, `array(name)` and `release()`. `load_llama(...)` builds
each param of the Llama tree (`llama.py`) with `jax.make_array_from_callback`: every device's
shard is sliced from the source's arrays (HF's [out, in] weights transposed, the layers stacked)
and cast on the host, so no device ever holds a full copy of a sharded weight and no process
reads more than its devices need; the source releases what it dequantized after each param.

`content_hash(path)`: the reference a checkpoint keeps instead of a copy of the base — sha256
over config.json and the weight files of a directory, or of a .gguf file's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from mcjax.errors import UserError
from mcjax.model import gguf_base
from mcjax.model.hf_config import LlamaSpec
from mcjax.model.llama import block_specs

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX = "model.safetensors.index.json"


class SafetensorsDir:
    """Every tensor of a directory's safetensors files, by name: (file, dtype, shape, offset)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.directory}: no *.safetensors weights (nor {INDEX})")
        self.files = [self.directory / f for f in files]
        self.tensors: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        for path in self.files:
            self._read_header(path)
        self._maps: dict[str, np.ndarray] = {}

    def _read_header(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"{path}: weight file not found (named by {INDEX})")
        try:
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            self.tensors[name] = (path, np.dtype(dtype), tuple(info["shape"]), start + info["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def _entry(self, name: str):
        if name not in self.tensors:
            raise UserError(f"{self.directory}: tensor {name} not found in {', '.join(p.name for p in self.files)}")
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        """A read-only memory map of tensor `name`."""
        if name not in self._maps:
            path, dtype, shape, offset = self._entry(name)
            self._maps[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape) if shape and 0 not in shape else np.zeros(shape, dtype)
        return self._maps[name]

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != shape:
            path = self._entry(name)[0]
            raise UserError(f"{path}: tensor {name} is [{', '.join(map(str, got))}], the config.json needs [{', '.join(map(str, shape))}]")

    def release(self) -> None:
        """Nothing to drop: the arrays are memory maps."""


def tensor_source(path: str | Path) -> SafetensorsDir | gguf_base.GGUFTensors:
    """The tensors of a base: a .gguf file's, else a directory's safetensors."""
    return gguf_base.GGUFTensors(path) if gguf_base.is_gguf(path) else SafetensorsDir(path)


# Our stacked name -> (HF tensor of layer {i}, transposed): HF Linear weights are [out, in].
_LAYER_NAMES = {
    "q": ("self_attn.q_proj.weight", True), "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True), "o": ("self_attn.o_proj.weight", True),
    "gate": ("mlp.gate_proj.weight", True), "up": ("mlp.up_proj.weight", True), "down": ("mlp.down_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False), "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False), "o_bias": ("self_attn.o_proj.bias", False),
    "gate_bias": ("mlp.gate_proj.bias", False), "up_bias": ("mlp.up_proj.bias", False), "down_bias": ("mlp.down_proj.bias", False),
    "attn_norm": ("input_layernorm.weight", False), "mlp_norm": ("post_attention_layernorm.weight", False),
}


def _prefix(st) -> str:
    """"model." (LlamaForCausalLM) or "" (a bare LlamaModel's tensors)."""
    return "model." if "model.embed_tokens.weight" in st.tensors else ""


def _reader(st, spec: LlamaSpec, dtype) -> dict:
    """Our param path -> (full shape, fn(index) -> the np shard at that index, in `dtype`), read
    from the tensor source `st` (SafetensorsDir or GGUFTensors) after checking every shape."""
    pre = _prefix(st)
    out = {}

    def plain(name, transpose, shape):
        st.check(name, shape[::-1] if transpose else shape)

        def read(index):
            a = st.array(name)
            a = a.T if transpose else a
            return np.asarray(a[index], dtype)

        return read

    d, v = spec.hidden_size, spec.vocab_size
    out[("embed",)] = ((v, d), plain(f"{pre}embed_tokens.weight", False, (v, d)))
    out[("final_norm",)] = ((d,), plain(f"{pre}norm.weight", False, (d,)))
    if not spec.tie_word_embeddings:
        out[("lm_head",)] = ((d, v), plain("lm_head.weight", True, (d, v)))
    for name, (shape, _, _) in block_specs(spec).items():
        hf, transpose = _LAYER_NAMES[name]
        names = [f"{pre}layers.{i}.{hf}" for i in range(spec.num_layers)]
        for n in names:
            st.check(n, shape[1:][::-1] if transpose else shape[1:])

        def read(index, names=names, transpose=transpose):
            layers = range(len(names))[index[0]]
            parts = []
            for i in layers:
                a = st.array(names[i])
                a = a.T if transpose else a
                parts.append(np.asarray(a[index[1:]], dtype))
            return np.stack(parts)

        out[("blocks", name)] = (shape, read)
    return out


def load_llama(directory: str | Path, spec: LlamaSpec, shardings: dict, dtype) -> dict:
    """The frozen Llama params of `directory` (or of a .gguf file) ({"embed", "blocks",
    "final_norm", "lm_head"?}), each array placed in its NamedSharding of `shardings` (the same
    tree) in `dtype`.

    UserError naming the file and tensor for a missing tensor, a shape that differs from what
    config.json (the GGUF's metadata) describes, or a GGUF tensor type mcjax cannot dequantize."""
    st = tensor_source(directory)
    readers = _reader(st, spec, np.dtype(dtype))
    out: dict = {}
    for path, (shape, read) in readers.items():
        node, sh = out, shardings
        for key in path[:-1]:
            node = node.setdefault(key, {})
            sh = sh[key]
        node[path[-1]] = jax.make_array_from_callback(shape, sh[path[-1]], read)
        st.release()
    return out


def content_hash(directory: str | Path) -> str:
    """sha256 (hex) over config.json and every weight file of `directory`, in name order; of a
    .gguf file, the sha256 of its bytes (what `sha256sum` prints)."""
    directory = Path(directory).expanduser()
    h = hashlib.sha256()
    if gguf_base.is_gguf(directory):
        with directory.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()
    paths = [directory / "config.json"] + SafetensorsDir(directory).files
    if (directory / INDEX).is_file():
        paths.append(directory / INDEX)
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
