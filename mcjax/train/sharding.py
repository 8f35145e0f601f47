"""One Mesh with named axes, and the table that maps logical axis names onto it.

Modules name logical axes only ("vocab", "embed", "heads", "mlp", "layers"); `RULES`
maps them to the mesh axes ("data", "fsdp", "tensor"). Changing the parallelism is
changing this table or the mesh shape in the config, never the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mcjax.backend import backend
from mcjax.config import Config, mesh_shape
from mcjax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
_AUTO = (AxisType.Auto,) * len(AXES)  # the compiler propagates shardings (GSPMD)
BATCH = ("data", "fsdp")  # the batch is split over both data-parallel axes

RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The mesh of `cfg.mesh` over all devices (of every process); ConfigError if it doesn't fit.
    Axes left auto are resolved for the backend (config.mesh_axes) and the TPU slices present."""
    devices = jax.devices() if devices is None else list(devices)
    slices = num_slices(devices)
    shape = mesh_shape(cfg, len(devices), backend(), slices)
    dims = tuple(shape[a] for a in AXES)
    if slices > 1:
        return Mesh(slice_major_grid(dims, devices, slices, cfg.source_file), AXES, axis_types=_AUTO)
    if len(devices) == jax.device_count():
        return jax.make_mesh(dims, AXES, axis_types=_AUTO, devices=devices)
    return Mesh(np.asarray(devices).reshape(dims), AXES, axis_types=_AUTO)


def num_slices(devices) -> int:
    """TPU slices among `devices` (linked by DCN, not ICI); 1 on other backends."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def slice_major_grid(dims: tuple[int, ...], devices, slices: int, where: str) -> np.ndarray:
    """Devices in the mesh's [data, fsdp, tensor] shape with each slice a contiguous block of
    the data axis, so only data-parallel gradient reductions cross DCN; within a slice, the
    order mesh_utils gives for its ICI topology."""
    from jax.experimental import mesh_utils

    if dims[0] % slices:
        raise ConfigError(f"{where}: mesh.data: {dims[0]} is not a multiple of the {slices} TPU slices present "
                          "(data-parallel groups may not straddle slices)")
    ici = (dims[0] // slices, *dims[1:])
    return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of `nn.Partitioned` (abstract) values, via RULES."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """Arrays shaped [*leading axes, batch, ...]: the batch axis split over data×fsdp."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assemble a global array from each process's share (all of it on one process)."""
    return jax.make_array_from_process_local_data(sharding, local)
