"""Every W4A4 format an engine serves: the per-format recipes and --scheme round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.io.reload import load_quantized, probe_logits
from fair_calib_llmc.pipeline import quantize
from fair_calib_llmc.recipe import RecipeError, load_recipe

from .helpers import saved

#: (recipe, --scheme): the FP4 recipes as shipped, int per-group activations through --scheme
FORMAT_RUNS = [
    ("fair_calib_nvfp4", None),
    ("hadamard16_gptq_nvfp4", None),
    ("fair_calib_mxfp4", None),
    ("fair_calib_hadamard32_mxfp4", None),
    ("hadamard32_gptq_mxfp4", None),
    ("fair_calib_quarot_w4a4", "W4A4_G128_AG128_PACKED"),
    ("quarot_gptq_w4a4", "W4A4_G128_AG32_PACKED"),
    # learned rotations against FP4 (NVFP4's global scale in the loop, MXFP4's E8M0 blocks)
    ("fair_calib_w4a4", "NVFP4"),
    ("fair_calib_w4a4", "MXFP4"),
    # FlatQuant-class transforms against FP4 (the published FAIR-Calib recipe)
    ("fair_calib_flatquant_w4a4", "NVFP4"),
    ("flatquant_w4a4", "MXFP4"),
]

#: fields a row runs with instead of the shipped ones: what is tested is the format's round
#: trip, which a few learning steps exercise as well as the shipped hundred
CHEAPER = {
    "fair_calib_w4a4": {"LearnedSpinQuantModifier.steps": 3},
    "fair_calib_flatquant_w4a4": {"FlatQuantModifier.epochs": 1},
    "flatquant_w4a4": {"FlatQuantModifier.epochs": 1},
}


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe, scheme", FORMAT_RUNS)
def test_every_format_reloads_with_identical_logits(
    recipe, scheme, dtype, llada, tokenizer, calibration_texts, tmp_path
):
    saved(llada, tokenizer, tmp_path / "fp")
    model, _ = load_model(tmp_path / "fp", dtype=dtype, device="cpu")
    result = quantize(
        model,
        tokenizer,
        recipe,
        calibration_texts,
        max_prompts=2,
        scheme=scheme,
        overrides=CHEAPER.get(recipe),
        output_dir=tmp_path / "q",
    )
    for path, value in CHEAPER.get(recipe, {}).items():
        modifier, field = path.split(".")
        ran = [m for m in result.modifiers if type(m).__name__ == modifier]
        assert [getattr(m, field) for m in ran] == [value]
    quantized = [m for m in result.model.modules() if hasattr(m, "quantization_scheme")]
    suffix = recipe.rsplit("_", 1)[1]
    wanted = scheme or {"nvfp4": "NVFP4", "mxfp4": "MXFP4"}[suffix]
    acts = quantized[0].quantization_scheme.input_activations
    assert acts is not None and acts.num_bits == 4
    assert load_recipe(recipe, scheme=scheme).modifiers[-1].scheme == wanted
    expected = probe_logits(result.model)
    assert torch.equal(probe_logits(load_quantized(tmp_path / "q", dtype=dtype)), expected)
    if dtype == torch.bfloat16:  # plain transformers too (FP4 unpacks to bf16 whatever dtype)
        plain = AutoModel.from_pretrained(tmp_path / "q", dtype=dtype).eval()
        assert torch.equal(probe_logits(plain), expected)


#: block-Hadamard R4 recipes: upstream's one block for R1 and R4, and the fused R4 alone
#: (R1 stays a fused random-hadamard, R4 the type vLLM runs with its Walsh-Hadamard kernel)
BLOCK_R4 = {
    "transform_block_size": ("hadamard", "transform_block_size: 32", "hadamard"),
    "r4_block_size": (
        "random-hadamard",
        "r4_transform_type: hadamard\n      r4_block_size: 32",
        "random-hadamard",
    ),
}


def _block_r4_recipe(transform_type: str, r4_fields: str) -> str:
    return f"""
rotate_stage:
  rotate_modifiers:
    ExactSpinQuantModifier:
      rotations: [R1, R2, R4]
      transform_type: {transform_type}
      {r4_fields}
gptq_stage:
  gptq_modifiers:
    GPTQModifier:
      scheme: W4A4_G128_PACKED
      targets: [Linear]
"""


@pytest.mark.integration
@pytest.mark.parametrize("variant", list(BLOCK_R4))
def test_a_block_hadamard_r4_checkpoint_reloads_exactly(
    variant, llada, tokenizer, calibration_texts, tmp_path
):
    """type hadamard with head_dim: the block transform vLLM runs with its fused kernel."""
    transform_type, r4_fields, r1_type = BLOCK_R4[variant]
    model = saved(llada, tokenizer, tmp_path / "fp")
    recipe = _block_r4_recipe(transform_type, r4_fields)
    result = quantize(
        model, tokenizer, recipe, calibration_texts, max_prompts=2, output_dir=tmp_path / "q"
    )
    groups = result.model.transform_config.config_groups
    assert (groups["R4"].type, groups["R4"].head_dim) == ("hadamard", 32)
    assert groups["R1"].type == r1_type
    expected = probe_logits(result.model)
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert torch.equal(probe_logits(reloaded), expected)


@pytest.mark.integration
@pytest.mark.parametrize(
    "r4_fields, message",
    [
        ("r4_transform_type: hadamard\n      r4_block_size: 96", "96 with type hadamard is not"),
        ("r4_block_size: 100", "r4_block_size 100 does not divide"),
    ],
)
def test_an_r4_block_that_cannot_work_fails_before_any_rotation(
    r4_fields, message, llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        quantize(
            model,
            tokenizer,
            _block_r4_recipe("random-hadamard", r4_fields),
            calibration_texts,
            max_prompts=2,
        )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.unit
def test_r4_options_without_r4_fail_at_once():
    from fair_calib_llmc.stage2.learned_rotations import ExactSpinQuantModifier

    with pytest.raises(ValueError, match="R4 is not in rotations"):
        ExactSpinQuantModifier(rotations=["R1", "R2"], r4_block_size=32)


@pytest.mark.unit
def test_scheme_replaces_every_quantizing_modifiers_scheme():
    recipe = load_recipe("fair_calib_w4a4", scheme="nvfp4")
    assert [getattr(m, "scheme", None) for m in recipe.modifiers] == [None, "NVFP4"]


@pytest.mark.unit
@pytest.mark.parametrize(
    "recipe, scheme, message",
    [
        ("gptq_w4a4", "W4A5", "unknown scheme 'W4A5'; use one of .*NVFP4"),
        (
            "r_stage:\n  r_modifiers:\n    ExactSpinQuantModifier:\n      rotations: [R1]\n",
            "NVFP4",
            "no modifier has a scheme: field",
        ),
        (
            "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      config_groups: {}\n",
            "NVFP4",
            "spells out config_groups",
        ),
    ],
)
def test_a_scheme_that_cannot_apply_fails_in_one_line(recipe, scheme, message):
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(recipe, scheme=scheme)
    assert "\n" not in str(error.value)
