#!/usr/bin/env bash
# One device call (the `device` tool's GPU machine): install the carried wheels, train (or
# reuse, on a machine still warm) every reference model the jobs need, then run several
# benchmark jobs side by side on the one GPU, all capped to finish BUDGET seconds after the start.
#   BUDGET=560 [METHODS_<family>_<job>=...] bash integration/side_by_side.sh FAMILY [FAMILY:]JOB...
# e.g. `side_by_side.sh dream learned llada:ag128 llada:ag32`. FAMILY (llada or dream) is the
# family of each JOB written without one. JOB: `learned` (learned_rotations_benchmark.sh), `flat`
# (flatquant_benchmark.sh) or a
# FORMAT of formats_benchmark.sh (nvfp4, mxfp4, ag128, ag32, token). METHODS_<family>_<job>
# (space-separated, e.g. METHODS_dream_learned) picks that job's rows; without it a learned job
# takes METHODS (so old command lines keep their meaning) and a format job all its rows.
# METHOD_GROUPS_<family>_<job>, else METHOD_GROUPS, splits each seed's methods of that job over
# processes (reference_benchmark.sh; all jobs' processes together at most the 16 cores).
# A missing model is trained before any job starts. Each job's
# <family>.tgz is written to $OUT/<family>-<job>/, and at the end those folders, pip.log and
# preflight.log are packed into $OUT/jobs.tgz (a device call returns at most 8 files); driver.log
# has the training times, each job's rows and log tail. Exit 1 if a job failed or had no model.
# EXPORT_MODELS=1 also returns each trained model (in parts) for a later call to carry in .models/.
# DEVICE (default cuda) lets it run on a CPU; CHECK_ONLY=1 only checks every job's rows (no
# preflight, no training, no model needed: tests/test_benchmark.py). SCRATCH (default /tmp)
# holds the models and the preflight mark (wd/) and each job's work dir (w-<family>-<job>).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
default=${1:?usage: side_by_side.sh FAMILY [FAMILY:]JOB...}; shift
scratch=${SCRATCH:-/tmp}
declare -A presets=([llada]=reference [dream]=dream-reference)
# every job named and checked before anything runs: a typo must not cost the device call
jobs=()  # "family job" pairs, in the order given
for spec in "$@"; do
  family=$default job=$spec
  if [[ $spec == *:* ]]; then family=${spec%%:*} job=${spec#*:}; fi
  case $job in learned | flat | nvfp4 | mxfp4 | ag128 | ag32 | token) ;;
    *) echo "unknown JOB $spec (learned, flat, nvfp4, mxfp4, ag128, ag32, token)" >&2; exit 2 ;; esac
  if [ -z "${presets[$family]:-}" ]; then
    echo "unknown FAMILY in $spec (llada, dream)" >&2; exit 2
  fi
  for seen in "${jobs[@]}"; do  # one work dir and one output folder per family and job
    if [ "$seen" = "$family $job" ]; then echo "$family:$job given twice" >&2; exit 2; fi
  done
  jobs+=("$family $job")
