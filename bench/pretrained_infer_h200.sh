#!/usr/bin/env bash
# Inference memory of the MegaContext engine on frozen pretrained bases (bench/RESULTS.md
# "Pretrained bases"): random weights of each base's shapes (bench/random_base.py), LoRA folded
# in, one stream of MEMORY tokens ingested and 2 refocus blocks decoded; decode latency at a
# 65,536-token history first. The device's peak memory is the process-wide peak.
#   BASES="smollm2-360m llama3.2-1b smollm3-3b" bash bench/pretrained_infer_h200.sh   # on the device
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BASES=${BASES:-"smollm2-360m llama3.2-1b smollm3-3b"}
MEMORY=${MEMORY:-1048576}
declare -A CONFIG=([smollm2-360m]=smollm2_360m_mc [llama3.2-1b]=llama32_1b_mc [smollm3-3b]=smollm3_3b_mc)
for base in $BASES; do
  [ -f "/tmp/$base/model.safetensors" ] || python bench/random_base.py "$base" "/tmp/$base"
  python bench/runtime.py --config "configs/${CONFIG[$base]}.yaml" base_model.path="/tmp/$base" \
    runtime.max_tokens="$MEMORY" telemetry.wandb=disabled --engines mc --batch 1 --history 65536 --blocks 8 \
    --memory "$MEMORY" --json "$OUT/infer_$base.jsonl" 2>&1 | tee "$OUT/infer_$base.txt"
done
