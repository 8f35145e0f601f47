#!/usr/bin/env bash
# Device script for the real long-context run (bench/RESULTS.md, curves in bench/mc_d12_long_h200/):
# install the carried wheels, prepare mc_d12_long's data, train it within the call's time,
# and copy the run's metrics, LOD dumps, summary and plots to $OUT/run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
python3 -m mcjax.cli prep --config configs/mc_d12_long.yaml "$@" > "$OUT/prep.log" 2>&1
cat "$OUT/prep.log"
timeout "${TRAIN_S:-500}" python3 -m mcjax.cli train --config configs/mc_d12_long.yaml telemetry.progress=false "$@" \
  > "$OUT/train.log" 2>&1
echo "train rc=$?"
tail -5 "$OUT/train.log"
mkdir -p "$OUT/run"
run=artifacts/runs/mc_d12_long
cp -r "$run"/metrics.jsonl "$run"/lod_dumps.txt "$run"/summary.json "$run"/plots "$OUT/run/" 2>/dev/null
ls "$OUT/run"
