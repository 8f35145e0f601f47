#!/usr/bin/env bash
# Device script for SmolLM2-135M (issues 27 and 28) on one H100, in back-to-back calls of ≤ 10
# minutes on one warm machine (files under /root survive between them). The GGUF (98 MB) travels
# in three parts, one per call (a call carries ≤ 64 MiB, the tracked tree ~15 MiB of it, so two
# halves no longer fit): `split -b 34000000 -d GGUF .device/gguf/part` (part00, part01, part02) and
# `sha256sum GGUF | cut -c1-64 > .device/gguf/SHA256`. Every mode parks the parts its call carries
# under /root/gguf; the first that needs the model joins them once all are there and checks the
# sha256. The wheels jax lacks there (grain, tensorboardX, array-record, portpicker, gguf) travel in
# .whl/ (bench/RESULTS.md).
#   bash bench/smollm2_h100.sh setup   # carry .whl .device/gguf/part00 .device/gguf/SHA256: install, park
#   bash bench/smollm2_h100.sh park    # carry .device/gguf/part01: park it (part02 goes with train, fresh or eval)
#   bash bench/smollm2_h100.sh bench   # time the step at T = $BENCH (edit_group = $EDIT_GROUPS if set; random weights of the real shapes)
#   bash bench/smollm2_h100.sh runtime # decode latency, MC vs plain, 64k history, at W_max $WMAX (default 2048 8192),
#       batch $BATCH (default 1 8), random weights of the real shapes (bench/runtime.py); RT_S seconds per W_max
#   bash bench/smollm2_h100.sh fresh   # carry .device/gguf/part02: the retrieval suite before any MegaContext
#       training (one step at T = 4,096 makes a run to evaluate: LoRA and LensNet one optimizer step from
#       their start) at 1k–16k, EVAL_S seconds per length
#   bash bench/smollm2_h100.sh train   # carry .device/gguf/part02 (first call: joins and checks the GGUF, preps)
#   bash bench/smollm2_h100.sh eval    # the run's mcjax eval (EVAL_S seconds), report and curves to $OUT; with
#       LENGTHS set, the retrieval suite once per length (each one's table kept: a call that runs out of time
#       keeps the lengths it finished). A run restored from .device/ckpt takes its config.yaml from .device/run
#       (carry it with the last parts) and the GGUF joined by an earlier call
#   PARTS="aa ab ac ad" bash bench/smollm2_h100.sh ckpt   # the latest checkpoint (trainable params and optimizer
#       state, ~73 MB) to $OUT/ckpt in 15 MiB parts with its sha256: four parts per call, then PARTS=ae (a file
#       from $OUT may be at most 16 MiB, a call's files 64 MiB together)
#   bash bench/smollm2_h100.sh restore # carry .device/ckpt (parts split over calls: each call parks what it
#       carries under /root/ckpt); once all parts are there, joins, checks the sha256 and unpacks for --resume
# Extra arguments are config overrides of the training run. TRAIN_S: seconds of training per call.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/gguf
export PYTHONPATH=/root/site:.
export JAX_COMPILATION_CACHE_DIR=/root/jaxcache  # a resumed call reuses the programs the last one compiled
CFG=configs/smollm2_135m_mc.yaml
GGUF=/root/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
RUN=(base_model.path=$GGUF telemetry.out_dir=/root/art telemetry.wandb=disabled telemetry.progress=false)
mode=${1:-setup}; shift || true
park_gguf() {  # the GGUF parts and SHA256 this call carries, under /root/gguf
  for f in .device/gguf/part* .device/gguf/SHA256; do [ -f "$f" ] && cp "$f" /root/gguf/; done
  ls /root/gguf
}
join_gguf() {  # the GGUF from the parked parts, checked against SHA256
  park_gguf > /dev/null
  [ -f $GGUF ] && return 0
  cat /root/gguf/part* > $GGUF.tmp
  [ "$(sha256sum $GGUF.tmp | cut -c1-64)" = "$(cat /root/gguf/SHA256 2>/dev/null)" ] \
    || { rm -f $GGUF.tmp; echo "GGUF parts under /root/gguf ($(ls /root/gguf | tr '\n' ' ')) do not match SHA256: carry the missing part"; return 1; }
  mv $GGUF.tmp $GGUF
}
retrieval_by_length() {  # RUN_DIR TAG overrides...: the retrieval suite at each of $LENGTHS in turn, EVAL_S
  # seconds each; every length's table, report and log go to /root/evout/TAG_N and, re-packed after each
  # length, to $OUT/TAG.tgz (a call brings back at most 8 files)
  local run=$1 tag=$2 n rc; shift 2
  local ev; ev=$(dirname "$(dirname "$run")")/eval/$(basename "$run")
  for n in $LENGTHS; do
    mkdir -p "/root/evout/${tag}_$n"
    timeout "${EVAL_S:-500}" python3 -m mcjax.cli eval --run "$run" --suite retrieval "eval.retrieval_lengths=[$n]" \
      base_model.path=$GGUF "$@" > "/root/evout/${tag}_$n/eval.log" 2>&1
    rc=$?; echo "$tag $n rc=$rc"
    [ $rc = 0 ] && cp "$ev"/retrieval.json "$ev"/retrieval.parquet "$ev"/report.md "$ev"/*.png "/root/evout/${tag}_$n/" 2>/dev/null
    python3 - "/root/evout/${tag}_$n/retrieval.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit()
for r in d["summary"]["rows"]:
    print(f"  {r['task']:8s} {r['method']:12s} {r['length']:6d} W {r.get('w_max')} n {r['prompts']:3d} exact {r['exact']:.3f} nll {r['answer_nll']:.3f}")
print("  skipped:", d.get("skipped"))
PY
    (cd /root/evout && tar -czf "$OUT/$tag.tgz" "${tag}"_*)
  done
}
case $mode in
park)
  park_gguf
  ;;
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
  park_gguf
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  ;;
bench)  # the MegaContext step with and without its edits (and the plain step where it fits)
  python3 bench/random_base.py smollm2-135m /root/rand135 > /dev/null
  bench() {  # name T batch overrides...
    local name=$1 t=$2 b=$3; shift 3
    python3 -m mcjax.cli bench --config $CFG --batch "$b" --json "$OUT/$name.json" base_model.path=/root/rand135 \
      dataset.context_tokens="$t" megacontext.curriculum_start=$((2048 * 1000 / t))e-3 megacontext.train_wc_length=$((2048 * 1000 / t))e-3 \
      telemetry.wandb=disabled "$@" > "$OUT/$name.txt" 2>&1
    tail -12 "$OUT/$name.txt"
  }
  # BENCH: the sequence lengths to time (T = 8,192 × 8 is in bench/RESULTS.md); EDIT_GROUPS: edit_group values
  # (the edits' coverage against their cost: each row times mc, mc_no_edits and the plain step); unset: the
  # config's edits. With edit_halvings on, a G below 32 needs megacontext.edit_halvings ≤ ⌈log2 G⌉ as well.
  for t in ${BENCH:-16384}; do
    if [ -z "${EDIT_GROUPS:-}" ]; then bench "T${t}_b8" "$t" 8 "$@"; continue; fi
    for g in $EDIT_GROUPS; do bench "T${t}_g${g}_b8" "$t" 8 megacontext.edit_group="$g" "$@"; done
  done
  ;;
runtime)
  [ -d /root/rand135 ] || python3 bench/random_base.py smollm2-135m /root/rand135 > /dev/null
  for w in ${WMAX:-2048 8192}; do
    timeout "${RT_S:-280}" python3 bench/runtime.py --config $CFG base_model.path=/root/rand135 --history 65536 \
      --blocks 24 --batch ${BATCH:-1 8} --lens zero megacontext.wc_capacity="$w" runtime.max_tokens=131072 \
      telemetry.wandb=disabled --json "$OUT/runtime.jsonl" > "$OUT/runtime_w$w.txt" 2>&1
    echo "W_max $w rc=$?"; tail -20 "$OUT/runtime_w$w.txt"
  done
  ;;
train)
  join_gguf || exit 1
  [ -f artifacts/data/smollm2_135m_long/train.arrow ] || python3 -m mcjax.cli prep --config $CFG "${RUN[@]}" "$@" 2>&1 | tail -3
  resume=()
  [ -d /root/art/checkpoints/smollm2_135m_mc ] && resume=(--resume)
  python3 -m mcjax.cli train --config $CFG "${resume[@]}" "${RUN[@]}" training.time_limit_s="${TRAIN_S:-480}" "$@" \
    > "$OUT/train.log" 2>&1
  echo "train rc=$?"
  grep -E "run '|resumed|time_limit|val/(focus|retrieval|needle)" "$OUT/train.log" | tail -40
  run=/root/art/runs/smollm2_135m_mc
  mkdir -p "$OUT/run"
  cp "$run"/metrics.jsonl "$run"/lod_dumps.txt "$run"/summary.json "$OUT/run/" 2>/dev/null
  tar -C "$run" -czf "$OUT/run/plots.tgz" plots 2>/dev/null
  last=$(ls /root/art/deltas/*_edits_*.parquet 2>/dev/null | tail -1)  # the latest edit labels, for their analysis
  [ -n "$last" ] && cp "$last" "$OUT/run/"
  ;;
fresh)  # a second call with LENGTHS set evaluates the same one-step run at more lengths
  join_gguf || exit 1
  if [ -d /root/fresh/runs/smollm2_135m_fresh ]; then
    LENGTHS=${LENGTHS:-16384} retrieval_by_length /root/fresh/runs/smollm2_135m_fresh fresh eval.retrieval_samples=1 "$@"
    exit
  fi
  F=(base_model.path=$GGUF telemetry.out_dir=/root/fresh telemetry.wandb=disabled telemetry.progress=false
     name=smollm2_135m_fresh dataset.context_tokens=4096 training.max_steps=1
     dataset.splits.train.output_path=/root/fresh/data/train.arrow dataset.splits.val.output_path=/root/fresh/data/val.arrow)
  python3 -m mcjax.cli prep --config $CFG "${F[@]}" 2>&1 | tail -2
  python3 -m mcjax.cli train --config $CFG "${F[@]}" > "$OUT/fresh_train.log" 2>&1; echo "train rc=$?"; tail -3 "$OUT/fresh_train.log"
  LENGTHS=${LENGTHS:-1024 2048 4096 8192 16384} retrieval_by_length /root/fresh/runs/smollm2_135m_fresh fresh \
    eval.retrieval_samples=1 "$@"
  ;;
ckpt)
  ck=/root/art/checkpoints/smollm2_135m_mc
  latest=$(ls "$ck" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  [ -n "$latest" ] || { echo "no checkpoint under $ck"; exit 1; }
  # parts of an older checkpoint (a training call ran since) are packed again
  [ "$(cat /root/ckpt_out/STEP 2>/dev/null)" = "$latest" ] || rm -rf /root/ckpt_out
  if [ ! -f /root/ckpt_out/SHA256 ]; then
    mkdir -p /root/ckpt_out && echo "$latest" > /root/ckpt_out/STEP
    tar -C /root/art -cf /root/ckpt_out/ckpt.tar --exclude="checkpoints/smollm2_135m_mc/[0-9]*" checkpoints/smollm2_135m_mc \
      && tar -C /root/art -rf /root/ckpt_out/ckpt.tar "checkpoints/smollm2_135m_mc/$latest"
    (cd /root/ckpt_out && split -b 15m ckpt.tar part && sha256sum ckpt.tar | cut -c1-64 > SHA256 && rm ckpt.tar)
    echo "step $latest: $(ls /root/ckpt_out | tr '\n' ' ')"
  fi
  mkdir -p "$OUT/ckpt" && cp /root/ckpt_out/SHA256 "$OUT/ckpt/"
  for p in ${PARTS:-aa ab ac ad}; do cp "/root/ckpt_out/part$p" "$OUT/ckpt/"; done
  ls -l "$OUT/ckpt"
  ;;
restore)
  mkdir -p /root/ckpt && cp .device/ckpt/* /root/ckpt/
  ls -l /root/ckpt
  if [ -f /root/ckpt/SHA256 ] && [ "$(cat /root/ckpt/part* | sha256sum | cut -c1-64)" = "$(cat /root/ckpt/SHA256)" ]; then
    mkdir -p /root/art && cat /root/ckpt/part* | tar -C /root/art -xf - && echo "restored: $(ls /root/art/checkpoints/smollm2_135m_mc)"
  else
    echo "parked; not all parts yet (or sha256 mismatch)"
  fi
  ;;
eval)  # EVAL_S: seconds for the suites (each suite rewrites report.md, so what finished is copied).
  # The retrieval suite scores ~0.5 prompt-methods a second at 8k–32k on the H100, the run's restore
  # included (bench/RESULTS.md): 220 prompts at each of 3 lengths do not fit one call; pass LENGTHS and
  # eval.retrieval_samples
  join_gguf || exit 1
  [ -f artifacts/data/smollm2_135m_long/tokenizer.json ] || python3 -m mcjax.cli prep --config $CFG "${RUN[@]}" 2>&1 | tail -3
  if [ ! -f /root/art/runs/smollm2_135m_mc/config.yaml ]; then
    mkdir -p /root/art/runs/smollm2_135m_mc && cp .device/run/config.yaml /root/art/runs/smollm2_135m_mc/ || exit 1
  fi
  if [ -n "${LENGTHS:-}" ]; then
    retrieval_by_length /root/art/runs/smollm2_135m_mc "${TAG:-trained}" "$@"  # TAG: a second set in one call keeps the first
    exit
  fi
  timeout "${EVAL_S:-500}" python3 -m mcjax.cli eval --run /root/art/runs/smollm2_135m_mc base_model.path=$GGUF "$@" \
    > "$OUT/eval.log" 2>&1
  echo "eval rc=$?"
  tail -60 "$OUT/eval.log"
  ev=/root/art/eval/smollm2_135m_mc
  mkdir -p "$OUT/eval"
  cp "$ev"/report.md "$ev"/report.json "$OUT/eval/" 2>/dev/null
  tar -C "$ev" -czf "$OUT/eval/all.tgz" . 2>/dev/null
  ;;
esac
