"""GistNet: compresses a block of K embeddings into one gist vector of the same width.

`GistNet()(x [..., K, D], mask [..., K] | None) -> [..., D]`. Leading axes are flattened
internally, so the tree builds a whole level in one call (`[B*N1, K, D] -> [B*N1, D]`).
`mask` is True for real entries; False marks padding (the partly filled last block while
streaming). Padded entries are zeroed on the way in and never attended to or pooled, so
they change no output; a block with no real entry yields a zero gist.

Pipeline:
  kind "mean":        masked mean of the entries (pooling is ignored)   -> head -> rms_norm
  kind "transformer": rms_norm(x) -> `layers` pre-norm bidirectional blocks (RoPE at
                      positions 0..K-1 within the block, QK-norm, relu² MLP of width 4D,
                      padding keys masked) -> pooling                     -> head -> rms_norm
  pooling "mean":  masked mean of the block's outputs;
          "query": one learned query per head attends over the outputs (padding masked);
                   values are the outputs themselves, so the pool is a per-head convex
                   combination of them;
          "cls":   a learned CLS entry is appended (RoPE position K) and every entry may
                   attend to it; its output is the pooled vector.
  head "linear": y @ w (D -> D); "mlp": y + relu²(rms_norm(y) @ w_fc) @ w_proj (D -> 4D -> D).

  width G < D (a narrow transformer, gistnet.width): the encoder and pooling run at width G
  on rms_norm(x) @ down [D, G], and the pooled vector comes back through up [G, D] beside the
  mean-pooling baseline: y = masked_mean(rms_norm(x)) + pool(...) @ up -> head -> rms_norm.
  GistNet reads every one of the T input tokens while the base model reads only W_max
  entries per working context, so at T ≫ W_max its width sets the controller's cost: G = D/2
  quarters the encoder's FLOPs.

Design decisions:
  * The final parameter-free rms_norm puts gists on the unit-RMS scale of the normed token
    embeddings, so LOD2 GistNet inputs (LOD1 gists) look like LOD0 inputs (and the base
    model, which norms every working-context entry, sees comparable scales).
  * Initialisation makes every "mean"-pooled GistNet start as rms_norm(masked mean of its
    inputs): block output projections (wo, w_proj) and the mlp head's w_proj are zero (as in
    gpt.py), the linear head is the identity. A fresh GistNet is therefore the mean-pooling
    baseline, and the compressor learns deviations from it. Consequence: at init the
    matrices before a zero projection get zero gradient (as in nanochat); they move after
    the first update.

Params (f32, cast to `dtype` for compute; L = layers; D = N·H):
  encoder/{wq, wk, wv, wo} [L, D, D], encoder/w_fc [L, D, 4D], encoder/w_proj [L, 4D, D],
  cls [D] (pooling "cls"); pool/{query [D], wk [D, D]} (pooling "query");
  with width G < D, the encoder, cls and pool are at G (D -> G in the shapes above), plus
  down [D, G] and up [G, D] (zero at init, so a fresh narrow GistNet is mean pooling too);
  head/w [D, D] (head "linear") or head/{w_fc [D, 4D], w_proj [4D, D]} (head "mlp").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcjax.model.encoder import Encoder, masked_attention
from mcjax.model.gpt import fan_in_init, resolve, rms_norm
from mcjax.model.rope import rope_angles

Dtype = Any

KINDS = ("mean", "transformer")
POOLINGS = ("mean", "query", "cls")
HEADS = ("linear", "mlp")


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of the real entries, reduced in f32. x [B, K, D], mask bool [B, K] -> [B, D] (x.dtype).

    A row with no real entry gives zeros.
    """
    xf = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    count = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1).astype(jnp.float32)
    return (xf.sum(axis=-2) / count).astype(x.dtype)


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class QueryPool(nn.Module):
    """One learned query per head attends over the block's outputs (QK-norm, padding masked).

    x [B, K, D], mask bool [B, K] -> [B, D]: per head, a softmax-weighted mix of x's channels.
    """

    dim: int
    num_heads: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x, mask):
        b, k, d = x.shape
        n, hd = self.num_heads, d // self.num_heads
        query = self.param("query", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads",)), (d,), jnp.float32)
        wk = self.param("wk", nn.with_logical_partitioning(fan_in_init(d, d), ("embed", "heads")), (d, d), jnp.float32)
        q = jnp.broadcast_to(rms_norm(query.astype(self.dtype).reshape(1, 1, n, hd)), (b, 1, n, hd))
        keys = rms_norm((rms_norm(x) @ wk.astype(self.dtype)).reshape(b, k, n, hd))
        return masked_attention(q, keys, x.reshape(b, k, n, hd), mask).reshape(b, d)


class Head(nn.Module):
    """The gist head, D -> D. "linear": y @ w (identity at init); "mlp": residual relu² MLP
    y + relu²(rms_norm(y) @ w_fc) @ w_proj (w_proj zero at init). y [B, D] -> [B, D]."""

    dim: int
    kind: str
    dtype: Dtype

    @nn.compact
    def __call__(self, y):
        d = self.dim
        if self.kind == "linear":
            w = self.param("w", nn.with_logical_partitioning(_identity_init, ("embed", "heads")), (d, d), jnp.float32)
            return y @ w.astype(self.dtype)
        w_fc = self.param("w_fc", nn.with_logical_partitioning(fan_in_init(d, 4 * d), ("embed", "mlp")), (d, 4 * d), jnp.float32)
        w_proj = self.param("w_proj", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")), (4 * d, d), jnp.float32)
        return y + jnp.square(jax.nn.relu(rms_norm(y) @ w_fc.astype(self.dtype))) @ w_proj.astype(self.dtype)


class GistNet(nn.Module):
    """Block compressor: x [..., K, D], mask bool [..., K] (True = real entry; None = all real)
    -> gists [..., D] in `dtype`, unit RMS (zeros for a block with no real entry).

    See the module docstring for kinds, poolings, heads and the initialisation.
    """

    dim: int
    kind: str = "transformer"  # "mean" | "transformer"
    width: int = 0  # the transformer's width G (0 = dim); G < dim adds the down/up projections
    layers: int = 2
    pooling: str = "mean"  # "mean" | "query" | "cls"
    head: str = "mlp"  # "linear" | "mlp"
    num_heads: int = 1
    dtype: Dtype = jnp.float32
    rope_base: float = 10000.0
    attention: str = "xla"  # "xla" | "cudnn" (encoder.py); "cls" pooling always uses "xla"
    # A learned scalar `scale` [] on the unit-RMS gists, for a pretrained base that reads raw
    # embeddings (its token rows are far from unit RMS); training sets it to their RMS at init.
    scaled: bool = False
    # The base's read gate on gists: a learned offset `read_gate` [L, N] (zero at init) to the
    # attention-logit bias every layer and head of the base adds toward gist entries (`read_bias`);
    # () = no gate.
    read_gate: tuple[int, ...] = ()

    def check(self) -> None:
        """Raise ValueError for an invalid combination of fields (trace-time, host only)."""
        if self.kind not in KINDS:
            raise ValueError(f"GistNet kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"GistNet pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head not in HEADS:
            raise ValueError(f"GistNet head must be one of {HEADS}, got {self.head!r}")
        if self.kind == "transformer":
            if self.layers < 1:
                raise ValueError(f"GistNet transformer needs layers ≥ 1, got {self.layers}")
            w = self.inner_width
            if not 0 < w <= self.dim:
                raise ValueError(f"GistNet width must lie in [1, dim = {self.dim}] (0 = dim), got {self.width}")
            if self.num_heads < 1 or w % self.num_heads or (w // self.num_heads) % 2:
                raise ValueError(f"GistNet width {w} must split into {self.num_heads} heads of even width")

    @property
    def inner_width(self) -> int:
        """The transformer's width: `width`, or `dim` when it is 0."""
        return self.width or self.dim

    def _encode(self, x, mask):
        """rms_norm, a CLS entry appended at position K (pooling "cls"), then the encoder
        with RoPE at positions 0..K(-1) within the block, at the inner width G (after `down`
        when G < D). -> outputs [B, K', G], mask [B, K']."""
        rows, _, d = x.shape
        h, g = rms_norm(x), self.inner_width
        if g < d:
            down = self.param("down", nn.with_logical_partitioning(fan_in_init(d, g), ("embed", "mlp")), (d, g), jnp.float32)
            h, d = h @ down.astype(h.dtype), g
        if self.pooling == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)), (d,), jnp.float32)
            h = jnp.concatenate([h, jnp.broadcast_to(cls.astype(h.dtype), (rows, 1, d))], axis=1)
            mask = jnp.concatenate([mask, jnp.ones((rows, 1), bool)], axis=1)
        cos, sin = rope_angles(jnp.arange(h.shape[1])[None, :], d // self.num_heads, self.rope_base)
        # The CLS entry sits after any padding, so its mask is no prefix: cuDNN's key lengths cannot express it.
        attention = "xla" if self.pooling == "cls" else self.attention
        return Encoder(self.layers, self.num_heads, self.dtype, attention, name="encoder")(h, mask, cos, sin), mask

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        self.check()
        *lead, k, d = x.shape
        if d != self.dim:
            raise ValueError(f"GistNet of dim {self.dim} got entries of width {d}")
        rows = math.prod(lead)
        x = x.reshape(rows, k, d)
        mask = jnp.ones((rows, k), bool) if mask is None else jnp.broadcast_to(mask, (*lead, k)).reshape(rows, k).astype(bool)
        x = jnp.where(mask[..., None], x, 0).astype(self.dtype)  # garbage in padding never leaks
        if self.kind == "mean":
            y = masked_mean(x, mask)
        else:
            h, hmask = self._encode(x, mask)
            g = self.inner_width
            if self.pooling == "cls":
                y = h[:, -1]
            elif self.pooling == "query":
                y = QueryPool(g, self.num_heads, self.dtype, name="pool")(h, hmask)
            else:
                y = masked_mean(h, hmask)
            if g < d:  # back to D beside the mean-pooling baseline (up is zero at init)
                up = self.param("up", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")), (g, d), jnp.float32)
                y = masked_mean(rms_norm(x), mask) + y @ up.astype(y.dtype)
        y = rms_norm(Head(d, self.head, self.dtype, name="head")(y))
        if self.scaled:  # a pretrained base's raw embeddings are not unit-RMS: a learned scale
            y = y * self.param("scale", nn.initializers.ones, (), jnp.float32).astype(y.dtype)
        y = jnp.where(mask.any(axis=-1, keepdims=True), y, 0).astype(self.dtype)
        if self.read_gate:
            self.param("read_gate", nn.initializers.zeros, self.read_gate, jnp.float32)  # read by `read_bias`
        return y.reshape(*lead, d)


def read_bias(gistnet_params: dict, init: float, scale: float = 1.0) -> jnp.ndarray | None:
    """The base's attention-logit bias toward gist entries, f32 [L, N]: `init` (gistnet.read_gate_init,
    e.g. −8: a gist weighs e⁻⁸ of a raw key with the same logit, about as if its span were left
    out) plus `scale` (gistnet.read_gate_scale: how fast the optimizer can open it) times the
    learned offset; None when the GistNet has no read gate."""
    if "read_gate" not in gistnet_params:
        return None
    return init + scale * gistnet_params["read_gate"].astype(jnp.float32)


def build_gistnet(cfg) -> GistNet:
    """The GistNet that `cfg` (an mcjax Config) describes: gists of width model_dim, the
    transformer at gistnet.width (0 = model_dim), the base model's head width and RoPE base,
    the compute dtype resolved as for the GPT."""
    g, m = cfg.gistnet, cfg.base_model
    return GistNet(
        dim=cfg.model_dim,
        kind=g.kind,
        width=g.width,
        layers=g.layers,
        pooling=g.pooling,
        head=g.head,
        num_heads=g.num_heads or max(1, (g.width or cfg.model_dim) // m.head_dim),
        dtype=resolve(m.dtype, m.attention).dtype,
        rope_base=m.rope_base,
        attention=resolve(m.dtype, g.attention).attention,
        scaled=cfg.pretrained,
        read_gate=(m.depth, base_heads(cfg)) if g.read_gate else (),
    )


def base_heads(cfg) -> int:
    """The base model's query heads: a pretrained base's from its checkpoint, the GPT's D / H."""
    if cfg.pretrained:
        from mcjax.model.base import llama_spec

        return llama_spec(cfg).num_heads
    return cfg.model_dim // cfg.base_model.head_dim
