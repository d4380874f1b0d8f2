"""Plain maths of the exact-function control: a per-channel rescale folded into a module pair.

A linear layer that **writes** a set of channels and one that **reads** them, with nothing but
channel-wise linear operations in between, compute the same function after

    writer.weight[i, :] *= s_i,   writer.bias[i] *= s_i,   reader.weight[:, j] /= s_c(j)

for any non-zero scales ``s``, ``c(j)`` being the written channel that reaches the reader's input
``j``. Two such pairs in every decoder layer of LLaDA and Dream:

* the MLP's up projection and its down projection: the MLP computes
  ``down(act(gate(x)) * up(x))``, and the product with ``act(gate(x))`` is channel-wise;
* the attention's value projection and its output projection: the attention output is a
  per-head weighted sum of values, linear in each value channel. Under grouped-query attention
  (fewer key/value heads than query heads) a value channel reaches several output-projection
  columns after ``repeat_kv`` (query head ``h`` reads key/value head ``h // n_rep``): every one
  of them is divided (:func:`reader_scales`).

With ``s_i = 1 + eps z_i`` (``z`` seeded Gaussian) the full-precision function stays the same
to float rounding while the reader's weight groups and the quantized values of its input are
re-rolled: the control of quantization tie noise for pipelines without a rotation
(:class:`~fair_calib_llmc.stage2.equivalent_modifier.EquivalentRescaleModifier`).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import update_offload_parameter
from torch import nn

__all__ = ["channel_scales", "reader_scales", "rescale_pair"]


def channel_scales(width: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``1 + eps z`` with ``z`` standard Gaussian from ``generator``, in float64."""
    z = torch.randn(width, generator=generator, dtype=torch.float64)
    return 1.0 + eps * z


def reader_scales(
    scales: torch.Tensor, reader_width: int, head_dim: int | None = None
) -> torch.Tensor:
    """The scale of each reader input: the writer's channel scales, each repeated for every
    query head that reads its key/value head (``repeat_kv`` order) when the reader is wider."""
    width = scales.numel()
    if reader_width == width:
        return scales
    if head_dim is None or reader_width % width or width % head_dim:
        raise ValueError(
            f"a reader of {reader_width} inputs cannot read {width} written channels"
            + ("" if head_dim is None else f" in heads of {head_dim}")
        )
    return scales.view(-1, head_dim).repeat_interleave(reader_width // width, dim=0).flatten()


@torch.no_grad()
def rescale_pair(
    writer: nn.Linear, reader: nn.Linear, scales: torch.Tensor, head_dim: int | None = None
) -> None:
    """Scale ``writer``'s output channels (weight rows and bias) by ``scales`` and divide the
    ``reader``'s matching input columns by them, in float64, written back in each weight's own
    dtype (with ``update_offload_parameter``, so offloaded weights are written too)."""
    if scales.numel() != writer.out_features:
        raise ValueError(f"{scales.numel()} scales for {writer.out_features} written channels")
    out_scales = scales.to(writer.weight.device)
    weight = writer.weight.data.double() * out_scales[:, None]
    update_offload_parameter(writer, "weight", weight.to(writer.weight.dtype).contiguous())
    if writer.bias is not None:
        bias = writer.bias.data.double() * out_scales
        update_offload_parameter(writer, "bias", bias.to(writer.bias.dtype))
    in_scales = reader_scales(scales, reader.in_features, head_dim).to(reader.weight.device)
    weight = reader.weight.data.double() / in_scales[None, :]
    update_offload_parameter(reader, "weight", weight.to(reader.weight.dtype).contiguous())
