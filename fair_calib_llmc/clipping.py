"""Weighted weight-clipping search for int and FP4 (NVFP4) weights, as a plain function.

FAIR-Calib's Stage II shrinks each output row's quantization range to the ratio that
minimises the weighted layer-output error ``diag((W - Q) H (W - Q)^T)``. For int weights the
range gives the scale directly; NVFP4 (``type: float``, ``strategy: tensor_group``) adds two
things the search must reproduce, or it scores a grid the checkpoint never uses:

* a per-tensor **global scale** (compressed-tensors stores local scales as
  ``global_scale * amax / 6``, rounded to FP8 E4M3, and divides by the global scale when it
  quantizes), which llm-compressor's observer derives from the absmax of the fused weights
  (q/k/v share one);
* **FP8 rounding of the local scales**, done by ``calculate_qparams`` when
  ``args.scale_dtype`` is set.

:func:`weighted_clip_ratios` evaluates every candidate through compressed-tensors' own
``calculate_qparams`` and ``fake_quantize`` with the global scale, so one code path serves
int4 and FP4 and cannot drift from what the checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

__all__ = ["weighted_clip_ratios", "weight_range"]


def weight_range(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, ...]:
    """Min / max per quantization group of ``weight`` (what a min-max weight observer holds):
    ``(rows, groups)`` for group / tensor_group, ``(rows, 1)`` for channel, ``(1,)`` for tensor.
    """
    strategy = args.strategy
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        grouped = weight.unflatten(-1, (-1, args.group_size))
        return grouped.amin(-1), grouped.amax(-1)
    if strategy == QuantizationStrategy.CHANNEL:
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    if strategy == QuantizationStrategy.TENSOR:
        return weight.amin().reshape(1), weight.amax().reshape(1)
    raise ValueError(
        f"weight clipping supports group, tensor_group, channel and tensor strategies, "
        f"not {strategy!r}"
    )


@torch.no_grad()
def weighted_clip_ratios(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    ratios: Sequence[float],
    *,
    min_vals: torch.Tensor | None = None,
    max_vals: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clipping ratio per output row and its weighted error.

    :param weight: ``(rows, columns)`` full-precision weight
    :param hessian: ``(columns, columns)`` (weighted) input second moment, already averaged
    :param args: the module's weight ``QuantizationArgs`` (int or FP4)
    :param ratios: candidate fractions of the observed range (1.0 = no clipping)
    :param min_vals, max_vals: the observer's statistics (default: :func:`weight_range`)
    :param global_scale: FP4 only; default: the one llm-compressor's observer derives from the
        unclipped statistics of this weight alone (pass ``observer.get_global_scale()`` before
        clipping for fused q/k/v so all members share it)
    :return: ``(ratio per row, error per row)``; scale the observer's min/max rows by the
        ratios (``lo * ratio[:, None]``) before qparams are computed
    """
    weight = weight.float()
    hessian = hessian.to(weight.device, torch.float32)
    if min_vals is None or max_vals is None:
        min_vals, max_vals = weight_range(weight, args)
    min_vals, max_vals = min_vals.float(), max_vals.float()
    if args.strategy == QuantizationStrategy.TENSOR_GROUP and global_scale is None:
        global_scale = generate_gparam(min_vals.min().reshape(1), max_vals.max().reshape(1))
    if global_scale is not None:
        global_scale = global_scale.float()
    rows = weight.shape[0]
    best_error = torch.full((rows,), float("inf"), device=weight.device)
    best = torch.ones(rows, device=weight.device)
    for ratio in ratios:
        scale, zero_point = calculate_qparams(
            min_vals * ratio, max_vals * ratio, args, global_scale=global_scale
        )
        quantized = fake_quantize(
            weight, scale.float(), zero_point, args, global_scale=global_scale
        )
        error = weight - quantized
        row_error = ((error @ hessian) * error).sum(dim=1)
        if min_vals.dim() <= 1 and min_vals.numel() == 1:  # one range for the whole tensor
            row_error = row_error.sum().expand(rows)
        better = row_error < best_error
        best_error = torch.where(better, row_error, best_error)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best, best_error
