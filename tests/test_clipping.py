"""The int / FP4 weighted clipping search (fair_calib_llmc.clipping) against brute force."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from fair_calib_llmc.clipping import weight_range, weighted_clip_ratios

pytestmark = pytest.mark.unit

RATIOS = [1.0, 0.97, 0.95, 0.9, 0.8]


def _args(scheme: str):
    import fair_calib_llmc  # noqa: F401  (registers W4A4_G128_PACKED)

    return preset_name_to_scheme(scheme, ["Linear"]).weights


def _problem(seed: int = 0, rows: int = 8, columns: int = 128):
    """Heavy-tailed weights (clipping pays off) and a correlated input second moment."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(3, rows, columns, generator=gen)
    weight = 0.05 * normal[0] / (normal[1:] ** 2).mean(0).sqrt()  # Student t, 2 dof
    inputs = torch.randn(512, columns, generator=gen) @ torch.randn(columns, columns, generator=gen)
    return weight, inputs.T @ inputs / 512


def _error_at(weight, hessian, args, ratio, global_scale=None):
    lo, hi = weight_range(weight, args)
    scale, zero_point = calculate_qparams(lo * ratio, hi * ratio, args, global_scale=global_scale)
    error = weight - fake_quantize(weight, scale.float(), zero_point, args, global_scale)
    return torch.stack([e @ hessian @ e for e in error])  # row by row, no batching


@pytest.mark.parametrize("scheme", ["NVFP4", "W4A4_G128_PACKED", "W4A4_CHANNEL_PACKED"])
def test_choice_is_the_per_row_minimum_over_candidates(scheme):
    args = _args(scheme)
    weight, hessian = _problem()
    ratios, errors = weighted_clip_ratios(weight, hessian, args, RATIOS)
    gscale = None
    if args.type == "float":
        lo, hi = weight_range(weight, args)
        gscale = generate_gparam(lo.min().reshape(1), hi.max().reshape(1))
    table = torch.stack([_error_at(weight, hessian, args, r, gscale) for r in RATIOS])
    assert torch.allclose(errors, table.min(0).values, rtol=1e-4)
    assert torch.equal(ratios, torch.tensor(RATIOS)[table.argmin(0)])
    assert (errors <= table[0] * (1 + 1e-6)).all()  # never worse than no clipping
    assert (ratios < 1).any()  # heavy tails: clipping pays off somewhere


def test_fp4_uses_the_given_global_scale_and_fp8_local_scales():
    args = _args("NVFP4")
    assert args.type == "float" and args.scale_dtype == torch.float8_e4m3fn
    weight, hessian = _problem(seed=1)
    own = weighted_clip_ratios(weight, hessian, args, RATIOS)
    absmax = weight.abs().max().reshape(1) * 3.3  # a fused sibling with larger weights
    fused = generate_gparam(-absmax, absmax)
    shared = weighted_clip_ratios(weight, hessian, args, RATIOS, global_scale=fused)
    assert not torch.equal(own[1], shared[1])  # another global scale, another FP8 grid
    lo, hi = weight_range(weight, args)
    scale, _ = calculate_qparams(lo, hi, args, global_scale=fused)
    assert torch.equal(scale.float(), scale.to(torch.float8_e4m3fn).float())


def test_unsupported_strategy_is_named():
    args = _args("W4A4").model_copy(update={"strategy": "block", "block_structure": [8, 8]})
    with pytest.raises(ValueError, match="not 'block'|not <QuantizationStrategy.BLOCK"):
        weighted_clip_ratios(torch.zeros(8, 8), torch.eye(8), args, [1.0])
