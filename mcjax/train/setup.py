"""What a run is made of on the current mesh — model, optimizer, state shardings — built once
from its config, and the restore of its checkpointed state onto that mesh.

`mcjax train` (fresh or `--resume`) and every command that loads a trained run
(`mcjax.restore.load_run`: generate, infer) go through `build_parts` and `Parts.restore`,
so a checkpoint always comes back the same way, with the same errors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mcjax.checkpoint import Checkpointer
from mcjax.config import Config
from mcjax.errors import UserError
from mcjax.model.base import build_base
from mcjax.model.megacontext import build_megacontext
from mcjax.train import frozen
from mcjax.train.mc_step import initial_stats
from mcjax.train.optim import build_optimizer
from mcjax.train.sharding import make_mesh
from mcjax.train.state import TrainState, abstract_state, create_state, state_shardings


@dataclasses.dataclass
class Parts:
    """The model (GPT, or GPT + GistNet + LensNet), optimizer and TrainState shardings of `cfg`."""

    cfg: Config
    mesh: Mesh
    model: Any
    tx: optax.GradientTransformation
    shardings: TrainState
    sample: jnp.ndarray  # int32 [1, T]: the shape the model is initialised on
    stats: Callable[[], dict] | None

    def split(self, params):
        return frozen.split(params, self.cfg)

    @functools.cached_property
    def base_ref(self) -> dict | None:
        """The pretrained base's {"path", "sha256"} that checkpoints keep (None for the GPT)."""
        return frozen.base_reference(self.cfg)

    def load_frozen(self) -> dict:
        """The pretrained base's weights into their shardings ({} for the GPT)."""
        return frozen.load_frozen(self.cfg, self.shardings.frozen)

    def fresh(self) -> TrainState:
        """A new state from `training.seed`, created directly in its shardings; a pretrained
        base's weights loaded beside it, and GistNet's gist scale set to their embedding RMS."""
        state = create_state(self.model, self.tx, self.shardings, self.cfg.training.seed, self.sample, self.stats, self.split)
        if not self.cfg.pretrained:
            return state
        state = state.replace(frozen=self.load_frozen())
        if "gistnet" in state.params:
            scale = frozen.embedding_rms(state.frozen, self.cfg)
            gist = dict(state.params["gistnet"], scale=jax.device_put(scale, self.shardings.params["gistnet"]["scale"]))
            state = state.replace(params=dict(state.params, gistnet=gist))
        return state

    def restore(self, ckpt: Checkpointer, step: int) -> tuple[TrainState, dict, dict]:
        """(state, data-iterator state, meta) of checkpoint `step`, onto this mesh (with the
        pretrained base's weights loaded from base_model.path).

        UserError naming the first param whose shape differs when the checkpoint was written
        by another model (a changed config), instead of orbax's traceback; UserError when the
        checkpoint was trained on another pretrained base (its content hash differs).
        """
        target = abstract_state(self.model, self.tx, self.shardings, self.sample, self.stats, self.split)
        _check_shapes(ckpt, step, target.params, self.cfg)
        state, data, meta = ckpt.restore(target, step)
        saved = meta.get("base")
        if self.cfg.pretrained:
            if not saved or saved.get("sha256") != self.base_ref["sha256"]:
                was = f"{saved['path']} (sha256 {saved['sha256'][:12]}…)" if saved else "no pretrained base"
                raise UserError(
                    f"{ckpt.directory}/{step}: trained on {was}, but base_model.path {self.base_ref['path']} "
                    f"has sha256 {self.base_ref['sha256'][:12]}… (another base model; point base_model.path at the one it was trained on)"
                )
            state = state.replace(frozen=self.load_frozen())
        return state, data, meta


def build_parts(cfg: Config) -> Parts:
    mesh = make_mesh(cfg)
    mc_on = cfg.megacontext.enabled
    model = build_megacontext(cfg) if mc_on else build_base(cfg)
    tx = build_optimizer(cfg)
    stats = initial_stats if mc_on else None
    sample = jnp.zeros((1, cfg.dataset.context_tokens), jnp.int32)
    split = functools.partial(frozen.split, cfg=cfg)
    return Parts(cfg, mesh, model, tx, state_shardings(model, tx, mesh, sample, stats, split), sample, stats)


def _check_shapes(ckpt: Checkpointer, step: int, params, cfg: Config) -> None:
    saved = ckpt.param_shapes(step)
    if saved is None:  # no metadata to compare: let the restore speak
        return
    want = {jax.tree_util.keystr(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(set(want) | set(saved)):
        got, need = saved.get(name), want.get(name)
        if got != need:
            show = lambda s: "absent" if s is None else f"[{', '.join(map(str, s))}]"  # noqa: E731
            raise UserError(
                f"{ckpt.directory}/{step}: param {name} is {show(got)} in the checkpoint but {show(need)} "
                f"for the config {cfg.source_file} (was the run trained with another model config?)"
            )


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