done
[ ${#jobs[@]} -gt 0 ] || { echo "no JOB given" >&2; exit 2; }
mkdir -p "$OUT"
if [ -d .whl ] && [ "${DEVICE:-cuda}" != cpu ]; then  # the device image has torch; the rest
  # comes as carried wheels (a CPU run uses the environment it is in)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
fi
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
echo "jobs: $* (default family $default)" > "$OUT/driver.log"
wd=$scratch/wd
mkdir -p "$wd"
if [ -z "${CHECK_ONLY:-}" ]; then
  # a minute that can save the call: every checkpoint must reload exactly *on the GPU* before
  # any benchmark starts (2026-12-01: a reload left on the CPU failed every row of four calls)
  if [ ! -f "$wd/preflight.ok" ]; then  # once per machine (a warm one keeps the mark)
    if ! python integration/check_reload.py --device "${DEVICE:-cuda}" \
      --schemes W4A4_G128_PACKED NVFP4 --methods gptq > "$OUT/preflight.log" 2>&1; then
      echo "preflight failed: reloads are not exact on the GPU ($OUT/preflight.log)" >&2; exit 1
    fi
    touch "$wd/preflight.ok"
  fi
  # every model a job needs, before any job starts, one at a time: two side by side took as
  # long as both in a row (nvidia-h200, 2026-12-02: 420 s and 430 s against 181 s + 238 s)
  # training is not bit for bit (cuDNN attention's backward), so rows of two calls pair only on
  # one model: EXPORT_MODELS=1 returns each trained model as $OUT/model-<family>.tgz.partNN
  # (a returned file is at most 16 MiB), and a call that carries those parts in .models/
  # restores the model instead of training a new one
  declare -A needed=()
  for pair in "${jobs[@]}"; do needed[${pair% *}]=1; done
  for family in "${!needed[@]}"; do
    model=$wd/model-$family
    if [ ! -f "$model/config.json" ] && ls .models/model-$family.tgz.part* >/dev/null 2>&1; then
      cat .models/model-$family.tgz.part* | tar xzf - -C "$wd" &&
        echo "model-$family restored from .models at ${SECONDS}s" >> "$OUT/driver.log"
    fi
    if [ -f "$model/config.json" ]; then
      echo "model-$family reused" >> "$OUT/driver.log"; continue
    fi
    python integration/train_dllm.py --preset "${presets[$family]}" --device "${DEVICE:-cuda}" \
      --out "$model" > "$wd/train-$family.log" 2>&1
    echo "model-$family trained at ${SECONDS}s (exit $?)" >> "$OUT/driver.log"
    if [ -n "${EXPORT_MODELS:-}" ] && [ -f "$model/config.json" ]; then
      tar czf - -C "$wd" "model-$family" | split -b 15M -d - "$OUT/model-$family.tgz.part"
    fi
  done
fi
deadline=$(( ${BUDGET:-560} - SECONDS ))
echo "jobs start at ${SECONDS}s, deadline ${deadline}s from now" >> "$OUT/driver.log"
declare -A pids=()
for pair in "${jobs[@]}"; do
  family=${pair% *} job=${pair#* } name=${pair/ /-}
  model=$wd/model-$family work=$scratch/w-$name
  if [ -z "${CHECK_ONLY:-}" ] && [ ! -f "$model/config.json" ]; then  # its training failed
    echo "== $name skipped: no model-$family ($wd/train-$family.log)" >> "$OUT/driver.log"; continue
  fi
  rm -rf "$work"; mkdir -p "$work"
  ln -s "$model" "$work/model-$family"; cp "$wd/train-$family.log" "$work/" 2>/dev/null
  case $job in
    learned) script=integration/learned_rotations_benchmark.sh ;;
    flat) script=integration/flatquant_benchmark.sh ;;
    *) script=integration/formats_benchmark.sh ;;
  esac
  # this job's rows and groups; the plain METHODS names learned rows (format jobs would fail it)
  methods_var=METHODS_${family}_$job groups_var=METHOD_GROUPS_${family}_$job
  methods=${!methods_var:-}
  if [ -z "$methods" ] && [ "$job" = learned ]; then methods=${METHODS:-}; fi
  groups=${!groups_var:-${METHOD_GROUPS:-1}}
  echo "== $name: METHODS=${methods:-(all)} METHOD_GROUPS=$groups" >> "$OUT/driver.log"
  FAMILIES=$family WORK_DIR=$work DEADLINE=$deadline FORMAT=$job METHODS=$methods \
    METHOD_GROUPS=$groups "$script" "$OUT/$name" \
    --eval-prompts "${EVAL_PROMPTS:-256}" --calibration-prompts 64 > "$work/driver.log" 2>&1 &
  pids[$name]=$!
done
status=0
declare -A rcs=()
for name in "${!pids[@]}"; do
  wait "${pids[$name]}"; rcs[$name]=$?; [ "${rcs[$name]}" = 0 ] || status=1
done
[ ${#pids[@]} = ${#jobs[@]} ] || status=1  # a job skipped for want of its model
echo "done at ${SECONDS}s" >> "$OUT/driver.log"
for pair in "${jobs[@]}"; do  # each job's own log (a job that failed early says why here)
  name=${pair/ /-}
  [ -n "${pids[$name]:-}" ] || continue
  echo "== $name (exit ${rcs[$name]})" >> "$OUT/driver.log"
  tail -n 20 "$scratch/w-$name/driver.log" >> "$OUT/driver.log"
done
if [ -z "${CHECK_ONLY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.used --format=csv >> "$OUT/driver.log" 2>&1 || true
fi
# one file for everything but driver.log: a device call returns at most 8 files, so more than
# five jobs would otherwise lose some
# (only what this script wrote: anything else already in $OUT stays where it is)
packed=()
for name in pip.log preflight.log; do [ -f "$OUT/$name" ] && packed+=("$name"); done
for pair in "${jobs[@]}"; do name=${pair/ /-}; [ -d "$OUT/$name" ] && packed+=("$name"); done
if [ ${#packed[@]} -gt 0 ]; then
  tar czf "$OUT/jobs.tgz" -C "$OUT" "${packed[@]}" && (cd "$OUT" && rm -rf "${packed[@]}")
fi
exit $status
