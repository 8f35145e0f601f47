"""Load a trained run — its config mirror, tokenizer, model and params from its latest (or a
named) checkpoint, on the current mesh — for `mcjax generate`, `mcjax infer` and notebooks.

A run is named by its directory `<out_dir>/runs/<run>/` (or just `<run>`, looked up under
`artifacts/runs/`); its checkpoints are `<out_dir>/checkpoints/<run>/<step>/`. The config
is the mirror the run wrote (`config.yaml`), with `a.b=value` overrides on top (runtime
and allocator settings; a changed model shape is reported as a mismatch with the
checkpoint). The tokenizer is the copy in the run directory, else the dataset's, else a
pretrained base's own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from mcjax.checkpoint import Checkpointer
from mcjax.config import Config, base_model_dir, load_config
from mcjax.data.prep import tokenizer_path
from mcjax.data.tokenizer import Tokenizer, base_tokenizer_file
from mcjax.errors import UserError

RUNS = Path("artifacts") / "runs"
TOKENIZER = "tokenizer.json"


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    run_dir: Path
    tokenizer: Tokenizer
    model: Any  # GPT, or MegaContextModel (GPT + GistNet + LensNet)
    params: Any  # the model's param tree, sharded on the current mesh
    step: int  # the checkpoint's step

    @property
    def megacontext(self) -> bool:
        return self.cfg.megacontext.enabled


def find_run(run: str | Path) -> Path:
    """The directory of `run`: a path to a run directory, or a run name under artifacts/runs/."""
    for candidate in (Path(run), RUNS / str(run)):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(f"run '{run}': no config.yaml in {Path(run)} or {RUNS / str(run)} (a run directory, or a run name under {RUNS}/)")


def checkpoint_dir(run_dir: Path) -> Path:
    """`<out_dir>/checkpoints/<run>` beside `<out_dir>/runs/<run>`."""
    return run_dir.parent.parent / "checkpoints" / run_dir.name


def load_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    """The run's copy of its tokenizer, else the prepared data's, else — a pretrained base — the
    base's own (prep checked that the data's vocabulary is the base's): a run restored on a
    machine where its data was never prepared still loads. DataError naming the prepared data's
    path when none is there."""
    prepared = tokenizer_path(cfg)
    candidates = [run_dir / TOKENIZER, prepared]
    if cfg.pretrained:
        candidates.append(base_tokenizer_file(base_model_dir(cfg)))
    return Tokenizer.load(next((p for p in candidates if p.is_file()), prepared))


def load_run(run: str | Path, overrides: Sequence[str] = (), step: int | None = None) -> LoadedRun:
    """Restore `run` (see the module doc). UserError, one line, for a missing run or
    checkpoint, a bad override or a checkpoint that does not fit the config."""
    from mcjax.train.setup import build_parts  # jax-heavy: after the cheap checks

    run_dir = find_run(run)
    cfg = load_config(run_dir / "config.yaml", overrides)
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"run '{run_dir.name}': no checkpoints in {ckpt_dir}")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise UserError(f"run '{run_dir.name}': no checkpoints in {ckpt_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"run '{run_dir.name}': no checkpoint at step {step} in {ckpt_dir} (saved: {sorted(steps)})")
        tokenizer = load_tokenizer(cfg, run_dir)
        parts = build_parts(cfg)
        state, _, _ = parts.restore(ckpt, step)
    finally:
        ckpt.close()
    return LoadedRun(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, model=parts.model, params=state.model_params(), step=step)
