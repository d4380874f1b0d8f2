"""The two objectives rotations are learned on, each weighted per token by Stage I.

* ``layer_mse`` (the paper's Stage II surrogate): the token-weighted squared error of every
  decoder layer's output against the full-precision teacher's, relative to the teacher's own
  weighted energy at that layer, summed over layers. No sampler, no vocabulary.
* ``output_kl``: the token-weighted ``KL(teacher || student)`` of the output distribution at
  the masked positions, the quantity a frontier decision is taken from, end to end.

Weights are ``loss_mask`` (frontier) or ones (the uniform ablation); both objectives divide
by the total weight, so uniform and frontier runs have the same scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fair_calib_llmc.models.family import DiffusionLMSpec

__all__ = ["OBJECTIVES", "decision_columns", "teacher_log_probs", "layer_mse", "output_kl"]

OBJECTIVES = ("layer_mse", "output_kl")

#: the mask token's logit: never an answer; a finite stand-in for -inf keeps 0 * log 0 at 0
_NEVER = -1e4


def decision_columns(input_ids: torch.Tensor, spec: DiffusionLMSpec) -> torch.Tensor:
    """``(B, L)`` bool: the logit columns that predict a masked position (Dream's column
    ``i - 1`` predicts position ``i``)."""
    masked = input_ids == spec.mask_token_id
    if spec.shift_logits:
        masked = torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], dim=1)
    return masked


def teacher_log_probs(
    logits: torch.Tensor, columns: torch.Tensor, spec: DiffusionLMSpec
) -> torch.Tensor:
    """``(n, V)`` float32 log-probabilities at the selected columns, mask token excluded."""
    picked = logits[columns].float()
    picked[..., spec.mask_token_id] = _NEVER
    return picked.log_softmax(-1)


def output_kl(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    columns: torch.Tensor,
    weights: torch.Tensor,
    spec: DiffusionLMSpec,
) -> torch.Tensor:
    """Weighted mean over ``columns`` of ``KL(teacher || student)``."""
    student_logp = teacher_log_probs(student_logits, columns, spec)
    per_column = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    w = weights[columns].float()
    return (w * per_column).sum() / w.sum().clamp(min=1e-12)


def layer_mse(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """Sum over layers of ``sum_t w_t ||h_t - h*_t||^2 / sum_t w_t ||h*_t||^2``."""
    w = weights.float()
    total = 0.0
    for h, target in zip(student, teacher, strict=True):
        error = (h.float() - target.float()).pow(2).sum(-1)
        total = total + (w * error).sum() / (w * target.float().pow(2).sum(-1)).sum()
    return total
