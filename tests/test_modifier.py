"""FAIRCalibModifier (Stage II): weighted Hessian, quantized propagation, clipping, errors."""

from __future__ import annotations

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import active_session
from llmcompressor.modifiers.gptq import GPTQModifier
from pydantic import ValidationError

from fair_calib_llmc import FAIRCalibModifier

from .helpers import masked_states, saved


def _hessian(modifier, linear, x, weights):
    state = active_session().state
    state.loss_masks, state.current_batch_idx = ([weights] if weights is not None else None), 0
    modifier._module_names[linear] = "probe"
    modifier.calibrate_module(linear, (x,), None)
    return modifier._hessians[linear] / modifier._num_samples[linear]


@pytest.mark.unit
def test_weighted_hessian_matches_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)
    weights = torch.rand(2, 5) * 3
    fair = FAIRCalibModifier(scheme="W4A4")
    got = _hessian(fair, linear, x, weights)
    flat, w = x.reshape(-1, 16).double(), weights.reshape(-1).double()
    expected = 2 * (flat.T * w) @ flat / 2  # sum_t w_t x_t x_t^T, GPTQ's 2/n scaling
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_unit_weights_equal_gptq_hessian():
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(1, 7, 16)
    fair = _hessian(FAIRCalibModifier(scheme="W4A4"), linear, x, torch.ones(1, 7))
    gptq = GPTQModifier(scheme="W4A4")
    gptq.calibrate_module(linear, (x,), None)
    torch.testing.assert_close(fair, gptq._hessians[linear] / gptq._num_samples[linear])


@pytest.mark.unit
def test_zero_weight_token_has_no_effect():
    torch.manual_seed(2)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(1, 6, 16)
    weights = torch.ones(1, 6)
    weights[0, 3] = 0
    other = x.clone()
    other[0, 3] = torch.randn(16) * 100
    a = _hessian(FAIRCalibModifier(scheme="W4A4"), linear, x, weights)
    b = _hessian(FAIRCalibModifier(scheme="W4A4"), linear, other, weights)
    torch.testing.assert_close(a, b)


@pytest.mark.unit
def test_missing_token_weights_fail_with_the_fix():
    with pytest.raises(ValueError, match="use_loss_mask=True"):
        _hessian(FAIRCalibModifier(scheme="W4A4"), torch.nn.Linear(4, 4), torch.ones(1, 2, 4), None)


@pytest.mark.integration
@pytest.mark.parametrize("propagate", [True, False])
def test_propagation_feeds_layer_two_what_the_w4a4_model_computes(
    llada, tokenizer, calibration_texts, tmp_path, propagate
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=3)
    seen = []
    block = model.model.transformer.blocks[1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    modifier = FAIRCalibModifier(
        scheme="W4A4_G128_PACKED",
        ignore=[r"re:^model\.transformer\.ff_out$"],
        quantized_propagation=propagate,
    )
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=modifier,
        dataset=dataset,
        use_loss_mask=True,
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
    )
    calibrated_input = seen[0]
    seen.clear()
    model.config._attn_implementation = "eager"  # the pipeline calibrates with eager attention
    with torch.no_grad():
        model(input_ids=torch.tensor([dataset[0]["input_ids"]]))
    handle.remove()
    if propagate:
        torch.testing.assert_close(calibrated_input, seen[0], rtol=0, atol=1e-6)
    else:
        assert (calibrated_input - seen[0]).abs().max() > 1e-3


@pytest.mark.unit
def test_clipping_search_never_increases_weighted_error():
    torch.manual_seed(3)
    x = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    hessian = 2 * x.T @ x
    weight = torch.randn(32, 128)
    weight[:, 0] *= 20  # an outlier column makes min-max scales too coarse
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.observers import Observer

    args = preset_name_to_scheme("W4A4_CHANNEL_PACKED", ["Linear"]).weights
    linear = torch.nn.Linear(128, 32, bias=False)
    linear.weight.data = weight
    linear.quantization_scheme = preset_name_to_scheme("W4A4_CHANNEL_PACKED", ["Linear"])
    linear.weight_observer = Observer.load_from_registry(
        "memoryless_minmax", base_name="weight", args=args
    )
    linear.weight_observer(linear.weight)
    fair = FAIRCalibModifier(scheme="W4A4")
    fair._hessians[linear], fair._num_samples[linear] = hessian, torch.tensor(1.0)

    def error(lo, hi):
        scale, zp = calculate_qparams(lo, hi, args)
        e = weight - fake_quantize(weight, scale, zp, args)
        return ((e @ hessian) * e).sum()

    before = error(linear.weight_observer.min_vals, linear.weight_observer.max_vals)
    fair._search_clipping(linear)
    after = error(linear.weight_observer.min_vals, linear.weight_observer.max_vals)
    assert after < before


@pytest.mark.unit
def test_unknown_scheme_name():
    with pytest.raises(ValidationError, match="unknown scheme 'W3A5'"):
        FAIRCalibModifier(scheme="W3A5")


@pytest.mark.unit
def test_unknown_modifier_field_is_rejected():
    with pytest.raises(ValidationError, match="frontier_wieght"):
        FAIRCalibModifier(scheme="W4A4", frontier_wieght=2.0)


@pytest.mark.unit
def test_nan_activations_fail_with_the_layer_name():
    fair, linear = FAIRCalibModifier(scheme="W4A4"), torch.nn.Linear(4, 4)
    _hessian(fair, linear, torch.full((1, 2, 4), float("nan")), torch.ones(1, 2))
    with pytest.raises(FloatingPointError, match="NaN/Inf activations entered probe"):
        fair._check_finite_hessians([linear])
