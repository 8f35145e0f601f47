"""FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token follow nanochat's estimate: 6 × (parameters other than the input
embedding) for the matmuls of forward + backward, plus 12 · L · D · T for attention
scores and values at sequence length T (full causal attention counted as nanochat does).
A pretrained base's weights are frozen: its matmuls count 4 × (forward, and the gradients of
their inputs; no weight gradients), over its own shapes (grouped-query k/v, SwiGLU MLP).
"""

from __future__ import annotations

import jax

# Dense bf16 peak of one chip, FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def flops_per_token(depth: int, dim: int, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token of the GPT (forward + backward)."""
    matrices = depth * 12 * dim * dim + dim * vocab  # q,k,v,o (4D²) + MLP (8D²) per layer, head
    return 6.0 * matrices + 12.0 * depth * dim * seq_len


def config_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of `cfg`'s base model (an mcjax Config) at sequence length T."""
    if not cfg.pretrained:
        return flops_per_token(cfg.base_model.depth, cfg.model_dim, cfg.dataset.vocab_size, seq_len)
    from mcjax.model.base import llama_spec

    s = llama_spec(cfg)
    d, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    matrices = s.num_layers * (2 * d * q + 2 * d * kv + 3 * d * s.intermediate_size) + d * s.vocab_size
    return 4.0 * matrices + 12.0 * s.num_layers * q * seq_len


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(tokens_per_sec: float, flops_token: float, num_devices: int, peak: float | None) -> float:
    """Achieved FLOP/s over the peak of all devices; NaN where the peak is unknown."""
    if not peak:
        return float("nan")
    return tokens_per_sec * flops_token / (peak * num_devices)
