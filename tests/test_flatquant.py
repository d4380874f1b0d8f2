"""FlatQuant-class Stage II: exact transforms in full precision, the modifier through
``quantize`` / ``oneshot``, exact reload, held-out learning, settings refused early."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.transform import TransformConfig
from llmcompressor.modifiers.transform.spinquant.mappings import SPINQUANT_MAPPING_REGISTRY
from llmcompressor.modifiers.transform.spinquant.norm_mappings import NORM_MAPPING_REGISTRY
from pydantic import ValidationError
from transformers import AutoModel

from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.pipeline import quantize
from fair_calib_llmc.recipe import load_recipe
from fair_calib_llmc.stage2.flatquant import FlatQuantModifier
from fair_calib_llmc.stage2.flatquant.clipping import MIN_CLIP_FACTOR, clip_weight
from fair_calib_llmc.stage2.flatquant.learner import split_batches, weighted_mse
from fair_calib_llmc.stage2.flatquant.online import SAVED_TYPE, hadamard_start
from fair_calib_llmc.stage2.flatquant.sites import layer_sites
from fair_calib_llmc.stage2.flatquant.transforms import LayerTransforms, transformed_forward
from fair_calib_llmc.stage2.learned_rotations.cayley import orthogonality_error
from fair_calib_llmc.stage2.learned_rotations.ste import ste_quantize

from .helpers import saved

pytestmark = pytest.mark.usefixtures("one_thread")

INT4_G16 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)


def _probe(model) -> torch.Tensor:
    x = torch.arange(3, 40)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(x).logits


def _random_transforms(sites, config, block: int, seed: int) -> LayerTransforms:
    """Transforms far from the identity: invertible blocks, scales, per-head matrices."""
    torch.manual_seed(seed)
    transforms = LayerTransforms(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        head_dim=sites.head_dim,
        kv_heads=sites.kv_heads,
        block=block,
        down_block=block,
        smooth=tuple(sites.norms),
    )
    with torch.no_grad():
        for p in transforms.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return transforms


def _flat_recipe(**fields) -> str:
    settings = {"block_size": 32, "epochs": 2, "token_weights": "frontier", **fields}
    lines = "\n".join(f"      {k}: {v}" for k, v in settings.items())
    return f"""
flat_stage:
  flat_modifiers:
    FlatQuantModifier:
      rotations: [R1, R2]
      transform_type: random-hadamard
{lines}
quant_stage:
  quant_modifiers:
    GPTQModifier:
      scheme: W4A4_G128_PACKED
      targets: [Linear]
"""


# --- plain maths ------------------------------------------------------------------------------
@pytest.mark.unit
def test_weighted_mse_weighs_tokens_and_split_holds_out_the_last_batches():
    out, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    assert weighted_mse(out, target, torch.tensor([[1.0, 0.0, 0.0]])) == 1.0
    assert weighted_mse(out, target, torch.tensor([[1.0, 3.0, 0.0]])) == (1 + 3 * 4) / 4
    assert split_batches(10, 0.1) == (list(range(9)), [9])
    assert split_batches(4, 0.1) == ([0, 1, 2], [3])  # at least one held out
    assert split_batches(1, 0.1) == ([0], [])  # nothing left to train on otherwise
    assert split_batches(5, 0.0) == (list(range(5)), [])


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_transformed_full_precision_layers_compute_the_original_model(
    family, llada, dream, tokenizer, tmp_path
):
    """Every fused part (weights, biases, norms, value/output) and every online block,
    written from random transforms far from the identity, leave the fp32 logits as they were
    (GQA: 2 key/value heads for 4 query heads); the training forward without quantization
    computes the same layer as the written one."""
    model = saved({"llada": llada, "dream": dream}[family], tokenizer, tmp_path / "fp")
    expected = _probe(model)
    name = type(model).__name__
    modifier = FlatQuantModifier(
        block_size=32,
        mappings=SPINQUANT_MAPPING_REGISTRY[name],
        norm_mappings=NORM_MAPPING_REGISTRY[name],
    )
    model.transform_config = TransformConfig(config_groups={})
    x = torch.randn(2, 5, model.config.hidden_size)
    for index, (layer_name, _) in enumerate(named_decoder_layers(model)):
        sites = layer_sites(model, layer_name, modifier.mappings, modifier.norm_mappings)
        assert set(sites.norms) == {"attn", "mlp"} and sites.kv_heads == 2
        transforms = _random_transforms(sites, model.config, 32, seed=index)
        query = sites.readers["attn"][0]
        module = model.get_submodule(query)
        training = transformed_forward(module, sites.roles[query], transforms, None, None)
        before = module.weight.detach().clone()
        with torch.no_grad():
            reference = module(x)
            torch.testing.assert_close(training(x), reference, atol=1e-4, rtol=1e-4)
            modifier._write_layer(model, index, sites, transforms, {}, {})
        assert (module.weight - before).abs().max() > 0.1  # the weights did move
    torch.testing.assert_close(_probe(model), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard"])
def test_the_hadamard_start_is_orthonormal(kind):
    """The down block's start (and any Hadamard start of a learned block)."""
    q = hadamard_start(16, kind)
    assert orthogonality_error(q) < 1e-12
    assert torch.allclose(q.abs(), torch.full_like(q, 0.25))


