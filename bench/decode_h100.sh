#!/usr/bin/env bash
# Device script for decode latency (issue 29) on one H100: bench/runtime.py with random weights
# (the d12 of configs/mc_d12.yaml; SmolLM2-135M's real shapes from bench/random_base.py), each
# engine's per-kernel profile of a decode block and its compiled program (HLO) under $OUT.
#   RUNS="new:d12:pallas:mc+plain base:d12::mc+plain" PROFILE=1 bash bench/decode_h100.sh profile   # carry .whl .device/base.tgz
#       (base: `git archive HEAD bench configs mcjax | gzip > .device/base.tgz`, the tree before a change)
#   bash bench/decode_h100.sh bench     # ratios at batch 1 and 8, W_max 2,048 and 8,192, both models ($MODELS)
#   bash bench/decode_h100.sh equal     # the engine's equalities in the device's dtype (bf16), both models, W_max $WMAX
#       (default 2,048): bench/engine_equalities.py
# Extra arguments go to every bench/runtime.py call (e.g. --lens random, key=value overrides).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl 2>/dev/null \
  || [ -d /root/site ] || exit 1
export PYTHONPATH=/root/site:. PYTHONUNBUFFERED=1
mode=${1:-profile}; shift || true
[ -d /root/rand135 ] || python3 bench/random_base.py smollm2-135m /root/rand135 > /dev/null
d12=(--config configs/mc_d12.yaml)
smol=(--config configs/smollm2_135m_mc.yaml base_model.path=/root/rand135)
common=(--history 65536 --lens zero runtime.max_tokens=131072 telemetry.wandb=disabled)
case $mode in
profile)  # RUNS: tree:model:kernel:engines — tree new (this one) or base (.device/base.tgz, an earlier tree; its
  # kernel field is ignored), model d12 (W_max 8,192) or smol (2,048), runtime.decode_kernel, engines (mc+plain)
  if [ -f .device/base.tgz ]; then rm -rf /root/base && mkdir -p /root/base && tar -C /root/base -xzf .device/base.tgz; fi
  for spec in ${RUNS:-new:d12:xla:mc+plain new:smol:xla:mc+plain}; do
    IFS=: read -r v m kernel engines <<< "$spec"
    dir=.; extra=(runtime.decode_kernel=$kernel)
    [ "$v" = base ] && dir=/root/base && extra=()
    [ "$m" = d12 ] && cfg=("${d12[@]}" megacontext.wc_capacity=8192) || cfg=("${smol[@]}" megacontext.wc_capacity=2048)
    prof=(); [ -n "${PROFILE:-}" ] && [ "$v" = new ] && prof=(--profile /root/prof/$v$m$kernel --hlo /root/hlo/$v$m$kernel)
    tag=${v}_${m}_$kernel
    (cd $dir && PYTHONPATH=/root/site:. python3 "$OLDPWD/bench/runtime.py" "${cfg[@]}" "${common[@]}" --blocks ${BLOCKS:-12} \
      --batch ${BATCH:-1} --engines ${engines//+/ } "${extra[@]}" "${prof[@]}" "$@" --json "$OUT/profile.jsonl") > "$OUT/$tag.txt" 2>&1
    echo "$tag rc=$?"; grep -E "MC/plain|bound" "$OUT/$tag.txt"
    [ -d /root/hlo ] && tar -C /root -czf "$OUT/hlo.tgz" hlo
  done
  ;;
bench)
  for m in ${MODELS:-d12 smol}; do
    [ "$m" = d12 ] && cfg=("${d12[@]}") || cfg=("${smol[@]}")
    for w in ${WMAX:-2048 8192}; do
      python3 bench/runtime.py "${cfg[@]}" "${common[@]}" --blocks 24 --batch ${BATCH:-1 8} megacontext.wc_capacity=$w \
        --json "$OUT/bench.jsonl" "$@" > "$OUT/${m}_w$w.txt" 2>&1; echo "$m W_max $w rc=$?"
      grep "MC/plain" "$OUT/${m}_w$w.txt"
    done
  done
  ;;
equal)
  for m in ${MODELS:-d12 smol}; do
    [ "$m" = d12 ] && cfg=("${d12[@]}") || cfg=("${smol[@]}")
    python3 bench/engine_equalities.py "${cfg[@]}" megacontext.wc_capacity="${WMAX:-2048}" runtime.max_tokens=131072 \
      telemetry.wandb=disabled --json "$OUT/equal.jsonl" "$@" > "$OUT/equal_$m.txt" 2>&1; echo "$m rc=$?"
    tail -8 "$OUT/equal_$m.txt"
  done
  ;;
esac
