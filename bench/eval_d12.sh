#!/usr/bin/env bash
# The d12 MegaContext run of configs/mc_d12.yaml trained and evaluated on one GPU
# (bench/RESULTS.md): prep, train, then every eval suite with its defaults. Extra
# arguments go to `mcjax eval` (e.g. eval.rows=8). Logs stamp each phase; the marker
# artifacts/eval_d12.done appears when it ends, with the exit status inside.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
trap 'echo $? > artifacts/eval_d12.done' EXIT
mkdir -p artifacts && rm -f artifacts/eval_d12.done
stamp() { echo "== $(date +%T) $*"; }
if [ ! -d artifacts/checkpoints/mc_d12 ]; then
  stamp prep && python3 -m mcjax.cli prep --config configs/mc_d12.yaml || exit 1
  stamp train && python3 -m mcjax.cli train --config configs/mc_d12.yaml telemetry.wandb=disabled telemetry.progress=false || exit 1
fi
stamp eval && python3 -m mcjax.cli eval --run mc_d12 telemetry.wandb=disabled "$@" || exit 1
stamp done
