"""A pretrained Llama-family base model (Llama 2/3.x, SmolLM 1-3, Qwen2/2.5) as a Flax module
over an explicit param pytree, with LoRA adapters.

It has the GPT's interface (`gpt.py`): `embed`, `head`, and `__call__` over token ids or input
embeddings with per-entry positions and spans (Gaussian RoPE), returning final hidden states;
the head and cross-entropy live in `xent.py` (no softcap). It also has the per-layer pieces the
KV cache composes (`kv_cache.py`), so prefill and decode compute exactly what `__call__` does.

Architecture (as HF `transformers` computes it): h = embed[tokens]; each layer
h += o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h)))); h += down(silu(gate(n2(h))) · up(n2(h)));
final norm. RMSNorm with weights (reduced in f32, the weight applied in the input dtype),
grouped-query attention (N query heads over K key/value heads), RoPE of the checkpoint's theta
and scaling (`rope.rope_frequencies_of`), on every layer or not on SmolLM3's NoPE layers,
optional biases (Qwen2's q/k/v), tied or untied head.

Params (D = hidden, F = intermediate, L = layers, V = vocab; HF's [out, in] Linear weights are
stored [in, out]), the frozen base:
  embed [V, D]; blocks/{q [L, D, N·H], k, v [L, D, K·H], o [L, N·H, D], gate, up [L, D, F],
  down [L, F, D], attn_norm, mlp_norm [L, D], <proj>_bias [L, out] where the checkpoint has
  them}; final_norm [D]; lm_head [D, V] (untied only).
LoRA (`LoraSpec`, trainable): lora/{<target>_a [L, in, r], <target>_b [L, r, out]} for each
target projection; b starts at zero, so a fresh adapter leaves the base unchanged. A target's
output gains (alpha / r) · dropout(x) @ a @ b.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.model.attention import causal_attention
from mcjax.model.gpt import split_layers
from mcjax.model.hf_config import PROJECTIONS, LlamaSpec
from mcjax.model.rope import apply_rope, rope_angles

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def proj_shapes(spec: LlamaSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one layer."""
    d, f, h = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * h, spec.num_kv_heads * h
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


_PROJ_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"), "o": ("heads", "embed"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
}


def has_bias(spec: LlamaSpec, name: str) -> bool:
    if name in ("q", "k", "v"):
        return spec.qkv_bias
    return spec.o_bias if name == "o" else spec.mlp_bias


def block_specs(spec: LlamaSpec) -> dict[str, tuple[tuple[int, ...], tuple, str]]:
    """name -> (shape, logical axes, init) of the stacked layer params."""
    layers, d = spec.num_layers, spec.hidden_size
    out = {}
    for name, (i, o) in proj_shapes(spec).items():
        out[name] = ((layers, i, o), ("layers",) + _PROJ_AXES[name], "normal")
        if has_bias(spec, name):
            out[f"{name}_bias"] = ((layers, o), ("layers", _PROJ_AXES[name][1]), "zeros")
    out["attn_norm"] = ((layers, d), ("layers", None), "ones")
    out["mlp_norm"] = ((layers, d), ("layers", None), "ones")
    return out


def lora_specs(spec: LlamaSpec, lora: LoraSpec) -> dict[str, tuple[tuple[int, ...], tuple, str]]:
    shapes, out = proj_shapes(spec), {}
    for name in lora.targets:
        i, o = shapes[name]
        out[f"{name}_a"] = ((spec.num_layers, i, lora.rank), ("layers", _PROJ_AXES[name][0], None), "fan_in")
        out[f"{name}_b"] = ((spec.num_layers, lora.rank, o), ("layers", None, _PROJ_AXES[name][1]), "zeros")
    return out


def _init(kind: str, fan_in: int):
    if kind == "normal":
        return nn.initializers.normal(0.02)
    if kind == "fan_in":
        return nn.initializers.normal(fan_in**-0.5)
    return nn.initializers.ones if kind == "ones" else nn.initializers.zeros


class ParamGroup(nn.Module):
    """Creates the params of `specs` ((name, shape, axes, init), ...) and returns them as a dict."""

    specs: tuple

    @nn.compact
    def __call__(self) -> dict[str, jnp.ndarray]:
        return {
            name: self.param(name, nn.with_logical_partitioning(_init(init, shape[-2] if len(shape) > 2 else 1), axes), shape, jnp.float32)
            for name, shape, axes, init in self.specs
        }


def _as_tuple(specs: dict) -> tuple:
    return tuple((name, shape, axes, init) for name, (shape, axes, init) in specs.items())


