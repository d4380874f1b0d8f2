#!/usr/bin/env bash
# One W4A4 format's table on the reference models: RTN, GPTQ, the format's rotation variant +
# GPTQ, FAIR-Calib with uniform weights and FAIR-Calib (FP4: and the best baseline's tie-noise
# control, integration/recipes/*_equivalent.yaml), one process per seed on one GPU
# (integration/reference_benchmark.sh: FAMILIES, SEEDS, WORK_DIR, DEADLINE apply).
#   FORMAT=nvfp4|mxfp4|ag128|ag32|token integration/formats_benchmark.sh OUT_DIR [benchmark args]
# METHODS (space-separated) runs a subset of the format's rows; a name not among them fails.
# FP4 formats use no global rotation (their own recipes, fair_calib_nvfp4 / fair_calib_mxfp4)
# and, as the rotation variant, block Hadamards matched to the group (hadamard16 / hadamard32);
# int per-group activations (W4A4_G128_AG128/AG32_PACKED) keep QuaRot's rotations. Every
# variant is a one-field change of a shipped recipe (integration/recipe_variant.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source integration/recipe_variants.sh
format=${FORMAT:?set FORMAT to nvfp4, mxfp4, ag128, ag32 or token}
case $format in
  nvfp4 | mxfp4)
    scheme=${format^^}
    fair=fair_calib_$format
    rotated=$([ "$format" = nvfp4 ] && echo hadamard16_gptq_nvfp4 || echo hadamard32_gptq_mxfp4)
    ;;
  ag128 | ag32)
    scheme=W4A4_G128_${format^^}_PACKED
    fair=fair-calib-$format
    rotated=quarot+gptq-$format
    variant "$fair" fair_calib_w4a4 FAIRCalibModifier.scheme=$scheme
    variant "$rotated" quarot_gptq_w4a4 GPTQModifier.scheme=$scheme
    ;;
  token)
    scheme=W4A4_G128_PACKED fair=fair-calib rotated=quarot+gptq
    ;;
  *) echo "unknown FORMAT $format (nvfp4, mxfp4, ag128, ag32, token)" >&2; exit 2 ;;
esac
variant "rtn-$format" rtn_w4a4 QuantizationModifier.scheme=$scheme
variant "gptq-$format" gptq_w4a4 GPTQModifier.scheme=$scheme
if [ -f "recipes/$fair.yaml" ]; then  # a shipped per-format recipe: its name is the method
  extra+=(--recipe "$fair=recipes/$fair.yaml")
  parent=$fair
else
  parent=fair_calib_w4a4
fi
if [ -f "recipes/$rotated.yaml" ]; then extra+=(--recipe "$rotated=recipes/$rotated.yaml"); fi
uniform=(FAIRCalibModifier.use_token_weights=false)
[ "$parent" = fair_calib_w4a4 ] && [ "$format" != token ] && uniform+=(FAIRCalibModifier.scheme=$scheme)
variant "$fair-uniform" "$parent" "${uniform[@]}"
methods=("$rotated" "$fair" "$fair-uniform" "gptq-$format" "rtn-$format")
if [ "$format" = mxfp4 ]; then  # FAIR-Calib on the block Hadamards too (the better MXFP4 base)
  variant fair_calib_hadamard32_mxfp4-uniform fair_calib_hadamard32_mxfp4 \
    FAIRCalibModifier.use_token_weights=false
  extra+=(--recipe fair_calib_hadamard32_mxfp4=recipes/fair_calib_hadamard32_mxfp4.yaml)
  methods+=(fair_calib_hadamard32_mxfp4 fair_calib_hadamard32_mxfp4-uniform)
fi
if [ "$format" = nvfp4 ] || [ "$format" = mxfp4 ]; then
  # the tie-noise control: the format's best baseline (NVFP4: GPTQ, MXFP4: the block Hadamards
  # + GPTQ) on an equivalent model, seeded channel scales folded into up/down and v/o
  # (EquivalentRescaleModifier, no rotation); its flips minus the baseline's are chance
  best=$([ "$format" = nvfp4 ] && echo "gptq-$format" || echo "$rotated")
  extra+=(--recipe "$best-equivalent=integration/recipes/${best//-/_}_equivalent.yaml")
  methods+=("$best-equivalent")
  # learned rotations against FP4, last
  L=LearnedSpinQuantModifier
  variant "fair-calib-learned-$format" fair_calib_learned_w4a4 FAIRCalibModifier.scheme=$scheme
  variant "fair-calib-learned-$format-uniform" fair_calib_learned_w4a4 \
    FAIRCalibModifier.scheme=$scheme $L.token_weights=uniform FAIRCalibModifier.use_token_weights=false
  methods+=("fair-calib-learned-$format" "fair-calib-learned-$format-uniform")
fi
if [ -n "${METHODS:-}" ]; then  # a subset, in the order given, of this format's rows only: a
  # shipped name such as gptq passes the recipe check and would put an int W4A4 row here
  rows=" ${methods[*]} "
  read -r -a methods <<< "$METHODS"
  for m in "${methods[@]}"; do
    if [[ $rows != *" $m "* ]]; then
      echo "METHODS: $m is not a row of FORMAT=$format:$rows" >&2; exit 2
    fi
  done
fi
out=$1; shift
write_variants
exec integration/reference_benchmark.sh "$out" --methods "${methods[@]}" "${extra[@]}" "$@"
