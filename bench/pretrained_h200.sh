#!/usr/bin/env bash
# MegaContext on frozen pretrained bases with LoRA (bench/RESULTS.md "Pretrained bases"):
# random weights of SmolLM2-360M's, Llama-3.2-1B's (and with BASES=smollm3-3b SmolLM3-3B's)
# shapes (bench/random_base.py), the plain LoRA step beside the MegaContext step, at
# T = 2,048 and T = 8,192 with W_max 2,048.
#   bash bench/pretrained_h200.sh          # on the device; results in $OUT (or /tmp/out)
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BASES=${BASES:-"smollm2-360m llama3.2-1b"}  # one device call each fits its 10 minutes
for base in $BASES; do
  [ -f "/tmp/$base/model.safetensors" ] || python bench/random_base.py "$base" "/tmp/$base"
done
run() {  # config base T batch variant-length
  local cfg=$1 base=$2 t=$3 b=$4 wc=$5
  python -m mcjax.cli bench --config "configs/$cfg.yaml" --batch "$b" --wc-length "$wc" \
    --json "$OUT/${base}_T${t}_b${b}.json" base_model.path="/tmp/$base" dataset.context_tokens="$t" \
    megacontext.curriculum_start=1.0 megacontext.train_wc_length="$wc" telemetry.wandb=disabled 2>&1 | tee "$OUT/${base}_T${t}_b${b}.txt"
}
case " $BASES " in *" smollm2-360m "*)
  run smollm2_360m_mc smollm2-360m 2048 8 0.2
  run smollm2_360m_mc smollm2-360m 8192 2 0.125 ;;
esac
case " $BASES " in *" smollm3-3b "*)
  run smollm3_3b_mc smollm3-3b 2048 8 0.2
  run smollm3_3b_mc smollm3-3b 8192 2 0.125 ;;
esac
case " $BASES " in *" llama3.2-1b "*)
  run llama32_1b_mc llama3.2-1b 2048 8 0.2
  run llama32_1b_mc llama3.2-1b 8192 2 0.125 ;;
esac
