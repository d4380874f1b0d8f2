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

from fair_calib_llmc.models.family import DiffusionLMSpec, align_logits

__all__ = ["masked_log_probs", "layer_mse", "output_kl"]

#: the mask token's logit: never an answer; a finite stand-in for -inf keeps 0 * log 0 at 0
_NEVER = -1e4


def masked_log_probs(
    logits: torch.Tensor, input_ids: torch.Tensor, spec: DiffusionLMSpec
) -> torch.Tensor:
    """``(n, V)`` float32 log-probabilities of the masked positions (logits aligned to the
    positions they predict, :func:`~fair_calib_llmc.models.family.align_logits`), mask token
    excluded."""
    picked = align_logits(logits.float(), spec)[input_ids == spec.mask_token_id]
    picked[..., spec.mask_token_id] = _NEVER
    return picked.log_softmax(-1)


def output_kl(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    spec: DiffusionLMSpec,
) -> torch.Tensor:
    """Weighted mean over the masked positions of ``KL(teacher || student)``. ``weights``
    sit on the deciding logit columns (``loss_mask``) and are aligned like the logits."""
    student_logp = masked_log_probs(student_logits, input_ids, spec)
    per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    w = align_logits(weights.float(), spec)[input_ids == spec.mask_token_id]
    return (w * per_position).sum() / w.sum().clamp(min=1e-12)


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
