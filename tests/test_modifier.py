"""FAIR-Calib Stage II: statistics against hand-written references, the FP stream, batching,
W4A4 propagation, and fail-fast errors."""

from __future__ import annotations

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.core import active_session
from pydantic import ValidationError
from transformers import AutoModel

from fair_calib_llmc import FAIRCalibModifier, quantize
from fair_calib_llmc.models.configs import LM_HEAD

from .helpers import masked_states, saved


def _w4a4_linear(in_features=16, out_features=8, seed=0):
    """A linear with compressed-tensors' W4A4 scheme attached (int4 dynamic per-token input)."""
    from compressed_tensors.quantization import (
        initialize_module_for_quantization,
        preset_name_to_scheme,
    )

    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    initialize_module_for_quantization(linear, preset_name_to_scheme("W4A4", ["Linear"]))
    return linear


def _int4_per_token(x):
    """Reference int4 symmetric per-token fake quantization, written out by hand."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 7.5  # compressed-tensors: range [-8, 7]
    return (x / scale).round().clamp(-8, 7) * scale


def _statistics(modifier, linear, batches):
    """Feed ``(x_fp, x_q, loss_mask)`` batches through the modifier's hooks."""
    state = active_session().state
    state.loss_masks = [w for _, _, w in batches] if batches[0][2] is not None else None
    modifier._module_names[linear] = "probe"
    for index, (x_fp, x_q, _) in enumerate(batches):
        state.current_batch_idx = index
        modifier._fp_inputs[linear] = x_fp
        modifier.calibrate_module(linear, (x_q,), None)
    n = modifier._num_samples[linear]
    return modifier._hessians[linear] / n, modifier._cross[linear] / n


def _fp_states(model, dataset, rows):
    with torch.no_grad():
        ids = torch.tensor(dataset[:rows]["input_ids"])
        return model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.unit
