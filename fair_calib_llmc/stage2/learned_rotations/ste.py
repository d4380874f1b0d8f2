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
from torch import nn

__all__ = [
    "ste_quantize",
    "rtn_qparams",
    "global_scale_of",
    "group_absmax",
    "LEARNABLE_STRATEGIES",
    "learnable_linears",
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


def learnable_linears(
    model: nn.Module, learner: str, *, weights_in_loop: bool, symmetric_weights: bool
) -> dict[nn.Module, tuple[QuantizationArgs | None, QuantizationArgs | None]]:
    """Each quantized linear layer's ``(activation args, weight args)`` to learn against
    (weight args ``None`` unless ``weights_in_loop``), from the schemes the quantization
    modifier after ``learner`` attached; schemes learning cannot follow fail here, in one
    line each, before any learning (``symmetric_weights``: learned clipping needs them)."""
    layers = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, nn.Linear) or scheme is None:
            continue
        acts, weights = scheme.input_activations, scheme.weights
        for kind, args in (("activation", acts), ("weight", weights)):
            if args is not None and args.strategy not in LEARNABLE_STRATEGIES:
                raise ValueError(
                    f"{name}: {kind} strategy {args.strategy} cannot be learned against "
                    f"(learning supports {[s.value for s in LEARNABLE_STRATEGIES]}, e.g. "
                    "W4A4_G128_PACKED)"
                )
        if acts is not None and not acts.dynamic:
            raise ValueError(
                f"{name}: static activation scales are calibrated after learning; learn "
                "against a scheme with dynamic activations (e.g. W4A4_G128_PACKED)"
            )
        if symmetric_weights and weights is not None and not weights.symmetric:
            raise ValueError(
                f"{name}: learned weight clipping clamps a symmetric range; the weight "
                "scheme is asymmetric: use a symmetric scheme (e.g. W4A4_G128_PACKED) or "
                "set learn_weight_clipping: false"
            )
        layers[module] = (acts, weights if weights_in_loop else None)
    if not layers:
        raise ValueError(
            f"{learner} found no quantized layers to learn against: put a quantization stage "
            "(FAIRCalibModifier, GPTQModifier, QuantizationModifier) after it in the same recipe"
        )
    return layers
