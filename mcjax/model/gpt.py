"""The base model: a nanochat-style GPT as a Flax linen module over an explicit param pytree.

Rotary embeddings from per-entry positions, QK-norm, parameter-free RMSNorm, relu² MLP,
untied embedding and head, no biases. Params of the layers are stacked on a leading
"layers" axis; the layers themselves are unrolled in the program by default (faster:
see `Blocks`) or a `scan` (`scan_layers=True`: compile time flat in depth). Params are
f32; compute runs in `dtype` (bf16 on accelerators). The head and its softcapped
cross-entropy live in `xent.py`, so the model returns final hidden states.

Params (D = model_dim, N·H = D, V = vocab, L = depth):
  wte [V, D]; blocks/{wq, wk, wv} [L, D, D]; blocks/wo [L, D, D];
  blocks/w_fc [L, D, 4D]; blocks/w_proj [L, 4D, D]; lm_head [D, V].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.backend import backend
from mcjax.model.attention import causal_attention
from mcjax.model.rope import apply_rope, rope_angles

Dtype = Any


def rms_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Parameter-free RMSNorm over the last axis, reduced in f32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def fan_in_init(fan_in: int, fan_out: int):
    """N(0, σ) with σ = fan_in^-½ · min(1, (fan_out/fan_in)^½) (nanochat's linear init)."""
    std = fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
    return nn.initializers.normal(stddev=std)


def _save_dots_policy():
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _attn_in(x, wq, wk, wv, cos, sin, head_dim, wqkv=None):
    """Pre-norm, q/k/v projections, RoPE and QK-norm. x [B, T, D] -> q, k, v [B, T, N, H].
    With `wqkv` ([D, 3D]: wq | wk | wv, `kv_cache.fuse_projections`) one matmul instead of three."""
    b, t, d = x.shape
    h = rms_norm(x)
    q, k, v = jnp.split(h @ wqkv, 3, axis=-1) if wqkv is not None else (h @ wq, h @ wk, h @ wv)
    n = q.shape[-1] // head_dim
    q, k, v = (y.reshape(b, t, n, head_dim) for y in (q, k, v))
    return rms_norm(apply_rope(q, cos, sin)), rms_norm(apply_rope(k, cos, sin)), v


def _attn_out_mlp(x, y, wo, w_fc, w_proj):
    """Attention output projection + residual, then the pre-norm relu² MLP + residual."""
    b, t, d = x.shape
    x = x + y.reshape(b, t, -1) @ wo
    h = jnp.square(jax.nn.relu(rms_norm(x) @ w_fc))
    return x + h @ w_proj


def _layer(x, w, cos, sin, *, head_dim: int, attention: str, remat: str, kv: bool = False, gist_keys=None):
    """One pre-norm attention + relu² MLP layer. x [B, T, D]; w: the layer's matrices (compute dtype),
    and `gist_bias` [N] when gist keys [B, T] are gated (attention.causal_attention's gate).
    With `kv`, also returns the layer's keys and values [B, T, N, H] (a KV-cache prefill).

    remat "save_dots" checkpoints the two parts around attention (saving matmul outputs,
    recomputing norms, RoPE and relu² in the backward pass) while attention keeps its own
    residuals, so its forward kernel never runs twice.
    """
    attn_in = functools.partial(_attn_in, head_dim=head_dim)
    attn_out_mlp = _attn_out_mlp
    if remat == "save_dots":
        attn_in = jax.checkpoint(attn_in, policy=_save_dots_policy())
        attn_out_mlp = jax.checkpoint(attn_out_mlp, policy=_save_dots_policy())
    q, k, v = attn_in(x, w["wq"], w["wk"], w["wv"], cos, sin)
    gate = (w["gist_bias"], gist_keys) if "gist_bias" in w else None
    y = causal_attention(q, k, v, attention, gate)
    out = attn_out_mlp(x, y, w["wo"], w["w_fc"], w["w_proj"])
    return (out, k, v) if kv else out


def stacked(init):
    """An initializer of [L, *shape] that draws each layer's matrix independently."""

    def stacked_init(key, shape, dtype=jnp.float32):
        return jax.vmap(lambda k: init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))

    return stacked_init


