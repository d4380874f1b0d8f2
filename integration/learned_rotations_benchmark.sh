#!/usr/bin/env bash
# Stage II v3 on the reference models: QuaRot + GPTQ, its tie-noise control, learned rotations
# (the SpinQuant-class baseline and FAIR-Calib, with and without a learned R4) and the
# ablations that isolate each choice, all in one run per model
# (integration/reference_benchmark.sh: one process per seed on one GPU).
#   integration/learned_rotations_benchmark.sh OUT_DIR [integration/benchmark.py arguments...]
# Ablation recipes are written from the shipped ones by integration/recipe_variant.py, so each
# differs from its parent in the named fields only.
set -euo pipefail
cd "$(dirname "$0")/.."
source integration/recipe_variants.sh
L=LearnedSpinQuantModifier
variant quarot+gptq-equivalent quarot_gptq_w4a4 ExactSpinQuantModifier.equivalent_perturbation=0.001
variant learned-kl-frontier+gptq spinquant_learned_gptq_w4a4 $L.token_weights=frontier
variant learned-mse-uniform+gptq spinquant_learned_gptq_w4a4 $L.objective=layer_mse
variant learned-mse-frontier+gptq spinquant_learned_gptq_w4a4 $L.objective=layer_mse \
  $L.token_weights=frontier
variant fair-calib-learned-uniform fair_calib_learned_w4a4 $L.token_weights=uniform \
  FAIRCalibModifier.use_token_weights=false
# only Stage II's weights uniform (the rotations still learn on frontier weights): isolates
# where the uniform ablation's gap comes from
variant fair-calib-learned-stage2-uniform fair_calib_learned_w4a4 \
  FAIRCalibModifier.use_token_weights=false
variant fair-calib-learned-r1 fair_calib_learned_w4a4 "$L.learn=[R1]"
variant fair-calib-learned-kl fair_calib_learned_w4a4 $L.objective=output_kl
variant fair-calib-learned-w4a4-loop fair_calib_learned_w4a4 $L.weights_in_loop=true
# the frontier weights' strength: the shipped frontier_weight 4 puts ~8% of the weight mass on
# the frontier tokens, and the weighted objective is then the uniform one rescaled
# (integration/weighting_diagnosis.py); 16 and 64 put more there
variant fair-calib-learned-fw16 fair_calib_learned_w4a4 \
  FAIRCalibModifier.stage1.prior.frontier_weight=16
variant fair-calib-learned-fw64 fair_calib_learned_w4a4 \
  FAIRCalibModifier.stage1.prior.frontier_weight=64
# the weights' share of the flips after learned rotations: full-precision weights, int4
# activations (the ceiling of any weight-side method, learnable weight clipping included)
extra+=(--recipe learned-w16a4=integration/recipes/learned_rotations_w16a4.yaml)
# learned weight clipping (one factor per output channel, exported through the weight
# scales); it needs the weights in the loop, so `fair-calib-learned-w4a4-loop` (the same
# without clipping) isolates it; the GPTQ row exports the clipping exactly (FAIR-Calib's
# Stage II moves the weights towards its least-squares target before the scales are set)
variant fair-calib-learned-lwc fair_calib_learned_w4a4 $L.weights_in_loop=true \
  $L.learn_weight_clipping=true
variant fair-calib-learned-lwc-uniform fair_calib_learned_w4a4 $L.weights_in_loop=true \
  $L.learn_weight_clipping=true $L.token_weights=uniform FAIRCalibModifier.use_token_weights=false
variant learned-mse-frontier-lwc+gptq spinquant_learned_gptq_w4a4 $L.objective=layer_mse \
  $L.token_weights=frontier $L.weights_in_loop=true $L.learn_weight_clipping=true
# the learned down-projection transform (R4) in place of the fixed Hadamard, two block sizes
variant fair-calib-learned-r4 fair_calib_learned_w4a4 "$L.learn=[R1, R2, R4]"
variant fair-calib-learned-r4-uniform fair_calib_learned_w4a4 "$L.learn=[R1, R2, R4]" \
  $L.token_weights=uniform FAIRCalibModifier.use_token_weights=false
variant fair-calib-learned-r4-512 fair_calib_learned_w4a4 "$L.learn=[R1, R2, R4]" \
  $L.r4_block_size=512
# the LLaDA reference's whole MLP width (Dream's 1536 is not a multiple: that row fails there)
variant fair-calib-learned-r4-1024 fair_calib_learned_w4a4 "$L.learn=[R1, R2, R4]" \
  $L.r4_block_size=1024
# the fixed R4 as the Hadamard engines fuse (Sylvester blocks of 128, vLLM's hadacore kernel)
# in place of the dense random-hadamard over the whole width; R1 / R2 stay random-hadamard
variant quarot+gptq-r4-hadamard128 quarot_gptq_w4a4 ExactSpinQuantModifier.r4_transform_type=hadamard \
  ExactSpinQuantModifier.r4_block_size=128
variant fair-calib-learned-r4-hadamard128 fair_calib_learned_w4a4 $L.r4_transform_type=hadamard \
  $L.r4_block_size=128
# in order of what the comparison needs first (a DEADLINE cut keeps the rows already done);
# METHODS (space-separated) runs a subset
methods=(quarot+gptq fair-calib-learned fair-calib-learned-uniform spinquant-learned+gptq
  quarot+gptq-equivalent fair-calib-learned-stage2-uniform learned-w16a4 fair-calib-learned-fw16
  quarot+gptq-r4-hadamard128 fair-calib-learned-r4-hadamard128 fair-calib-learned-fw64
  fair-calib-learned-r4 fair-calib-learned-r4-uniform
  fair-calib-learned-r4-512 fair-calib-learned-r4-1024 learned-mse-frontier+gptq learned-mse-uniform+gptq
  learned-kl-frontier+gptq fair-calib-learned-kl fair-calib-learned-r1
  fair-calib-learned-w4a4-loop fair-calib-learned-lwc fair-calib-learned-lwc-uniform
  learned-mse-frontier-lwc+gptq)
if [ -n "${METHODS:-}" ]; then read -r -a methods <<< "$METHODS"; fi
out=$1; shift
write_variants
exec integration/reference_benchmark.sh "$out" --methods "${methods[@]}" "${extra[@]}" "$@"
