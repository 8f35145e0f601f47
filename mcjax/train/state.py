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
    # A pretrained base's frozen weights (train/frozen.py): applied, never updated nor checkpointed.
    frozen: Any = flax.struct.field(default_factory=dict)

    def model_params(self):
        """The full tree the model applies: the trainable params over the frozen ones."""
        from mcjax.train.frozen import merge

        return merge(self.params, self.frozen) if self.frozen else self.params

    def without_frozen(self) -> TrainState:
        """What a checkpoint saves (the frozen base is referenced, not copied)."""
        return self.replace(frozen={})


Stats = Callable[[], dict] | None  # makes the initial `TrainState.stats` (replicated scalars)
Split = Callable[[Any], tuple[Any, Any]]  # full params -> (trainable, frozen): train/frozen.py `split`


def no_split(params):
    return params, {}


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, sample: jnp.ndarray, stats: Stats = None, split: Split = no_split
):
    """NamedShardings of the TrainState: params (trainable and frozen) by their logical axes,
    optimizer state like its params, stats replicated.

    `sample` is an int [B, T] token array with the shape the model will be called on.
    """
    boxed, frozen = split(jax.eval_shape(lambda: model.init(jax.random.key(0), sample))["params"])
    # The optimizer state of boxed params keeps the boxes: moments shard like their params.
    opt_sh = logical_shardings(jax.eval_shape(tx.init, boxed), mesh)
    stats_sh = jax.tree.map(lambda _: replicated(mesh), stats() if stats else {})
    return TrainState(
        step=replicated(mesh), params=logical_shardings(boxed, mesh), opt_state=opt_sh, stats=stats_sh,
        frozen=logical_shardings(frozen, mesh),
    )


def _initializer(model: nn.Module, tx: optax.GradientTransformation, sample, stats: Stats, split: Split):
    """A fresh state without its frozen part (a pretrained base's weights are loaded, not drawn:
    their random init is dead code XLA drops)."""

    def init(key) -> TrainState:
        params, _ = split(nn.unbox(model.init(key, sample))["params"])
        return TrainState(
            step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), stats=stats() if stats else {}
        )

    return init


def create_state(
    model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, seed: int, sample, stats: Stats = None, split: Split = no_split
):
    """Initialise params and optimizer state directly into their shardings (no host copy).
    The frozen part is left empty ({}): the caller loads it."""
    init = _initializer(model, tx, sample, stats, split)
    return jax.jit(init, out_shardings=shardings.without_frozen())(jax.random.key(seed))


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, sample, stats: Stats = None, split: Split = no_split):
    """ShapeDtypeStructs with shardings: what a checkpoint restore fills in (no frozen part)."""
    init = _initializer(model, tx, sample, stats, split)
    return jax.jit(init, out_shardings=shardings.without_frozen()).eval_shape(jax.random.key(0))
