#!/usr/bin/env bash
# Device script for the GistNet width figures (bench/RESULTS.md): mc_d12_long's step at
# T = 16k, W_max = 2,048, batch 8, with GistNet's transformer at width 768 (= model_dim), 384, 256.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
for w in 0 384 256; do
  python3 -m mcjax.cli bench --config configs/mc_d12_long.yaml --batch 8 --json "$OUT/bench_w$w.json" gistnet.width=$w \
    > "$OUT/bench_w$w.txt" 2>&1
  echo "== gistnet.width=$w"; tail -7 "$OUT/bench_w$w.txt"
done
