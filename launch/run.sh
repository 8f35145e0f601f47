#!/usr/bin/env bash
# Launch mcjax on several processes. Every process runs the same program; JAX joins them
# (mcjax/train/distributed.py) and process 0 writes logs; all take part in checkpoints.
#
#   launch/run.sh local N [--cpu] -- train --config configs/x.yaml ...   N processes on this machine
#   launch/run.sh slurm -- train --config configs/x.yaml ...            inside an sbatch allocation (one task per host or GPU)
#   launch/run.sh tpu NAME ZONE -- train --config configs/x.yaml ...    every worker of a TPU VM slice
#
# local: each process gets MCJAX_COORDINATOR / MCJAX_NUM_PROCESSES / MCJAX_PROCESS_ID; with
# --cpu each process uses one CPU device (for trying multi-process runs without accelerators);
# on a multi-GPU host each process sees one GPU through CUDA_VISIBLE_DEVICES.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
mode=$1; shift
mcjax=("${PYTHON:-python3}" -m mcjax.cli)

case "$mode" in
  local)
    [ $# -ge 1 ] || usage
    n=$1; shift
    cpu=0
    if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
    [ "${1:-}" = "--" ] && shift
    port=${MCJAX_PORT:-$((20000 + RANDOM % 20000))}
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
    for ((i = 0; i < n; i++)); do
      (
        export MCJAX_COORDINATOR="localhost:$port" MCJAX_NUM_PROCESSES="$n" MCJAX_PROCESS_ID="$i"
        if [ "$cpu" = 1 ]; then
          export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=1"
        elif command -v nvidia-smi >/dev/null 2>&1; then
          export CUDA_VISIBLE_DEVICES="$i"
        fi
        exec "${mcjax[@]}" "$@"
      ) &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  slurm)
    [ "${1:-}" = "--" ] && shift
    exec srun --kill-on-bad-exit=1 "${mcjax[@]}" "$@"
    ;;
  tpu)
    [ $# -ge 2 ] || usage
    name=$1 zone=$2; shift 2
    [ "${1:-}" = "--" ] && shift
    exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
      --command "cd $(printf %q "$PWD") && ${mcjax[*]} $(printf '%q ' "$@")"
    ;;
  *) usage ;;
esac
