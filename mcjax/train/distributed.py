"""Multi-process start-up: `jax.distributed.initialize` when a launcher says so.

- `launch/run.sh` (several local processes, or hosts named by hand) sets
  MCJAX_COORDINATOR (host:port), MCJAX_NUM_PROCESSES and MCJAX_PROCESS_ID.
- Under SLURM with more than one task, and on a multi-host TPU slice, JAX finds the
  cluster itself.
Single-process runs (one CPU, one GPU, one TPU host) skip it.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> bool:
    """Join the job's other processes if there are any. Returns True if distributed."""
    env = os.environ
    if env.get("MCJAX_COORDINATOR"):
        if env.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env["MCJAX_COORDINATOR"],
            num_processes=int(env["MCJAX_NUM_PROCESSES"]),
            process_id=int(env["MCJAX_PROCESS_ID"]),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
        return True
    return False
