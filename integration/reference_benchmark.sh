#!/usr/bin/env bash
# Train the reference dLLMs (LLaDA and Dream architecture; fixed steps, so the same device kind
# rebuilds them bit for bit) and benchmark each on one GPU, one process per seed.
#   integration/reference_benchmark.sh OUT_DIR [integration/benchmark.py arguments...]
# FAMILIES picks the models ("llada dream" by default), SEEDS the seeds ("0 1 2"). A model
# already in WORK_DIR/model-<family> (default WORK_DIR /tmp/fair-calib-reference) is used as
# is, otherwise it is trained (TRAIN_ARGS go to train_dllm.py). The seeds of all families run
# as parallel processes on the one GPU (small models leave it mostly idle, so this is ~3x
# faster; calibration seconds are measured under that sharing), then each family's runs are
# merged into one table. OUT_DIR gets <family>.tgz (training log, benchmark logs, merged
# results.md/json, flips.png). DEADLINE (seconds from the start) caps the benchmarks so the
# results are packed in time; every row finished before the cap is kept. The methods and their
# recipes are checked first (CHECK_ONLY=1: only that). METHOD_GROUPS=N splits each seed's
# methods over N processes (interleaved; the GPU has room, the CPU cores set the limit: keep
# jobs x seeds x N at most the core count).
set -euo pipefail
out=$(realpath -m "$1"); shift
work=${WORK_DIR:-/tmp/fair-calib-reference}
mkdir -p "$out" "$work"
declare -A presets=([llada]=reference [dream]=dream-reference)
families=${FAMILIES:-llada dream}
seeds=${SEEDS:-0 1 2}
start=$SECONDS
# every method and recipe checked before any training: a typo must not cost a GPU call
python integration/benchmark.py --model "$work" --out "$out" --check-only "$@"
if [ -n "${CHECK_ONLY:-}" ]; then exit 0; fi
for family in $families; do  # one at a time: two trainings side by side were slower
  if [ ! -f "$work/model-$family/config.json" ]; then
    python integration/train_dllm.py --preset "${presets[$family]}" --device cuda \
      --out "$work/model-$family" ${TRAIN_ARGS:-} > "$work/train-$family.log" 2>&1
  fi
done
cap=0  # timeout 0: no limit
if [ -n "${DEADLINE:-}" ]; then  # at least 1 s: a cap of 0 or less would mean no limit
  cap=$(( DEADLINE - (SECONDS - start) - 30 )); cap=$(( cap < 1 ? 1 : cap ))
fi
groups=${METHOD_GROUPS:-1}  # >1: each seed's methods split over that many processes
for family in $families; do
  for seed in $seeds; do
    for group in $(seq 1 "$groups"); do
      run=seed$seed; split=()
      if [ "$groups" -gt 1 ]; then run=seed$seed-g$group; split=(--method-group "$group/$groups"); fi
      # -k: a process busy in a CUDA call can outlive SIGTERM; KILL it 15 s later
      timeout -k 15 "$cap" python integration/benchmark.py --model "$work/model-$family" \
        --corpus stdlib --seeds "$seed" --out "$work/bench-$family/$run" "$@" "${split[@]}" \
        > "$work/bench-$family-$run.log" 2>&1 &
    done
  done
done
status=0
wait || status=$?
for family in $families; do
  pack="$work/pack-$family"
  mkdir -p "$pack"
  runs=$(ls -d "$work/bench-$family"/seed*/ 2>/dev/null | while read -r d; do
    [ -f "$d/results.json" ] && echo "$d"; done || true)
  # shellcheck disable=SC2086
  [ -n "$runs" ] && python integration/merge_results.py "$work/bench-$family/merged" $runs \
    > "$work/merge-$family.log" 2>&1 || status=1
  cp "$work"/train-$family.log "$work"/bench-$family-seed*.log "$work/merge-$family.log" \
    "$pack/" 2>/dev/null || true
  cp "$work/model-$family/training_log.json" "$pack/" 2>/dev/null || true
  cp "$work/bench-$family/merged"/results.* "$work/bench-$family/merged/flips.png" "$pack/" \
    2>/dev/null || true
  for run in $runs; do  # each process's own rows too: a failed merge loses nothing
    cp "$run/results.json" "$pack/results-$(basename "$run").json"
  done
  tar czf "$out/$family.tgz" -C "$work" "pack-$family"
done
exit $status
