"""Device memory in use and at peak, where the backend reports it (GPU and TPU; not CPU)."""

from __future__ import annotations

import jax


def device_memory() -> dict[str, float]:
    """GB in use, at peak and reserved by the allocator on this process's first device."""
    stats = jax.local_devices()[0].memory_stats() or {}
    names = {
        "bytes_in_use": "runtime/gpu_memory_allocated_gb",
        "peak_bytes_in_use": "runtime/gpu_memory_peak_gb",
        "pool_bytes": "runtime/gpu_memory_reserved_gb",
    }
    return {name: stats[key] / 1e9 for key, name in names.items() if key in stats}


def device_limit_gb() -> float | None:
    """GB the allocator may hand out on this process's first device; None where the backend
    does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["bytes_limit"] / 1e9 if "bytes_limit" in stats else None
