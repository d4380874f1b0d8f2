"""Plain maths of learned weight clipping (LWC, the FlatQuant / OmniQuant class), exported
through the weight scales.

A symmetric quantizer's scale is its group's absolute maximum over the code's largest level;
an outlier weight therefore coarsens the step of every other weight in its group. Clipping the
group's range to ``c * max|w|`` (``c`` in ``[MIN_CLIP_FACTOR, 1]``, one factor per output
channel) trades the outliers' saturation error for a finer step everywhere else; ``c`` is
learned with the weights fake-quantized in the loop.

Export needs no format of its own: clamping each group of the weight to ``+-c max|w|`` *is*
the clipped quantizer for every symmetric scheme compressed-tensors offers (int4, NVFP4,
MXFP4): the min-max observer of whichever quantizer follows then finds the clipped range
and writes it into the ordinary ``weight_scale``, and the values beyond it would have
saturated at that level anyway. So the checkpoint holds ordinary weights and scales, and an
RTN quantizer after the clamp reproduces the learned forward's weight exactly (tested).

Gradients (LSQ's, through autograd): inside the range, identity for ``w`` and the rounding
residual for the range; a clamped weight passes none to ``w`` and its level to ``c``.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs

from fair_calib_llmc.stage2.learned_rotations.ste import group_absmax

__all__ = ["MIN_CLIP_FACTOR", "clip_weight", "initial_clip_factors", "project_clip_factors"]

#: the smallest clipping factor learning may reach: below half the range a group loses more
#: to saturation than any step refinement gives back at 4 bits
MIN_CLIP_FACTOR = 0.5


def initial_clip_factors(weight: torch.Tensor) -> torch.Tensor:
    """One factor per output channel, starting at 1 (no clipping), learnable, ``float32``."""
    return torch.ones(weight.shape[0], 1, device=weight.device).requires_grad_(True)


def clip_weight(
    weight: torch.Tensor, factors: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor:
    """``weight`` with each of ``args``' scale groups clamped to ``+-factor * max|w|`` (the
    output channel's factor), differentiable in both."""
    bound = factors.to(weight.dtype) * group_absmax(weight, args)
    return torch.maximum(torch.minimum(weight, bound), -bound)


@torch.no_grad()
def project_clip_factors(factors: list[torch.Tensor]) -> None:
    """Keep every factor in ``[MIN_CLIP_FACTOR, 1]`` after an optimiser step."""
    for f in factors:
        f.clamp_(MIN_CLIP_FACTOR, 1.0)
