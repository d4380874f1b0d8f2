#!/usr/bin/env bash
# Train the reference dLLMs (LLaDA and Dream architecture; fixed steps, so the same device kind
# rebuilds them bit for bit) and benchmark each on one GPU.
#   integration/reference_benchmark.sh OUT_DIR [integration/benchmark.py arguments...]
# FAMILIES picks the models ("llada dream" by default). OUT_DIR gets <family>.tgz (training
# log, benchmark log, results.md/json, flips.png); models and checkpoints stay in WORK_DIR
# (default /tmp/fair-calib-reference). TRAIN_ARGS go to train_dllm.py. DEADLINE (seconds from
# the start) caps the benchmarks so the results are packed in time; results.json keeps every
# row finished before the cap.
set -euo pipefail
out=$(realpath -m "$1"); shift
work=${WORK_DIR:-/tmp/fair-calib-reference}
mkdir -p "$out" "$work"
declare -A presets=([llada]=reference [dream]=dream-reference)
families=${FAMILIES:-llada dream}
start=$SECONDS
for family in $families; do  # one at a time: two trainings side by side were slower
  python integration/train_dllm.py --preset "${presets[$family]}" --device cuda \
    --out "$work/model-$family" ${TRAIN_ARGS:-} > "$work/train-$family.log" 2>&1
done
cap=0
if [ -n "${DEADLINE:-}" ]; then cap=$(( DEADLINE - (SECONDS - start) - 20 )); fi
for family in $families; do
  timeout "$cap" python integration/benchmark.py --model "$work/model-$family" \
    --corpus stdlib --out "$work/bench-$family" "$@" > "$work/bench-$family.log" 2>&1 &
done
status=0
wait || status=$?
for family in $families; do
  pack="$work/pack-$family"
  mkdir -p "$pack"
  cp "$work/train-$family.log" "$work/bench-$family.log" "$pack/" || true
  cp "$work/model-$family/training_log.json" "$pack/" 2>/dev/null || true
  cp "$work/bench-$family"/results.* "$work/bench-$family"/flips.png "$pack/" 2>/dev/null || true
  tar czf "$out/$family.tgz" -C "$work" "pack-$family"
done
exit $status