def test_statistics_pair_fp_targets_with_quantized_inputs_and_token_weights():
    linear = _w4a4_linear()
    torch.manual_seed(1)
    x_fp, x_q, weights = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.rand(2, 5) * 3
    hessian, cross = _statistics(FAIRCalibModifier(scheme="W4A4"), linear, [(x_fp, x_q, weights)])
    ref_q = _int4_per_token(x_q).reshape(-1, 16).double()
    ref_fp, w = x_fp.reshape(-1, 16).double(), weights.reshape(-1).double()
    # GPTQ's scaling: 2/n with n counting sequences (2 here)
    torch.testing.assert_close(hessian.double(), (ref_q.T * w) @ ref_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cross.double(), (ref_fp.T * w) @ ref_q, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_uniform_ablation_really_turns_the_weights_off():
    torch.manual_seed(2)
    batches = [(torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.rand(1, 6) * 5)]
    ones = [(x, q, torch.ones_like(w)) for x, q, w in batches]
    off = _statistics(
        FAIRCalibModifier(scheme="W4A4", use_token_weights=False), _w4a4_linear(), batches
    )
    unit = _statistics(FAIRCalibModifier(scheme="W4A4"), _w4a4_linear(), ones)
    on = _statistics(FAIRCalibModifier(scheme="W4A4"), _w4a4_linear(), batches)
    torch.testing.assert_close(off, unit)
    assert (on[0] - off[0]).abs().max() > 1e-2


@pytest.mark.unit
def test_zero_weight_token_has_no_effect():
    torch.manual_seed(3)
    x = torch.randn(1, 6, 16)
    weights = torch.ones(1, 6)
    weights[0, 3] = 0
    other = x.clone()
    other[0, 3] = torch.randn(16) * 100
    a = _statistics(FAIRCalibModifier(scheme="W4A4"), _w4a4_linear(), [(x, x, weights)])
    b = _statistics(FAIRCalibModifier(scheme="W4A4"), _w4a4_linear(), [(other, other, weights)])
    torch.testing.assert_close(a, b)


@pytest.mark.unit
def test_fp_target_is_the_weighted_least_squares_weight():
    from fair_calib_llmc.stage2.reconstruction import fp_target_weight

    torch.manual_seed(4)
    x = torch.randn(400, 12)
    x_q = x + 0.3 * torch.randn(400, 12)
    w = torch.rand(400) * 4
    weight = torch.randn(6, 12)
    hessian = 2 * (x_q.T * w) @ x_q
    cross = 2 * (x.T * w) @ x_q
    got = fp_target_weight(weight, cross, hessian, dampening_frac=0.0)
    root = w.sqrt()[:, None]
    expected = torch.linalg.lstsq(root * x_q, root * x @ weight.T).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # damping pulls towards W, never away: identical streams give W back exactly
    same = fp_target_weight(weight, 2 * x.T @ x, 2 * x.T @ x, dampening_frac=0.01)
    torch.testing.assert_close(same, weight, rtol=1e-4, atol=1e-4)
    assert fp_target_weight(weight, cross, hessian, strength=0.0).equal(weight)


@pytest.mark.unit
def test_weighted_and_uniform_fits_differ_where_the_frontier_differs():
    """Two token populations need different corrections; the weighted fit serves the
    heavily weighted one (the "frontier") better than the uniform fit does."""
    from fair_calib_llmc.stage2.reconstruction import fp_target_weight

    torch.manual_seed(5)
    x = torch.randn(2, 200, 12)
    gain = torch.tensor([1.0, 0.6])[:, None, None]  # population 1's quantized input is damped
    x_q = x * gain
    frontier = torch.tensor([[0.1], [10.0]]).expand(2, 200)
    weight = torch.randn(6, 12)

    def fit(use_weights):
        linear = torch.nn.Linear(12, 6, bias=False)
        linear.weight.data = weight.clone()
        modifier = FAIRCalibModifier(scheme="W4A4", use_token_weights=use_weights)
        batches = [(x[i : i + 1], x_q[i : i + 1], frontier[i : i + 1]) for i in range(2)]
        hessian, cross = _statistics(modifier, linear, batches)
        return fp_target_weight(weight, cross, hessian, dampening_frac=0.0)

    def frontier_error(q):
        return ((x_q[1] @ q.T - x[1] @ weight.T) ** 2).mean()

    weighted, uniform = fit(True), fit(False)
    assert frontier_error(weighted) < 0.1 * frontier_error(uniform)


@pytest.mark.unit
def test_missing_token_weights_fail_with_the_fix():
    with pytest.raises(ValueError, match="use_loss_mask=True"):
        _statistics(
            FAIRCalibModifier(scheme="W4A4"),
            _w4a4_linear(4, 4),
            [(torch.ones(1, 2, 4), torch.ones(1, 2, 4), None)],
        )


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
    fair, linear = FAIRCalibModifier(scheme="W4A4"), _w4a4_linear(4, 4)
    nan = torch.full((1, 2, 4), float("nan"))
    _statistics(fair, linear, [(nan, nan, torch.ones(1, 2))])
    with pytest.raises(FloatingPointError, match="NaN/Inf activations entered probe"):
        fair._check_finite_hessians([linear])


@pytest.mark.integration
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fp_stream_is_the_full_precision_models_hidden_states(
    llada, tokenizer, calibration_texts, tmp_path, batch_size
):
    """Stage II's second stream carries what the unquantized model computes, layer by layer,
    while the pipeline's own stream carries the quantized model's activations."""
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    model.config._attn_implementation = "eager"  # the pipeline calibrates with eager attention
    reference = _fp_states(model, dataset, batch_size)
    modifier = FAIRCalibModifier(scheme="W4A4_G128_PACKED", ignore=[LM_HEAD])
    seen = {}
    original = modifier._cache_layer_input

    def spy(layer, args, kwargs):
        original(layer, args, kwargs)
        if active_session().state.current_batch_idx == 0:
            seen[layer] = (args[0].clone(), modifier._fp_hidden[(layer, 0)].clone())

    object.__setattr__(modifier, "_cache_layer_input", spy)
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=modifier,
        dataset=dataset,
        use_loss_mask=True,
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
        batch_size=batch_size,
    )
    blocks = list(model.model.transformer.blocks)
    assert [b in seen for b in blocks] == [True, True]
    quantized_input, fp_output = seen[blocks[1]]
    torch.testing.assert_close(seen[blocks[0]][1], reference[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fp_output, reference[2], rtol=1e-4, atol=1e-4)
    assert (quantized_input - reference[1]).abs().max() > 1e-3  # W4A4 error of layer 0


@pytest.mark.integration
def test_batched_calibration_gives_the_same_statistics(
    dream, tokenizer, calibration_texts, tmp_path, monkeypatch
):
    """States are batched through the layers (same length: nothing padded or cut); the FP
    stream, token weights and statistics must line up row by row, so batching changes only
    the order of float sums. (The checkpoints themselves may differ: W4A4 GPTQ roundings
    flip on float-level differences of the Hessian.)"""
    import fair_calib_llmc.stage2.modifier as modifier_module

    saved(dream, tokenizer, tmp_path / "fp")
    statistics = {}

    def spy(weight, cross, hessian, **kwargs):
        statistics.setdefault(batch_size, []).append((cross.clone(), hessian.clone()))
        return original(weight, cross, hessian, **kwargs)

    original = modifier_module.fp_target_weight
    monkeypatch.setattr(modifier_module, "fp_target_weight", spy)
    for batch_size in (1, 4):
        model = AutoModel.from_pretrained(tmp_path / "fp", dtype=torch.float32).eval()
        quantize(
            model,
            tokenizer,
            "fair_calib_quarot_w4a4",
            calibration_texts,
            max_prompts=4,
            batch_size=batch_size,
        )
    assert len(statistics[1]) == len(statistics[4]) == 2 * 7  # layers x linears
    # layer 0's q/k/v only: every later linear sees a quantized stream that GPTQ's roundings
    # (of earlier layers, or of the same layer's earlier groups) already changed
    first_group = zip(statistics[1][:3], statistics[4][:3], strict=True)
    for (cross_1, hessian_1), (cross_4, hessian_4) in first_group:
        torch.testing.assert_close(
            hessian_4, hessian_1, rtol=2e-3, atol=2e-3 * hessian_1.abs().max()
        )
        torch.testing.assert_close(cross_4, cross_1, rtol=2e-3, atol=2e-3 * cross_1.abs().max())


@pytest.mark.integration
def test_propagation_feeds_layer_two_what_the_w4a4_model_computes(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=3)
    seen = []
    block = model.model.transformer.blocks[1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    modifier = FAIRCalibModifier(scheme="W4A4_G128_PACKED", ignore=[LM_HEAD])
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=modifier,
        dataset=dataset,
        use_loss_mask=True,
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
    )
    calibrated_input = seen[0]  # the FP stream calls layer.forward: no hook sees it
    seen.clear()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        model(input_ids=torch.tensor([dataset[0]["input_ids"]]))
    handle.remove()
    torch.testing.assert_close(calibrated_input, seen[0], rtol=0, atol=1e-5)
    assert not any(
        h
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
        if getattr(h, "__name__", "") == "_propagate_quantized_input"
    )


def _deployed_statistics(model, tokenizer, dataset, tmp_path, scheme, **fields):
    """Calibrate with FAIR-Calib and return, per linear of interest, the Hessian and
    cross-covariance its fit used, next to the same statistics built by hand from what the
    *calibrated* model computes (quantization on, as deployed) and what the FP model computes.
    """
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    import fair_calib_llmc.stage2.modifier as modifier_module

    names = ("attn_out", "ff_out")  # o_proj and down: inputs built by the layer's own linears
    blocks = list(model.model.transformer.blocks)
    probes = {f"{i}.{n}": getattr(block, n) for i, block in enumerate(blocks) for n in names}
    ids = [torch.tensor([row]) for row in dataset["input_ids"]]

    def inputs_of(m):
        seen = {key: [] for key in probes}
        handles = [
            module.register_forward_pre_hook(lambda mod, args, key=key: seen[key].append(args[0]))
            for key, module in probes.items()
        ]
        with torch.no_grad():
            for row in ids:
                m(input_ids=row)
        for handle in handles:
            handle.remove()
        return seen  # per row, in the layer's own (batch, tokens, width) shape

    model.config._attn_implementation = "eager"  # the pipeline calibrates with eager attention
    fp_inputs = inputs_of(model)
    by_weight = {id(module.weight): key for key, module in probes.items()}
    used = {}
    original = modifier_module.fp_target_weight

    def spy(weight, cross, hessian, **kwargs):
        if id(weight) in by_weight:
            used[by_weight[id(weight)]] = (hessian.double().clone(), cross.double().clone())
        return original(weight, cross, hessian, **kwargs)

    modifier_module.fp_target_weight = spy
    try:
        oneshot(
            model=model,
            processor=tokenizer,
            recipe=FAIRCalibModifier(
                scheme=scheme,
                ignore=[r"re:^model\.transformer\.ff_out$"],
                use_token_weights=False,
                **fields,
            ),
            dataset=dataset,
            num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False,
        )
    finally:
        modifier_module.fp_target_weight = original
    model.config._attn_implementation = "eager"
    deployed = inputs_of(model)
    result = {}
    for key, module in probes.items():
        args = module.quantization_scheme.input_activations
        with torch.no_grad():  # quantized as the layer gets it (per-token scales need 3-D)
            four_bit = _rows([forward_quantize(module, x, "input", args) for x in deployed[key]])
        fp, unquantized = _rows(fp_inputs[key]), _rows(deployed[key])
        result[key] = dict(
            used=used[key],
            deployed=(2 * four_bit.T @ four_bit, 2 * fp.T @ four_bit),
            unquantized=2 * unquantized.T @ unquantized,
        )
    return result


def _rows(tensors):
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in tensors]).double()


