"""Checkpoints: an orbax CheckpointManager over the train state, the data iterator and metadata.

Layout: `<out_dir>/checkpoints/<run>/<step>/{state,data,meta}`. Saves are asynchronous
by default and atomic (orbax writes to a temporary folder and renames it when
complete), so a run killed mid-save resumes from the last complete checkpoint. The
step is the number of optimizer updates taken. Every process takes part in a save;
orbax writes each array shard once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start saving (returns before the write completes when async)."""
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data-iterator state, meta) of `step` (default: the latest).

        `abstract_state` is a tree of ShapeDtypeStructs with shardings: each array comes
        back directly into its sharding.
        """
        step = self.latest_step() if step is None else step
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["meta"]

    def param_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """Shape of every saved param of checkpoint `step`, keyed like
        `jax.tree_util.keystr` of the params tree (None if the metadata cannot be read)."""
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        reader = ocp.CheckpointManager(self.directory, item_handlers=handlers)
        try:
            params = reader.item_metadata(step)["state"]["params"]
        except Exception:  # noqa: BLE001 - metadata is a courtesy; the restore itself decides
            return None
        finally:
            reader.close()
        return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
