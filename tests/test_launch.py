"""launch/run.sh's dry runs (the exact command lines of each mode) and the SLURM environment's
reading (mcjax/train/distributed.py). The local and SLURM modes' real multi-process runs are
in test_train.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO
from mcjax.errors import UserError
from mcjax.train.distributed import Cluster, expand_nodelist, slurm_settings


def dry_run(*args: str, **env: str) -> list[str]:
    res = subprocess.run(["bash", str(REPO / "launch/run.sh"), "--dry-run", *args], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=REPO, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_local_dry_run_prints_every_process():
    lines = dry_run("local", "2", "--cpu", "--", "train", "--config", "configs/my run.yaml", MCJAX_PORT="23456")
    cpu = "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1"
    assert lines == [
        f"env MCJAX_COORDINATOR=localhost:23456 MCJAX_NUM_PROCESSES=2 MCJAX_PROCESS_ID={i} {cpu} "
        r"python3 -m mcjax.cli train --config configs/my\ run.yaml" for i in range(2)
    ]


def test_slurm_dry_run_logs_per_rank():
    assert dry_run("slurm", "--", "train", "--config", "configs/x.yaml", MCJAX_LOG_DIR="/scratch/logs") == [
        "mkdir -p /scratch/logs",
        "srun --kill-on-bad-exit=1 --output=/scratch/logs/%j-rank%t.log python3 -m mcjax.cli train --config configs/x.yaml",
    ]


def test_tpu_dry_run_installs_then_runs_on_every_worker():
    (line,) = dry_run("tpu", "my-v4", "us-central2-b", "--", "train", "--config", "configs/x.yaml",
                      MCJAX_REMOTE_DIR="/home/me/mcjax")
    assert line.startswith("gcloud compute tpus tpu-vm ssh my-v4 --zone us-central2-b --worker=all --command ")
    remote = subprocess.run(["bash", "-c", f"printf %s {line.split(' --command ', 1)[1]}"], capture_output=True,
                            text=True).stdout  # the --command argument, unquoted as gcloud receives it
    assert remote == ("cd /home/me/mcjax && python3 -m pip install -q -e . 'jax[tpu]' && "
                      "python3 -m mcjax.cli train --config configs/x.yaml")
    (line,) = dry_run("tpu", "v", "z", "--", "train", MCJAX_REMOTE_DIR="/r", MCJAX_SKIP_INSTALL="1")
    assert "pip" not in line and line.endswith(r"--command cd\ /r\ \&\&\ python3\ -m\ mcjax.cli\ train")


def test_bad_mode_prints_usage():
    res = subprocess.run(["bash", str(REPO / "launch/run.sh"), "bogus"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "launch/run.sh [--dry-run] slurm" in res.stderr


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
    ("a[8-10],b[1]", ["a8", "a9", "a10", "b1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, why", [("gpu[01-03", "not a list"), ("gpu[3-1]", "cannot read the range '3-1'"),
                                           ("", "not a list"), ("a,,b", "not a list")])
def test_bad_nodelist_is_one_line(nodelist, why):
    with pytest.raises(UserError, match=why):
        expand_nodelist(nodelist)


def test_slurm_settings():
    base = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NODELIST": "node[3-4]"}
    assert slurm_settings({}) is None and slurm_settings({**base, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    per_node = {**base, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    assert slurm_settings(per_node) == Cluster("node3:32345", 2, 1, None)  # one task per node: all its devices
    per_gpu = {**base, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert slurm_settings(per_gpu) == Cluster("node3:32345", 8, 5, 1)  # one task per GPU
    assert slurm_settings({**per_gpu, "MCJAX_PORT": "4000"}).coordinator == "node3:4000"
    assert slurm_settings({**per_gpu, "CUDA_VISIBLE_DEVICES": "1"}).local_device is None  # srun narrowed it already
    assert slurm_settings({**per_gpu, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}).local_device == 1
    with pytest.raises(UserError, match="start each task with srun"):
        slurm_settings({"SLURM_NTASKS": "2"})
