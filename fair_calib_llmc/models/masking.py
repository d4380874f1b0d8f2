"""Bidirectional attention masks in the forms transformers' attention kernels accept.

dLLMs attend in both directions, so the only masking is padding. Callers hand us what a
tokenizer or an llm-compressor calibration batch holds (a 2-D ``(batch, seq)`` 0/1 mask of any
integer or bool dtype), or an already prepared 4-D mask, or nothing. SDPA rejects a 2-D long
mask, so it becomes an additive float mask ``(batch, 1, 1, seq)`` that works for both the eager
and the SDPA kernels (llm-compressor forces eager attention during calibration).

Models call it through the parameter-free module :class:`BidirectionalMask`: llm-compressor's
sequential tracer treats modules that contain no sequential target as leaves, so the mask is
built at run time instead of being traced through its data-dependent branches (``torch.fx.wrap``
does not survive llm-compressor's re-compiled forwards).
"""

from __future__ import annotations

import torch
from torch import nn


def bidirectional_attention_mask(
    attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor
) -> torch.Tensor | None:
    """Return ``None`` (attend everywhere) or an additive ``(B, 1, 1|T, T)`` mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return _additive(attention_mask, inputs_embeds.dtype)
        return attention_mask.to(inputs_embeds.dtype)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2-D (batch, seq) or 4-D (batch, 1, q, k); "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if bool(attention_mask.bool().all()):
        return None
    return _additive(attention_mask.bool()[:, None, None, :], inputs_embeds.dtype)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


class BidirectionalMask(nn.Module):
    """Module form of :func:`bidirectional_attention_mask` (a leaf for torch.fx tracing)."""

    def forward(
        self, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor | None:
        return bidirectional_attention_mask(attention_mask, inputs_embeds)
