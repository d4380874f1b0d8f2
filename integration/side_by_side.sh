#!/usr/bin/env bash
# One device call (the `device` tool's GPU machine): install the carried wheels, train
# (or reuse, on a machine still warm) one reference model, then run several benchmark jobs on
# it side by side on the one GPU, all capped to finish BUDGET seconds after the start.
#   BUDGET=560 [METHODS=...] bash integration/side_by_side.sh FAMILY JOB...
# FAMILY: llada or dream. JOB: `learned` (learned_rotations_benchmark.sh; METHODS picks rows)
# or a FORMAT of formats_benchmark.sh (nvfp4, mxfp4, ag128, ag32, token). Each job's
# <family>.tgz lands in $OUT/<job>/ (at most 8 files come back from a device call).
# DEVICE (default cuda) and CHECK_ONLY=1 (check every job's rows, run nothing) let it be tried
# on a CPU with a model already in /tmp/wd/model-FAMILY.
set -u
cd "$(dirname "$0")/.."
family=$1; shift
OUT=${OUT:?set OUT to the folder that comes back}
if [ -d .whl ]; then  # the device image has torch; the rest comes as carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
fi
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
# a minute that can save the call: every checkpoint must reload exactly *on the GPU* before any
# benchmark starts (2026-12-01: a reload left on the CPU failed every row of four calls)
mkdir -p /tmp/wd
if [ ! -f /tmp/wd/preflight.ok ]; then  # once per machine (a warm one keeps the mark)
  if ! python integration/check_reload.py --device "${DEVICE:-cuda}" \
    --schemes W4A4_G128_PACKED NVFP4 --methods gptq > "$OUT/preflight.log" 2>&1; then
    echo "preflight failed: reloads are not exact on the GPU ($OUT/preflight.log)" >&2; exit 1
  fi
  touch /tmp/wd/preflight.ok
fi
declare -A presets=([llada]=reference [dream]=dream-reference)
model=/tmp/wd/model-$family
if [ ! -f "$model/config.json" ]; then
  python integration/train_dllm.py --preset "${presets[$family]}" --device "${DEVICE:-cuda}" \
    --out "$model" > "/tmp/wd/train-$family.log" 2>&1
fi
echo "trained at ${SECONDS}s" > "$OUT/driver.log"
deadline=$(( ${BUDGET:-560} - SECONDS ))
for job in "$@"; do
  work=/tmp/w-$family-$job
  rm -rf "$work"; mkdir -p "$work"
  ln -s "$model" "$work/model-$family"; cp "/tmp/wd/train-$family.log" "$work/"
  if [ "$job" = learned ]; then script=integration/learned_rotations_benchmark.sh
  else script=integration/formats_benchmark.sh; fi
  FAMILIES=$family WORK_DIR=$work DEADLINE=$deadline FORMAT=$job "$script" "$OUT/$job" \
    --eval-prompts "${EVAL_PROMPTS:-256}" --calibration-prompts 64 > "$work/driver.log" 2>&1 &
done
wait
echo "done at ${SECONDS}s" >> "$OUT/driver.log"
for job in "$@"; do  # each job's own log (a job that failed early says why here)
  echo "== $job" >> "$OUT/driver.log"; tail -n 20 "/tmp/w-$family-$job/driver.log" >> "$OUT/driver.log"
done
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$OUT/driver.log" 2>&1 || true