# --- learned weight clipping: the clamp and its export through the scales ----------------------
@pytest.mark.unit
def test_clipped_weights_carry_the_clipping_in_the_observers_scales():
    """Clamping each group to ``c max|w|`` is the clipped quantizer: llm-compressor's min-max
    observer (what GPTQ and RTN use) then finds scales ``c max|w| / 7.5``, and the quantized
    values are the unclamped weight's under those scales (but the group's negative extreme,
    which sits on the int4 code's -7.5 rounding tie)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor.observers import Observer

    torch.manual_seed(0)
    weight = torch.randn(6, 64)
    factors = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, MIN_CLIP_FACTOR])[:, None]
    clipped = clip_weight(weight, factors, INT4_G16)
    observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=INT4_G16)
    observer(clipped)
    scale = observer.get_qparams()["scale"]
    peaks = weight.unflatten(-1, (-1, 16)).abs().amax(-1)
    assert torch.allclose(scale, factors * peaks / 7.5, rtol=1e-6)
    values = fake_quantize(clipped, scale, None, INT4_G16)
    unclamped = fake_quantize(weight, scale, None, INT4_G16)
    bound = (factors * peaks).repeat_interleave(16, -1)
    off_tie = weight > -bound + 1e-6
    assert torch.equal(values[off_tie], unclamped[off_tie])
    assert (clipped != weight).any() and torch.equal(clipped[0], weight[0])  # c = 1: untouched


@pytest.mark.unit
def test_clipping_gradients_are_lsq_s():
    """A clamped weight passes no gradient to itself; the factors get the gradient of the
    range (every row that clips)."""
    torch.manual_seed(0)
    weight = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    factors = torch.full((4, 1), 0.7, dtype=torch.float64, requires_grad=True)
    quantized = ste_quantize(
        torch.nn.Linear(32, 4), clip_weight(weight, factors, INT4_G16), INT4_G16
    )
    (quantized * torch.randn_like(quantized)).sum().backward()
    peak = weight.detach().unflatten(-1, (-1, 16)).abs().amax(-1).repeat_interleave(16, -1)
    clamped = weight.detach().abs() > 0.7 * peak
    below_peak = weight.detach().abs() < peak  # the peak itself sets the range: it has one
    assert (clamped & below_peak).any()
    assert torch.all(weight.grad[clamped & below_peak] == 0)
    assert torch.all(weight.grad[~clamped] != 0)
    assert torch.all(factors.grad != 0)


# --- the modifier -----------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_flatquant_checkpoint_reloads_exactly_and_learns_out_of_sample(
    family, llada, dream, tokenizer, calibration_texts, tmp_path
):
    model = saved({"llada": llada, "dream": dream}[family], tokenizer, tmp_path / "fp")
    recipe = load_recipe(_flat_recipe(holdout=0.25, learn_weight_clipping="true"))
    result = quantize(
        model, tokenizer, recipe, calibration_texts, max_prompts=8, output_dir=tmp_path / "q"
    )
    report = recipe.modifiers[0].learning_report
    assert report["heldout_batches"] >= 1
    assert report["train"]["after"] < report["train"]["before"]
    assert report["heldout"]["after"] < report["heldout"]["before"]  # out of sample too
    groups = result.model.transform_config.config_groups
    layers = model.config.num_hidden_layers
    learned = [g for g in groups if g.startswith("flatquant_")]
    assert len(learned) == 3 * layers and {groups[g].type for g in learned} == {SAVED_TYPE}
    assert not any(group.startswith("R4") for group in groups)
    expected = _probe(result.model)
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert torch.equal(_probe(reloaded), expected)


@pytest.mark.unit
def test_bad_flatquant_settings_fail_in_one_line():
    with pytest.raises(ValidationError, match="token_weights"):
        FlatQuantModifier(token_weights="frontiers")
    with pytest.raises(ValidationError, match="holdout"):
        FlatQuantModifier(holdout=1.0)
    with pytest.raises(ValidationError, match="inputs"):
        FlatQuantModifier(inputs="quant")
    with pytest.raises(ValidationError, match="drop R4 from rotations"):
        FlatQuantModifier(rotations=["R1", "R2", "R4"])


@pytest.mark.integration
def test_a_block_that_does_not_divide_the_width_fails_before_learning(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    recipe = load_recipe(_flat_recipe(block_size=48))
    with pytest.raises(ValueError, match=r"block_size 48 does not divide the width 128"):
        quantize(model, tokenizer, recipe, calibration_texts, max_prompts=2)


@pytest.mark.integration
def test_activation_clipping_learns_a_ratio_and_is_not_written(
    llada, tokenizer, calibration_texts, tmp_path
):
    """The diagnostic: ratios below 1 are learned and reported, the written layer's objective
    (without them) is reported beside, and the checkpoint still reloads exactly."""
    model = saved(llada, tokenizer, tmp_path / "fp")
    recipe = load_recipe(_flat_recipe(activation_clipping="true", lr=0.01))
    result = quantize(
        model, tokenizer, recipe, calibration_texts, max_prompts=4, output_dir=tmp_path / "q"
    )
    layer = recipe.modifiers[0].learning_report["layers"][0]
    assert set(layer["activation_clip"]) == {"attn", "mlp", "down"}
    assert all(0 < r < 1 for r in layer["activation_clip"].values())
    assert layer["written"]["train"] != layer["after"]["train"]
    expected = _probe(result.model)
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert torch.equal(_probe(reloaded), expected)


@pytest.mark.integration
def test_frontier_weights_without_a_loss_mask_fail_before_learning(
    llada, tokenizer, calibration_texts, tmp_path
):
    from llmcompressor import oneshot

    from .helpers import masked_states

    model = saved(llada, tokenizer, tmp_path / "fp")
    unweighted = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    unweighted = unweighted.remove_columns("loss_mask")
    with pytest.raises(ValueError, match=r"FlatQuantModifier\(token_weights: frontier\) got no"):
        oneshot(
            model=model,
            processor=tokenizer,
            recipe=load_recipe(_flat_recipe()),
            dataset=unweighted,
        )


@pytest.mark.integration
def test_flatquant_refuses_torchrun_before_learning(
    llada, tokenizer, calibration_texts, tmp_path, monkeypatch
):
    import fair_calib_llmc.stage2.flatquant.base as flat_base

    monkeypatch.setattr(flat_base, "rank_and_world", lambda: (0, 2))
    model = saved(llada, tokenizer, tmp_path / "fp")
    with pytest.raises(ValueError, match="learns in one process only"):
        quantize(model, tokenizer, load_recipe(_flat_recipe()), calibration_texts, max_prompts=2)
