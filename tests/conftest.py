"""Shared helpers: tiny configs that train in seconds on a CPU, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out: Path, **sections) -> dict:
    """A config dict for a 2-layer, 64-wide GPT on 200 KB of Shakespeare (T=64, V=300)."""
    data = out / "data"
    cfg = {
        "name": "tiny",
        "dataset": {
            "dataset_name": "tiny",
            "vocab_size": 300,
            "context_tokens": 64,
            "block_size": 32,
            "horizon": 16,
            "max_source_bytes": 200_000,
            "val_fraction": 0.05,
            "splits": {
                "train": {"source": "builtin:shakespeare", "output_path": str(data / "train.arrow")},
                "val": {"source": "builtin:shakespeare", "output_path": str(data / "val.arrow")},
            },
        },
        "base_model": {"depth": 2, "model_dim": 64, "head_dim": 32},
        "megacontext": {"recent_tokens": 32},
        "training": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 20, "eval_tokens": 1024},
        "telemetry": {"out_dir": str(out / "artifacts"), "wandb": "disabled", "progress": False},
        "checkpoint": {"every_tokens": 0, "keep": 2, "async_save": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["WANDB_MODE"] = "disabled"
    return env


def run_cli(args: list[str], cwd: Path, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mcjax.cli", *args],
        cwd=cwd,
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each program's code
    into the process; one pytest process compiling the whole suite's programs runs past the
    kernel's limit on memory maps (vm.max_map_count, 65,530 by default) and the next compile
    crashes."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """One prepared tiny dataset shared by the tests that train (prep takes seconds)."""
    from mcjax.config import config_from_dict
    from mcjax.data.prep import prepare

    root = tmp_path_factory.mktemp("shared")
    prepare(config_from_dict(tiny_config(root)), log=lambda _: None)
    return root
