"""Plain maths of learned rotations: where each rotation acts, the training-time forward of a
rotated linear layer, and the final fusion into ordinary weights.

A rotation ``Q`` of a basis acts on the linear layers around it in two ways (compressed-tensors'
``weight_input`` / ``weight_output`` locations):

* a layer that **reads** the rotated basis gets ``W <- W Q`` (its input is ``x Q``);
* a layer that **writes** it gets ``W <- Q^T W`` and ``b <- b Q`` (its output becomes ``y Q``).

R1 rotates the residual stream (read by q/k/v and the MLP inputs and the LM head, written by
the embedding, the attention output and the MLP output); R2 rotates each head's values (written
by v, read by o), one block per head (``Q`` smaller than the layer: block diagonal).

While learning, the weights stay as they are and every quantized layer computes
``quant(x Q_in) Q_in^T W^T`` (activations only: the setting SpinQuant learns in when GPTQ
follows) or ``quant(x Q_in) quant(Q_out^T W Q_in)^T Q_out^T`` (weights too). Both equal the
fused model's forward exactly in real arithmetic: the residual stream simply stays in the old
basis between layers, so no hidden state needs mapping back and a full-precision teacher
recorded before learning stays the target. After learning, :func:`fuse_rotation` writes the
rotations into the weights once, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.transform import TransformLocation
from compressed_tensors.transform.utils.matrix import apply_transform_weight
from compressed_tensors.utils import update_offload_parameter
from torch import nn

from fair_calib_llmc.stage2.learned_rotations.ste import ste_quantize

__all__ = ["RotationSites", "rotate", "rotated_forward", "fuse_rotation"]

_ONLINE = TransformLocation.INPUT


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(q, q, ...)`` over the last dimension, computed in ``q``'s precision
    and returned in ``x``'s dtype (compressed-tensors' block-diagonal product)."""
    return apply_transform_weight(q, x.to(q.dtype), _ONLINE, nn.Linear).to(x.dtype)


@dataclass
class RotationSites:
    """The rotations around one module: the basis it reads (``q_in``) and writes (``q_out``)."""

    q_in: torch.Tensor | None = None
    q_out: torch.Tensor | None = None


def rotated_forward(
    module: nn.Linear,
    sites: RotationSites,
    act_args: QuantizationArgs | None,
    weight_args: QuantizationArgs | None,
):
    """The forward of ``module`` as the rotated, fake-quantized layer computes it, with
    gradients to the rotations (see the module docstring). ``act_args`` / ``weight_args``:
    what to quantize in the loop (``None``: leave in full precision)."""
    q_in, q_out = sites.q_in, sites.q_out

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_rot = rotate(x, q_in) if q_in is not None else x
        if act_args is not None:
            x_rot = ste_quantize(module, x_rot, act_args)
        if weight_args is None:  # W16: the weight needs no rotation, the input goes back
            x_back = rotate(x_rot, q_in.T) if q_in is not None else x_rot
            return F.linear(x_back, module.weight, module.bias)
        weight, bias = module.weight, module.bias
        if q_in is not None:
            weight = rotate(weight, q_in)
        if q_out is not None:
            weight = rotate(weight.T, q_out).T
            bias = rotate(bias, q_out) if bias is not None else None
        y = F.linear(x_rot, ste_quantize(module, weight, weight_args), bias)
        return rotate(y, q_out.T) if q_out is not None else y

    return forward


@torch.no_grad()
def fuse_rotation(module: nn.Module, sites: RotationSites) -> None:
    """Write the rotations into ``module``'s weights (and a written bias), in float64, on the
    weight's device (a rotation may have been built elsewhere)."""
    weight = module.weight.data.double()
    sites = RotationSites(
        *(q.to(weight.device) if q is not None else None for q in (sites.q_in, sites.q_out))
    )
    if isinstance(module, nn.Embedding):  # rows are tokens: the output basis is the columns
        if sites.q_in is not None:
            raise ValueError("an embedding reads token ids, not a rotated basis")
        if sites.q_out is not None:
            weight = rotate(weight, sites.q_out.double())
    else:
        if sites.q_in is not None:
            weight = rotate(weight, sites.q_in.double())
        if sites.q_out is not None:
            weight = rotate(weight.T, sites.q_out.double()).T
            bias = getattr(module, "bias", None)
            if bias is not None:
                rotated = rotate(bias.data.double(), sites.q_out.double())
                update_offload_parameter(module, "bias", rotated.to(bias.dtype))
    update_offload_parameter(module, "weight", weight.to(module.weight.dtype).contiguous())
