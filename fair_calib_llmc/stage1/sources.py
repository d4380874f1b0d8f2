"""The contract of a Stage I weight source: what it is given and what it returns, in which frame.

Stage I builds calibration rows (masked-stage states of the teacher's rollouts, or fully
observed clean text) and asks ONE weight source for their raw token weights. Every source
(:data:`SOURCES`) answers the same call, :meth:`WeightSource.row_weights`, so
:func:`fair_calib_llmc.stage1.states.build_calibration_dataset` does not branch on the source
beyond building it (:func:`fair_calib_llmc.stage1.states.weight_source`):

* given: :class:`CalibrationRows`, the ``(N, L)`` model inputs, where their answer starts, the
  run's spec, and, for states, the rollout and step each group of rows was taken from;
* returns: ``(N, L)`` raw weights, finite and non-negative, in the **model-input column
  frame**: column ``c`` weighs the hidden state of input column ``c``. For Dream, whose logit
  column ``i - 1`` decides position ``i``, a weight meant for position ``i`` is already moved
  to column ``i - 1`` (:func:`to_deciding_columns`). The weights are **not normalised**: Stage I
  scales all rows jointly to mean 1 and floors them at ``prior.min_weight``
  (:func:`fair_calib_llmc.stage1.prior.normalise_weights`), summed over ``torchrun`` ranks.

The object a source is (with its estimate, if it has one: the static position vector) is what
:func:`build_calibration_dataset` returns as its ``prior``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from fair_calib_llmc.models.family import DiffusionLMSpec
from fair_calib_llmc.sampling.samplers import DiffusionTrace

__all__ = [
    "SOURCES",
    "CalibrationRows",
    "UniformWeights",
    "WeightSource",
    "to_deciding_columns",
]

#: Every weight source ``stage1.prior.source`` names; see
#: :class:`fair_calib_llmc.stage1.prior.PriorSettings`.
SOURCES = ("state", "position", "uniform")


@dataclass
class CalibrationRows:
    """The rows Stage I hands to ``oneshot``, and where each came from.

    :param input_ids: ``(N, L)`` model inputs: masked-stage states (mask tokens where the
        answer is still masked) or clean text (no mask token)
    :param prompt_length: answer positions are ``prompt_length .. L - 1``
    :param spec: the run's :class:`~fair_calib_llmc.models.family.DiffusionLMSpec`
    :param states: for masked-stage states, ``(trace, step)`` per group of rows, in row order:
        the group is the trace's whole batch in the state before ``step``; empty for text
    """

    input_ids: torch.Tensor
    prompt_length: int
    spec: DiffusionLMSpec
    states: list[tuple[DiffusionTrace, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.states:
            grouped = sum(trace.sequences.shape[0] for trace, _ in self.states)
            if grouped != self.input_ids.shape[0]:
                raise ValueError(
                    f"{grouped} state rows are described for {self.input_ids.shape[0]} input "
                    "rows; build CalibrationRows from the states themselves"
                )

    @property
    def answer_length(self) -> int:
        return self.input_ids.shape[1] - self.prompt_length

    def frontier(self) -> torch.Tensor:
        """``(N, L)`` bool, column frame: the tokens committed at their state's step (all
        ``False`` for clean text, which has no frontier)."""
        if not self.states:
            return torch.zeros(self.input_ids.shape, dtype=torch.bool)
        committed = torch.cat([trace.committed[step].cpu() for trace, step in self.states])
        return to_deciding_columns(committed, self.spec, fill=False)


@runtime_checkable
class WeightSource(Protocol):
    """A Stage I weight source (see the module docstring for the frame of what it returns)."""

    def row_weights(self, rows: CalibrationRows) -> torch.Tensor:
        """``(N, L)`` raw, non-negative token weights of ``rows`` in the column frame."""
        ...


def to_deciding_columns(
    position_weights: torch.Tensor, spec: DiffusionLMSpec, fill
) -> torch.Tensor:
    """Move ``(N, L)`` per-position values to the column whose logits decide that position:
    the same column for LLaDA, one column left for Dream (logit column ``i - 1`` predicts
    position ``i``); Dream's last column, which decides no position, gets ``fill``."""
    if not spec.shift_logits:
        return position_weights
    last = torch.full_like(position_weights[:, :1], fill)
    return torch.cat([position_weights[:, 1:], last], dim=1)


@dataclass
class UniformWeights:
    """Every token weighs the same: the uniform ablation, and clean text without a prior."""

    def row_weights(self, rows: CalibrationRows) -> torch.Tensor:
        return torch.ones(rows.input_ids.shape)
