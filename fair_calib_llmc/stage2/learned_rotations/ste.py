"""Fake quantization that learning can differentiate, with compressed-tensors' own values.

Rotations are learned with quantization in the loop. compressed-tensors' ``fake_quantize``
rounds, so its gradient is zero almost everywhere; SpinQuant trains through a
straight-through estimator (STE) whose scale stays differentiable, so the loss sees how a
rotation moves each token's (or group's) extreme value, which sets the quantization step.

:func:`ste_quantize` returns *exactly* compressed-tensors' fake-quantized values (the forward
pass is the deployed model's) and the gradient of ``m * round_ste(x / m)`` with ``m`` the
absolute maximum of the scale's group: identity for ``x`` plus the rounding residual times the
gradient of the group maximum (LSQ / SpinQuant). A constant factor in the scale cancels, so
the surrogate needs only the group layout, not the format's code book.

NVFP4 (``tensor_group``) also has a per-tensor global scale. For weights it is what
compressed-tensors computes on deployment (from the weight's own min / max); for activations
the deployed one is calibrated after learning over all calibration batches, so learning uses
each batch's own (a surrogate: the 16-element block scales, which set the rounding, are the
deployed ones given it).
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)

__all__ = [
    "ste_quantize",
    "rtn_qparams",
    "global_scale_of",
    "group_absmax",
    "LEARNABLE_STRATEGIES",
]

#: strategies whose scales come from the tensor itself, as learning needs
LEARNABLE_STRATEGIES = (
    QuantizationStrategy.TOKEN,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.TENSOR,
    QuantizationStrategy.TENSOR_GROUP,
)


def global_scale_of(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor | None:
    """``tensor_group``'s per-tensor scale from ``value``'s own min / max (None otherwise)."""
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        return None
    return generate_gparam(*torch.aminmax(value.float()))


def rtn_qparams(
    module, value: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None = None
):
    """Scale and zero point from ``value``'s own min / max (what RTN uses), for any of
    :data:`LEARNABLE_STRATEGIES`; channel-wise for a 2-D weight means one per output row."""
    if args.strategy == QuantizationStrategy.CHANNEL:
        low, high = torch.aminmax(value, dim=-1, keepdim=True)
        return calculate_qparams(low, high, args)
    return compute_dynamic_scales_and_zp(
        value=value, args=args, module=module, global_scale=global_scale
    )


def group_absmax(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """``|x|``'s maximum over each scale group, broadcast back to ``x``'s shape."""
    if args.strategy == QuantizationStrategy.TENSOR:
        return x.abs().amax().expand_as(x)
    if args.strategy in (QuantizationStrategy.TOKEN, QuantizationStrategy.CHANNEL):
        return x.abs().amax(-1, keepdim=True).expand_as(x)
    grouped = x.unflatten(-1, (-1, args.group_size))
    return grouped.abs().amax(-1, keepdim=True).expand_as(grouped).flatten(-2)


def ste_quantize(module, x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """compressed-tensors' fake quantization of ``x`` (values) with a straight-through,
    scale-aware gradient (see the module docstring)."""
    with torch.no_grad():
        global_scale = global_scale_of(x.detach(), args)
        scale, zero_point = rtn_qparams(module, x.detach(), args, global_scale)
        exact = fake_quantize(x.detach(), scale, zero_point, args, global_scale=global_scale)
    peak = group_absmax(x, args).clamp(min=torch.finfo(x.dtype).tiny)
    residual = ((exact - x.detach()) / peak.detach()).detach()
    return exact + (x - x.detach()) + (peak - peak.detach()) * residual
