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

from mcjax.config import Config, mesh_shape

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
    """The mesh of `cfg.mesh` over all devices (of every process); ConfigError if it doesn't fit."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    if len(devices) == jax.device_count():
        return jax.make_mesh(tuple(shape[a] for a in AXES), AXES, axis_types=_AUTO, devices=devices)
    return Mesh(np.asarray(devices).reshape(tuple(shape[a] for a in AXES)), AXES, axis_types=_AUTO)


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
