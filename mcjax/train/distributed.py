"""Multi-process start-up: `jax.distributed.initialize` when a launcher says so.

- `launch/run.sh local N` (several processes on one machine, or hosts named by hand) sets
  MCJAX_COORDINATOR (host:port), MCJAX_NUM_PROCESSES and MCJAX_PROCESS_ID.
- Under SLURM (`launch/run.sh slurm`, srun) with more than one task, `slurm_settings` reads
  the job step's environment: process id SLURM_PROCID of SLURM_NTASKS, the coordinator the
  first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) at port MCJAX_PORT, else
  20000 + SLURM_JOB_ID mod 20000 (the same on every task, distinct between jobs). With
  several tasks on a node, task SLURM_LOCALID uses local device SLURM_LOCALID (one process
  per GPU) unless CUDA_VISIBLE_DEVICES already names a single GPU (srun --gpus-per-task=1);
  with one task per node, it uses all of the node's devices.
- On a multi-host TPU slice, JAX finds the cluster itself.
Single-process runs (one CPU, one GPU, one TPU host) skip it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax

from mcjax.errors import UserError


class Cluster(NamedTuple):
    coordinator: str  # host:port
    num_processes: int
    process_id: int
    local_device: int | None  # this process's one local device, or None for all of them


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, in order: "gpu[01-03,07],login" -> gpu01, gpu02, gpu03,
    gpu07, login (zero padding kept). UserError for a malformed list."""
    hosts: list[str] = []
    pieces = list(re.finditer(r"([^,\[\]]+)\[([^\]]*)\]|([^,\[\]]+)", nodelist))
    if not pieces or ",".join(m[0] for m in pieces) != nodelist:
        raise UserError(f"SLURM node list {nodelist!r}: not a list of hosts and host[ranges]")
    for prefix, ranges, plain in (m.groups() for m in pieces):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m or (m[2] and int(m[2]) < int(m[1])):
                raise UserError(f"SLURM node list {nodelist!r}: cannot read the range {part!r}")
            lo, hi = m[1], m[2] or m[1]
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def _tasks_on_first_node(spec: str) -> int:
    """SLURM_STEP_TASKS_PER_NODE ("4(x2),1" or "2") -> the first node's task count."""
    m = re.match(r"\d+", spec)
    return int(m[0]) if m else 1


def slurm_settings(env: Mapping[str, str]) -> Cluster | None:
    """The cluster of a SLURM job step with more than one task (module doc), else None."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes or "SLURM_PROCID" not in env:
        raise UserError(f"SLURM_NTASKS={tasks} but SLURM_PROCID or SLURM_STEP_NODELIST is not set: "
                        "start each task with srun (launch/run.sh slurm)")
    port = int(env.get("MCJAX_PORT") or 20000 + int(env.get("SLURM_JOB_ID") or 0) % 20000)
    per_node = _tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    one_gpu = "," not in env.get("CUDA_VISIBLE_DEVICES", ",")  # srun --gpus-per-task=1 already narrowed it
    local = int(env.get("SLURM_LOCALID") or 0) if per_node > 1 and not one_gpu else None
    return Cluster(f"{expand_nodelist(nodes)[0]}:{port}", tasks, int(env["SLURM_PROCID"]), local)


def _cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu"


def maybe_initialize() -> bool:
    """Join the job's other processes if there are any. Returns True if distributed."""
    env = os.environ
    if env.get("MCJAX_COORDINATOR"):
        cluster = Cluster(env["MCJAX_COORDINATOR"], int(env["MCJAX_NUM_PROCESSES"]), int(env["MCJAX_PROCESS_ID"]), None)
    else:
        cluster = slurm_settings(env)
    if cluster is not None:
        if _cpu():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        local = None if cluster.local_device is None or _cpu() else [cluster.local_device]
        jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                                   process_id=cluster.process_id, local_device_ids=local)
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
        return True
    return False