def layer_params(module: nn.Module, dim: int, layers: int, dtype: Dtype) -> dict[str, jnp.ndarray]:
    """Create the matrices of `layers` transformer layers as params of `module`, stacked on a
    leading "layers" axis, and return them cast to `dtype` (one cast per stack).

    wq, wk, wv, wo [L, D, D]; w_fc [L, D, 4D]; w_proj [L, 4D, D]. The projections back into
    the residual stream (wo, w_proj) start at zero, so fresh layers are the identity.
    """
    d = dim
    specs = {
        "wq": ((d, d), ("embed", "heads"), False),
        "wk": ((d, d), ("embed", "heads"), False),
        "wv": ((d, d), ("embed", "heads"), False),
        "wo": ((d, d), ("heads", "embed"), True),
        "w_fc": ((d, 4 * d), ("embed", "mlp"), False),
        "w_proj": ((4 * d, d), ("mlp", "embed"), True),
    }
    ws = {}
    for name, (shape, axes, zero) in specs.items():
        init = nn.initializers.zeros if zero else stacked(fan_in_init(*shape))
        w = module.param(name, nn.with_logical_partitioning(init, ("layers",) + axes), (layers,) + shape, jnp.float32)
        ws[name] = w.astype(dtype)
    return ws


def split_layers(ws: dict[str, jnp.ndarray], layers: int) -> list[dict[str, jnp.ndarray]]:
    """Per-layer views of stacked matrices. Split (not index) the stacks: the backward pass
    then concatenates the layer grads once."""
    parts = {k: [v[0] for v in jnp.split(w, layers)] for k, w in ws.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(layers)]


class Blocks(nn.Module):
    """All layers. Params are stacked on a leading "layers" axis ([L, in, out]), one array per
    matrix kind, so the optimizer sees 6 arrays whatever the depth.

    scan_layers=False (default) unrolls the layers in the program: every activation the
    backward pass keeps is its own buffer. A `scan` instead stacks them into [L, ...] buffers,
    which XLA zero-fills and copies into: 169 → 148 ms per d12 step (batch 32) unrolled, H200.
    scan_layers=True keeps compile time flat in depth.
    """

    depth: int
    dim: int
    head_dim: int
    dtype: Dtype
    attention: str  # "xla" | "cudnn" | "splash" (model/attention.py)
    remat: str = "none"  # "none" | "save_dots" | "full"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, gist_gate=None):
        ws = layer_params(self, self.dim, self.depth, self.dtype)
        keys = None
        if gist_gate is not None:  # the per-layer biases travel with the layers' matrices
            ws, keys = {**ws, "gist_bias": gist_gate[0].astype(jnp.float32)}, gist_gate[1]
        layer = functools.partial(
            _layer,
            head_dim=self.head_dim,
            attention=self.attention,
            remat="save_dots" if self.remat == "save_dots" else "none",
            gist_keys=keys,
        )
        if self.remat == "full":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        if self.scan_layers:
            x, _ = jax.lax.scan(lambda x, w: (layer(x, w, cos, sin), None), x, ws)
            return x
        for w in split_layers(ws, self.depth):
            x = layer(x, w, cos, sin)
        return x