def rms_norm_weighted(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF's LlamaRMSNorm: normalise in f32, back to x.dtype, then times the weight."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * y


def _save_dots_policy():
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class Llama(nn.Module):
    spec: LlamaSpec
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # "xla" | "cudnn" | "splash" (model/attention.py)
    remat: str = "none"  # "none" | "save_dots" | "full"
    lora_spec: LoraSpec | None = None

    softcap = 0.0  # no logit softcap (xent.py: plain logits)

    # -- static shape facts, the GPT's names (kv_cache.py, GistNet sizing) --------------------
    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def depth(self) -> int:
        return self.spec.num_layers

    @property
    def dim(self) -> int:
        return self.spec.hidden_size

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def num_query_heads(self) -> int:
        return self.spec.num_heads

    @property
    def rope_base(self) -> float:
        return self.spec.rope_theta

    def setup(self):
        s = self.spec
        self.wte = self.param(
            "embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")), (s.vocab_size, s.hidden_size), jnp.float32
        )
        self.blocks = ParamGroup(_as_tuple(block_specs(s)))
        self.final_norm = self.param("final_norm", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (s.hidden_size,), jnp.float32)
        if not s.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")), (s.hidden_size, s.vocab_size), jnp.float32
            )
        if self.lora_spec is not None:
            self.lora = ParamGroup(_as_tuple(lora_specs(s, self.lora_spec)))

    def _params(self) -> dict:
        """This module's param tree, as `init` makes it (for the pure functions below)."""
        p = {"embed": self.wte, "blocks": self.blocks(), "final_norm": self.final_norm}
        if not self.spec.tie_word_embeddings:
            p["lm_head"] = self.lm_head
        if self.lora_spec is not None:
            p["lora"] = self.lora()
        return p

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens int [B, T] -> embeddings [B, T, D] in the compute dtype."""
        return self.embed_tokens({"embed": self.wte}, tokens)

    def head(self) -> jnp.ndarray:
        """The vocabulary head [D, V] in the compute dtype (the embedding's transpose when tied)."""
        return self.head_matrix(self._params())

    def __call__(
        self,
        tokens: jnp.ndarray | None = None,
        *,
        embeddings: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        spans: jnp.ndarray | None = None,
        dropout_key: jax.Array | None = None,
        gist_gate=None,
    ) -> jnp.ndarray:
        """Final normed hidden states [B, T, D]; the arguments are the GPT's (`GPT.__call__`).
        `dropout_key` turns on LoRA dropout (training); None: none. `gist_gate`: as the GPT's."""
        params = self._params()
        x = self.embed_tokens(params, tokens) if embeddings is None else embeddings.astype(self.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = self.rope(positions, spans)
        keys = None if gist_gate is None else gist_gate[1]
        for i, w in enumerate(self.layer_weights(params)):
            if gist_gate is not None:
                w = {**w, "gist_bias": gist_gate[0][i].astype(jnp.float32)}
            layer = functools.partial(self._layer, i, gist_keys=keys)
            if self.remat == "full":
                layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x = layer(x, w, cos, sin, key)
        return self.finish(params, x)

    def _layer(self, i: int, x, w, cos, sin, key=None, gist_keys=None):
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        attn_in = functools.partial(self.attn_in, i)
        attn_out_mlp = self.attn_out_mlp
        if self.remat == "save_dots":
            attn_in = jax.checkpoint(attn_in, policy=_save_dots_policy())
            attn_out_mlp = jax.checkpoint(attn_out_mlp, policy=_save_dots_policy())
        q, k, v = attn_in(x, w, cos, sin, keys[0])
        gate = (w["gist_bias"], gist_keys) if "gist_bias" in w else None
        y = causal_attention(q, k, v, self.attention, gate)
        return attn_out_mlp(x, y, w, keys[1])

    # -- pure functions of a param tree (no module binding): the KV cache composes them ------
    def embed_tokens(self, params, tokens: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(params["embed"], tokens, axis=0).astype(self.dtype)

    def head_matrix(self, params) -> jnp.ndarray:
        w = params["embed"].T if self.spec.tie_word_embeddings else params["lm_head"]
        return w.astype(self.dtype)

    def rope(self, positions, spans=None):
        """cos, sin [B, T, H/2] of each entry (Gaussian with spans), HF's sign convention."""
        cos, sin = rope_angles(positions, self.spec.head_dim, self.spec.rope_theta, spans, frequencies=rope_frequencies_of(self.spec))
        return cos, -sin  # rope.apply_rope rotates by −θ; HF's rotate_half by +θ

    def begin(self, emb: jnp.ndarray) -> jnp.ndarray:
        """Input entries [B, T, D] -> the residual stream (the raw embeddings)."""
        return emb.astype(self.dtype)

    def finish(self, params, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm_weighted(x, params["final_norm"], self.spec.rms_norm_eps)

    def layer_weights(self, params) -> list[dict[str, jnp.ndarray]]:
        """Per-layer dicts of the stacked block params (and `lora_<name>` adapters), compute dtype."""
        ws = {k: v.astype(self.dtype) for k, v in params["blocks"].items()}
        ws |= {f"lora_{k}": v.astype(self.dtype) for k, v in params.get("lora", {}).items()}
        return split_layers(ws, self.spec.num_layers)

    def _proj(self, h, w, name: str, key):
        y = h @ w[name]
        if f"{name}_bias" in w:
            y = y + w[f"{name}_bias"]
        if f"lora_{name}_a" in w:
            x = h
            lora = self.lora_spec
            if key is not None and lora.dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(key, PROJECTIONS.index(name)), 1.0 - lora.dropout, h.shape)
                x = jnp.where(keep, h / (1.0 - lora.dropout), 0).astype(h.dtype)
            y = y + (x @ w[f"lora_{name}_a"]) @ w[f"lora_{name}_b"] * jnp.asarray(lora.scale, h.dtype)
        return y

    def attn_in(self, i: int, x, w, cos, sin, key=None):
        """Layer i's pre-norm and q, k, v projections with RoPE (none on a NoPE layer).
        x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H]."""
        s = self.spec
        b, t, _ = x.shape
        h = rms_norm_weighted(x, w["attn_norm"], s.rms_norm_eps)
        if "qkv" in w:  # q | k | v in one matmul (kv_cache.fuse_projections)
            nq, nk = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q, k, v = jnp.split(self._proj(h, w, "qkv", key), [nq, nq + nk], axis=-1)
        else:
            q, k, v = (self._proj(h, w, name, key) for name in ("q", "k", "v"))
        q = q.reshape(b, t, s.num_heads, s.head_dim)
        k = k.reshape(b, t, s.num_kv_heads, s.head_dim)
        v = v.reshape(b, t, s.num_kv_heads, s.head_dim)
        if s.uses_rope(i):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attn_out_mlp(self, x, y, w, key=None):
        """Output projection + residual, then the pre-norm SwiGLU MLP + residual."""
        b, t, _ = x.shape
        x = x + self._proj(y.reshape(b, t, -1), w, "o", key)
        h = rms_norm_weighted(x, w["mlp_norm"], self.spec.rms_norm_eps)
        if "gate_up" in w:  # gate | up in one matmul (kv_cache.fuse_projections)
            gate, up = jnp.split(self._proj(h, w, "gate_up", key), 2, axis=-1)
        else:
            gate, up = self._proj(h, w, "gate", key), self._proj(h, w, "up", key)
        return x + self._proj(jax.nn.silu(gate) * up, w, "down", key)


def rope_frequencies_of(spec: LlamaSpec) -> jnp.ndarray:
    """ω [H/2] of the checkpoint's RoPE: base^(−2i/H), then its scaling ("linear": ÷ factor;
    "llama3": long wavelengths ÷ factor, short ones kept, a smooth blend between)."""
    h = spec.head_dim
    omega = 1.0 / (spec.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if spec.rope_type == "linear":
        return omega / spec.rope_factor
    if spec.rope_type == "llama3":
        old = spec.rope_original_max_positions
        low_wavelen = old / spec.rope_low_freq_factor
        high_wavelen = old / spec.rope_high_freq_factor
        wavelen = 2 * jnp.pi / omega
        scaled = jnp.where(wavelen > low_wavelen, omega / spec.rope_factor, omega)
        smooth = (old / wavelen - spec.rope_low_freq_factor) / (spec.rope_high_freq_factor - spec.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / spec.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)
    return omega


def merge_lora(model: Llama, params) -> dict:
    """The base params with every adapter folded into its projection (w += (alpha/r)·a@b), for
    inference: the same function, no extra matmuls per token. No adapters: the params as given."""
    if "lora" not in params:
        return params
    blocks = dict(params["blocks"])
    lora = params["lora"]
    for name in model.lora_spec.targets:
        delta = jnp.einsum("lir,lro->lio", lora[f"{name}_a"].astype(jnp.float32), lora[f"{name}_b"].astype(jnp.float32))
        blocks[name] = (blocks[name].astype(jnp.float32) + model.lora_spec.scale * delta).astype(blocks[name].dtype)
    return {k: v for k, v in params.items() if k != "lora"} | {"blocks": blocks}
