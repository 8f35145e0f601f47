"""Device memory: in use and at peak where the backend reports it (GPU and TPU; not CPU), what
is still free (CPU: the host's available memory), and what a compiled program needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def free_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the device can still allocate; None where neither the backend nor the host says."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        return host_available_bytes()
    return None


def host_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's MemAvailable (bytes); None where the file or the field is missing."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def program_bytes(analysis: Any, *, arguments: bool) -> int | None:
    """Bytes a compiled program needs (XLA's `memory_analysis()`): temporaries + outputs not
    aliased to an input, and its arguments too when `arguments`. None without an analysis."""
    if analysis is None:
        return None
    new = analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    return int(new + (analysis.argument_size_in_bytes if arguments else 0))