class GPT(nn.Module):
    vocab_size: int
    depth: int
    dim: int
    head_dim: int = 128
    softcap: float = 15.0
    rope_base: float = 10000.0
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    scan_layers: bool = False  # see Blocks

    def setup(self):
        self.wte = self.param(
            "wte",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.dim),
            jnp.float32,
        )
        self.blocks = Blocks(
            depth=self.depth,
            dim=self.dim,
            head_dim=self.head_dim,
            dtype=self.dtype,
            attention=self.attention,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        self.lm_head = self.param(
            "lm_head",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
            (self.dim, self.vocab_size),
            jnp.float32,
        )

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens int [B, T] -> embeddings [B, T, D] in the compute dtype."""
        return jnp.take(self.wte, tokens, axis=0).astype(self.dtype)

    def head(self) -> jnp.ndarray:
        """The vocabulary head [D, V] in the compute dtype (for `xent.token_nll`)."""
        return self.lm_head.astype(self.dtype)

    def __call__(
        self,
        tokens: jnp.ndarray | None = None,
        *,
        embeddings: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        spans: jnp.ndarray | None = None,
        gist_gate=None,
    ) -> jnp.ndarray:
        """Final normed hidden states [B, T, D].

        Give either `tokens` int [B, T] or `embeddings` [B, T, D] (e.g. a working context
        of raw tokens and gists). `positions` [B, T] (int or float) place each entry for
        RoPE; the default is 0..T-1. `spans` [B, T] (tokens each entry covers) switch to
        Gaussian RoPE (rope.py): gists sit at the centre of their tokens with the fast
        frequencies damped; single tokens are unchanged. Attention is causal over the
        given order. `gist_gate` (bias f32 [L, N], keys bool [B, T]): layer l's attention
        logits of head n toward the marked entries (gists) get bias[l, n] added.
        """
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rope_angles(positions, self.head_dim, self.rope_base, spans)
        x = self.blocks(rms_norm(x), cos, sin, gist_gate)
        return rms_norm(x)

    def logits(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Softcapped f32 logits [B, T, V] (for evaluation and sampling, not training)."""
        from mcjax.model.xent import softcap_logits

        return softcap_logits(self(tokens), self.head(), self.softcap)

    # -- pure functions of a param tree (no module binding): the KV cache composes them, and
    # the pretrained base (llama.py) has the same ones ------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def num_query_heads(self) -> int:
        return self.dim // self.head_dim

    def embed_tokens(self, params, tokens: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(params["wte"], tokens, axis=0).astype(self.dtype)

    def head_matrix(self, params) -> jnp.ndarray:
        return params["lm_head"].astype(self.dtype)

    def rope(self, positions, spans=None):
        return rope_angles(positions, self.head_dim, self.rope_base, spans)

    def begin(self, emb: jnp.ndarray) -> jnp.ndarray:
        """Input entries [B, T, D] -> the residual stream (normed embeddings)."""
        return rms_norm(emb.astype(self.dtype))

    def finish(self, params, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm(x)

    def layer_weights(self, params) -> list[dict[str, jnp.ndarray]]:
        ws = {name: w.astype(self.dtype) for name, w in params["blocks"].items()}
        return split_layers(ws, self.depth)

    def attn_in(self, i: int, x, w, cos, sin, key=None):
        return _attn_in(x, w.get("wq"), w.get("wk"), w.get("wv"), cos, sin, self.head_dim, w.get("wqkv"))

    def attn_out_mlp(self, x, y, w, key=None):
        return _attn_out_mlp(x, y, w["wo"], w["w_fc"], w["w_proj"])


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Backend-dependent choices made once from the config."""

    dtype: Dtype
    attention: str


def resolve(dtype: str, attention: str, head_dim: int | None = None) -> Resolved:
    """Backend choices (mcjax/backend.py): 'auto' dtype → bf16 on GPU/TPU, f32 on CPU; 'auto'
    attention → cuDNN on GPU in bf16; on TPU, splash for the base model's causal attention
    (`head_dim` given) when head_dim is a multiple of 128 (the kernel's lane width), else XLA.
    The encoders (no `head_dim`) have no TPU kernel."""
    b = backend()
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(dtype)
    if dt is None:
        dt = jnp.float32 if b == "cpu" else jnp.bfloat16
    att = attention
    if att == "auto":
        att = "xla"
        if b == "gpu" and dt == jnp.bfloat16:
            att = "cudnn"
        elif b == "tpu" and head_dim is not None and head_dim % 128 == 0:
            att = "splash"
    return Resolved(dt, att)


def build_gpt(cfg) -> GPT:
    """The GPT that `cfg` (an mcjax Config) describes, with backend choices resolved."""
    m = cfg.base_model
    r = resolve(m.dtype, m.attention, m.head_dim)
    return GPT(
        vocab_size=cfg.dataset.vocab_size,
        depth=m.depth,
        dim=cfg.model_dim,
        head_dim=m.head_dim,
        softcap=m.softcap,
        rope_base=m.rope_base,
        dtype=r.dtype,
        attention=r.attention,
        remat=m.remat,
    )
