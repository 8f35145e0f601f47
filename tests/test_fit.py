"""Programs checked against free memory before they run (mcjax/train/fit.py), and the eval's
progress lines when stderr is no terminal."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, write_config
from mcjax.train import fit, memory


def test_host_available_bytes_reads_memavailable(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   17000000 kB\n")
    assert memory.host_available_bytes(info) == 17_000_000 * 1024
    info.write_text("MemTotal:       24000000 kB\n")
    assert memory.host_available_bytes(info) is None
    assert memory.host_available_bytes(tmp_path / "missing") is None


def test_new_bytes_counts_temporaries_and_unaliased_outputs():
    a = types.SimpleNamespace(temp_size_in_bytes=700, output_size_in_bytes=300, alias_size_in_bytes=100,
                              argument_size_in_bytes=10_000)
    assert memory.program_bytes(a, arguments=False) == 900
    assert memory.program_bytes(a, arguments=True) == 10_900
    assert memory.program_bytes(None, arguments=False) is None


def test_check_fits_names_the_sizes_and_what_to_lower():
    fit.check_fits(5, 5, "x", "y")  # equal fits
    fit.check_fits(None, 1, "x", "y")  # unknown: no check
    fit.check_fits(10**12, None, "x", "y")
    with pytest.raises(fit.ProgramTooLarge) as e:
        fit.check_fits(42_100_000_000, 17_000_000_000, "the step", "lower the batch")
    assert str(e.value) == "the step needs 42.1 GB of cpu memory beyond its inputs and 17.0 GB is free: lower the batch"


def test_fitted_compiles_once_per_static_value_and_equals_jit(monkeypatch):
    f = jax.jit(lambda x, n: jnp.cumsum(x) * n, static_argnums=1)
    fitted = fit.Fitted(f, lambda n: f"f at {n}", "hint")
    x = jnp.arange(6.0)
    for n in (2, 3, 2):
        np.testing.assert_array_equal(fitted(x, n), f(x, n))
    assert sorted(fitted._programs) == [2, 3]
    first = fitted._programs[2]
    fitted(x + 1, 2)
    assert fitted._programs[2] is first  # reused, not recompiled
    monkeypatch.setattr(memory, "free_bytes", lambda device=None: 0)
    with pytest.raises(fit.ProgramTooLarge, match=r"^f at 4 needs .* GB of cpu memory beyond its inputs and 0.0 GB is free: hint$"):
        fitted(x, 4)
    assert 4 not in fitted._programs
    np.testing.assert_array_equal(fitted(x, 3), f(x, 3))  # compiled before: not checked again


def test_a_training_step_too_large_stops_with_one_line_and_no_checkpoint(tmp_path, monkeypatch, capsys):
    from mcjax.cli import main

    raw = tiny_config(
        tmp_path,
        dataset={"context_tokens": 128, "horizon": 16},
        megacontext={"enabled": True, "recent_tokens": 32, "train_wc_length": 0.5, "curriculum_start": 0.5},
        training={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2},
    )
    path = write_config(tmp_path / "mc.yaml", raw)
    monkeypatch.setattr(memory, "free_bytes", lambda device=None: 1000)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mcjax: error: the training step (2 sequences of 128 tokens per micro-step, W_max 128, variants of")
    assert "GB of cpu memory beyond its inputs and 0.0 GB is free: lower training.micro_batch_size" in err
    assert not (tmp_path / "artifacts" / "checkpoints" / "tiny").exists() or not any(
        (tmp_path / "artifacts" / "checkpoints" / "tiny").iterdir()
    )


def test_eval_progress_is_plain_lines_without_a_terminal(capsys):
    from mcjax.telemetry.progress import PlainBar, bar

    b = bar(20, "retrieval")
    assert isinstance(b, PlainBar)  # capsys' stderr is no terminal
    with b:
        b.set_postfix_str("retrieval full L=8192")
        for _ in range(20):
            b.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    assert lines[0] == "retrieval: 2/20 rows (10%) (retrieval full L=8192)"
    assert lines[-1] == "retrieval: 20/20 rows (100%) (retrieval full L=8192)"
    b = PlainBar(7, "focus")
    b.update(3)
    b.update(4)  # 7 of 7: the last line even off the 10 % grid
    assert capsys.readouterr().err.splitlines() == ["focus: 3/7 rows (43%)", "focus: 7/7 rows (100%)"]


def test_every_process_takes_the_tightest_room(monkeypatch):
    from jax.experimental import multihost_utils

    assert fit.tightest(5, 9) == (5, 9)  # one process: its own
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    others = [np.array([4, 10, 1]), np.array([0, 0, 0])]  # room 6; one that cannot tell
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, *others]))
    assert fit.tightest(8, 9) == (8, 9)  # room 1 here, 6 there: this one is the tightest
    assert fit.tightest(3, 20) == (4, 10)  # room 17 here: the other's
    assert fit.tightest(None, 20) == (4, 10)  # this one cannot tell: the others decide
    others[0] = np.array([0, 0, 0])
    assert fit.tightest(None, None) == (None, None)  # nobody can tell: no check