def _close(got, expected, rtol=1e-3):
    return bool((got - expected).abs().max() <= rtol * expected.abs().max())


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["W4A4_G128_PACKED", "NVFP4"])
def test_statistics_come_from_the_deployed_layer(
    llada, tokenizer, calibration_texts, tmp_path, scheme
):
    """o_proj and down of every layer are fitted on the 4-bit input the deployed layer
    computes (its q/k/v, gate/up quantized; NVFP4 with its calibrated global scale), against
    the full-precision model's input; one pass per layer does not."""
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    grouped = _deployed_statistics(model, tokenizer, dataset, tmp_path, scheme)
    for key, stats in grouped.items():
        (hessian, cross), (deployed_h, deployed_c) = stats["used"], stats["deployed"]
        assert _close(hessian, deployed_h), key
        assert _close(cross, deployed_c), key
        assert not _close(hessian, stats["unquantized"], rtol=1e-2), key  # 4-bit, not FP
    one_pass = _deployed_statistics(
        saved(llada, tokenizer, tmp_path / "fp2"),
        tokenizer,
        dataset,
        tmp_path,
        scheme,
        deployed_inputs=False,
    )
    # the first layer's o_proj already sees another input when q/k/v are still unquantized
    hessian, _ = one_pass["0.attn_out"]["used"]
    assert not _close(hessian, one_pass["0.attn_out"]["deployed"][0], rtol=1e-2)


@pytest.mark.integration
def test_two_layers_in_one_subgraph_fail_with_the_fix(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=1)
    with pytest.raises(ValueError, match="sequential_targets_per_subgraph=1"):
        oneshot(
            model=model,
            processor=tokenizer,
            recipe=FAIRCalibModifier(
                scheme="W4A4_G128_PACKED", ignore=[r"re:^model\.transformer\.ff_out$"]
            ),
            dataset=dataset,
            use_loss_mask=True,
            num_calibration_samples=len(dataset),
            sequential_targets_per_subgraph=2,
        )
