#!/usr/bin/env bash
# Issue 25 on the reference models: FlatQuant-class Stage II (flatquant_w4a4, uniform weights on
# teacher-forced text), FAIR-Calib as published (fair_calib_flatquant_w4a4: the same with the
# static position prior), FlatQuant's tie-noise control, the pipelines shipped before
# (QuaRot+GPTQ, SpinQuant-class learned, fair_calib_learned_w4a4) and the ablations: masked
# states in place of text (each with its uniform ablation), the prior's terms and schedule,
# the quantized input stream. One run per model (integration/reference_benchmark.sh).
#   integration/flatquant_benchmark.sh OUT_DIR [integration/benchmark.py arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
source integration/recipe_variants.sh
F=FlatQuantModifier
variant flatquant-equivalent flatquant_w4a4 $F.equivalent_perturbation=0.001
variant flatquant-qinputs flatquant_w4a4 $F.inputs=quantized
variant fair-calib-flat-qinputs fair_calib_flatquant_w4a4 $F.inputs=quantized
for name in states hits masked late; do
  extra+=(--recipe "fair-calib-flat-$name=integration/recipes/fair_calib_flatquant_$name.yaml")
done
extra+=(--recipe flatquant-states=integration/recipes/flatquant_states.yaml)
# in order of what the comparison needs first (a DEADLINE cut keeps the rows already done);
# METHODS (space-separated) runs a subset
methods=(quarot+gptq flatquant fair-calib-flat flatquant-equivalent fair-calib-learned
  fair-calib-flat-states flatquant-states fair-calib-flat-hits fair-calib-flat-masked
  fair-calib-flat-late flatquant-qinputs fair-calib-flat-qinputs spinquant-learned+gptq)
if [ -n "${METHODS:-}" ]; then read -r -a methods <<< "$METHODS"; fi
out=$1; shift
write_variants
exec integration/reference_benchmark.sh "$out" --methods "${methods[@]}" "${extra[@]}" "$@"
