#!/usr/bin/env bash
# Train both reference dLLMs (LLaDA and Dream architecture; fixed steps, so the same device
# kind rebuilds them bit for bit) and benchmark each, the two side by side on one GPU.
#   integration/reference_benchmark.sh OUT_DIR [integration/benchmark.py arguments...]
# OUT_DIR gets llada.tgz and dream.tgz (training log, benchmark log, results.md/json,
# flips.png); models and checkpoints stay in WORK_DIR (default /tmp/fair-calib-reference).
# TRAIN_ARGS are passed to train_dllm.py; BENCH_TIMEOUT (seconds) caps each benchmark, whose
# results.json keeps every row finished before the cap.
set -euo pipefail
out=$(realpath -m "$1"); shift
work=${WORK_DIR:-/tmp/fair-calib-reference}
mkdir -p "$out" "$work"
declare -A presets=([llada]=reference [dream]=dream-reference)
for family in llada dream; do
  python integration/train_dllm.py --preset "${presets[$family]}" --device cuda \
    --out "$work/model-$family" ${TRAIN_ARGS:-} > "$work/train-$family.log" 2>&1 &
done
wait
for family in llada dream; do
  timeout "${BENCH_TIMEOUT:-0}" python integration/benchmark.py --model "$work/model-$family" --corpus stdlib \
    --out "$work/bench-$family" "$@" > "$work/bench-$family.log" 2>&1 &
done
status=0
wait || status=$?
for family in llada dream; do
  mkdir -p "$work/pack-$family"
  cp "$work/train-$family.log" "$work/bench-$family.log" "$work/pack-$family/" || true
  cp "$work/model-$family/training_log.json" "$work/pack-$family/" 2>/dev/null || true
  cp "$work/bench-$family"/results.* "$work/bench-$family"/flips.png "$work/pack-$family/" 2>/dev/null || true
  tar czf "$out/$family.tgz" -C "$work" "pack-$family"
done
exit $status
