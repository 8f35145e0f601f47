"""The train state pytree and its creation, sharded over the mesh from the start."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mcjax.train.sharding import logical_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 [], optimizer steps taken
    params: Any  # the model's param tree (no "params" collection wrapper)
    opt_state: Any
    stats: Any = flax.struct.field(default_factory=dict)  # running statistics (MegaContext: ΔNLL EMA)


Stats = Callable[[], dict] | None  # makes the initial `TrainState.stats` (replicated scalars)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, sample: jnp.ndarray, stats: Stats = None):
    """NamedShardings of the TrainState: params by their logical axes, optimizer state like
    its params, stats replicated.

    `sample` is an int [B, T] token array with the shape the model will be called on.
    """
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), sample))["params"]
    # The optimizer state of boxed params keeps the boxes: moments shard like their params.
    opt_sh = logical_shardings(jax.eval_shape(tx.init, boxed), mesh)
    stats_sh = jax.tree.map(lambda _: replicated(mesh), stats() if stats else {})
    return TrainState(step=replicated(mesh), params=logical_shardings(boxed, mesh), opt_state=opt_sh, stats=stats_sh)


def _initializer(model: nn.Module, tx: optax.GradientTransformation, sample, stats: Stats):
    def init(key) -> TrainState:
        params = nn.unbox(model.init(key, sample))["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), stats=stats() if stats else {}
        )

    return init


def create_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, seed: int, sample, stats: Stats = None):
    """Initialise params and optimizer state directly into their shardings (no host copy)."""
    return jax.jit(_initializer(model, tx, sample, stats), out_shardings=shardings)(jax.random.key(seed))


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, sample, stats: Stats = None):
    """ShapeDtypeStructs with shardings: what a checkpoint restore fills in."""
    return jax.jit(_initializer(model, tx, sample, stats), out_shardings=shardings).eval_shape(jax.random.key(0))
