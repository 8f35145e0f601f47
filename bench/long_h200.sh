#!/usr/bin/env bash
# Device script for the long-context figures (bench/RESULTS.md): install the carried wheels,
# prepare mc_d12_long's data in the background, bench T = 16k and 32k at W_max = 2,048.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
mc() { python3 -m mcjax.cli "$@"; }
(mc prep --config configs/mc_d12_long.yaml > "$OUT/prep.log" 2>&1 &)
mc bench --config configs/mc_d12_long.yaml --batch 8 --json "$OUT/bench_16k.json" > "$OUT/bench_16k.txt" 2>&1
tail -8 "$OUT/bench_16k.txt"
mc bench --config configs/mc_d12_long.yaml --batch 4 --json "$OUT/bench_32k.json" dataset.context_tokens=32768 \
  megacontext.train_wc_length=0.0625 megacontext.curriculum_start=0.0625 > "$OUT/bench_32k.txt" 2>&1
tail -8 "$OUT/bench_32k.txt"
while pgrep -f "mcjax.cli prep" > /dev/null; do sleep 5; done
cat "$OUT/prep.log"
