#!/usr/bin/env bash
# Launch mcjax on several processes. Every process runs the same program; JAX joins them
# (mcjax/train/distributed.py) and process 0 writes logs; all take part in checkpoints.
#
#   launch/run.sh [--dry-run] local N [--cpu] -- train --config configs/x.yaml ...   N processes on this machine
#   launch/run.sh [--dry-run] slurm -- train --config configs/x.yaml ...            inside an sbatch allocation (one task per host or GPU)
#   launch/run.sh [--dry-run] tpu NAME ZONE -- train --config configs/x.yaml ...    every worker of a TPU VM slice
#
# --dry-run prints the command lines instead of running them. local: each process gets
# MCJAX_COORDINATOR / MCJAX_NUM_PROCESSES / MCJAX_PROCESS_ID (port MCJAX_PORT, else random);
# with --cpu each process uses one CPU device; on a multi-GPU host each process sees one GPU.
# slurm: srun starts the allocation's tasks; each finds the coordinator from SLURM's variables
# and logs to $MCJAX_LOG_DIR/<job>-rank<N>.log (default artifacts/logs). tpu: gcloud runs the
# install (pip install -e . "jax[tpu]"; MCJAX_SKIP_INSTALL=1 skips it) and the command in
# $MCJAX_REMOTE_DIR (default: this directory's path) on every worker.
set -euo pipefail

usage() { sed -n '2,15p' "$0" >&2; exit 2; }
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ $# -ge 1 ] || usage
mode=$1; shift
py=${PYTHON:-python3}
mcjax=("$py" -m mcjax.cli)
show() { printf '%q ' "$@" | sed 's/ $//'; echo; }  # one command line, shell-quoted

case "$mode" in
  local)
    [ $# -ge 1 ] || usage
    n=$1; shift
    cpu=0
    if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
    [ "${1:-}" = "--" ] && shift
    port=${MCJAX_PORT:-$((20000 + RANDOM % 20000))}
    gpus=0
    command -v nvidia-smi >/dev/null 2>&1 && gpus=1
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
    for ((i = 0; i < n; i++)); do
      vars=(MCJAX_COORDINATOR="localhost:$port" MCJAX_NUM_PROCESSES="$n" MCJAX_PROCESS_ID="$i")
      if [ "$cpu" = 1 ]; then
        vars+=(JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1)
      elif [ "$gpus" = 1 ]; then
        vars+=(CUDA_VISIBLE_DEVICES="$i")
      fi
      if [ "$dry" = 1 ]; then show env "${vars[@]}" "${mcjax[@]}" "$@"; continue; fi
      env "${vars[@]}" "${mcjax[@]}" "$@" &
      pids+=($!)
    done
    [ "$dry" = 1 ] && exit 0
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  slurm)
    [ "${1:-}" = "--" ] && shift
    logs=${MCJAX_LOG_DIR:-artifacts/logs}
    cmd=(srun --kill-on-bad-exit=1 --output="$logs/%j-rank%t.log" "${mcjax[@]}" "$@")
    if [ "$dry" = 1 ]; then show mkdir -p "$logs"; show "${cmd[@]}"; exit 0; fi
    mkdir -p "$logs"
    exec "${cmd[@]}"
    ;;
  tpu)
    [ $# -ge 2 ] || usage
    name=$1 zone=$2; shift 2
    [ "${1:-}" = "--" ] && shift
    remote="cd $(printf %q "${MCJAX_REMOTE_DIR:-$PWD}")"
    [ "${MCJAX_SKIP_INSTALL:-0}" = 1 ] || remote+=" && $py -m pip install -q -e . 'jax[tpu]'"
    remote+=" && $(show "${mcjax[@]}" "$@")"
    cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
    if [ "$dry" = 1 ]; then show "${cmd[@]}"; exit 0; fi
    exec "${cmd[@]}"
    ;;
  *) usage ;;
esac
