"""FAIR-Calib Stage I: the frontier prior of each masked-stage state's own rollout.

For the state before step ``t`` of a teacher rollout, every answer position ``i`` gets

* ``hits``: how strongly ``i`` sits at that state's write frontier. A position scores 1 at the
  step it is committed, ``decay**k`` when it will be committed in ``k <= lookahead`` steps, and
  ``decay**k`` when it was committed ``k <= stability_lag`` steps ago (a fresh commit stays
  fragile: the stability lag);
* ``instability``: how borderline the decision is,
  ``margin_mix * (1 - margin) + (1 - margin_mix) * (1 - agreement)``, with ``margin`` the
  teacher's top-1/top-2 probability margin at the step the position was written and
  ``agreement`` whether the teacher's current top-1 at a still masked position already equals
  the token it finally commits.

A token then weighs ``1 + frontier_weight * hits * (1 + instability_weight * instability)``
(prompt tokens weigh 1), normalised to mean 1 over the calibration set and floored at
``min_weight`` so no token is ignored: the weight lands on this state's actual frontier.

``source`` picks the weight source (:mod:`fair_calib_llmc.stage1.sources`, one contract):

* ``"state"`` (default): the frontier prior above;
* ``"position"``: the paper's static position prior, one weight per answer position index
  from random-order probe rollouts (:mod:`fair_calib_llmc.stage1.position`, settings in
  ``position:``); the only source that also weighs clean text (``stage1.inputs: text``);
* ``"uniform"``: every token weighs the same (no rollout is needed for clean text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fair_calib_llmc.sampling.samplers import DiffusionTrace
from fair_calib_llmc.stage1.position import PositionSettings
from fair_calib_llmc.stage1.sources import CalibrationRows, to_deciding_columns

__all__ = ["PriorSettings", "FrontierPrior", "normalise_weights"]


class PriorSettings(BaseModel):
    """Coefficients of the Stage I prior (all documented in the module docstring).

    ``frontier_weight`` .. ``margin_mix`` shape the frontier prior (``state``), ``position``
    the static position prior; ``min_weight`` floors every source's normalised weights (the
    position prior's "small floor" outside its window).
    """

    model_config = ConfigDict(extra="forbid")

    frontier_weight: float = Field(4.0, ge=0.0, description="extra weight of frontier states")
    instability_weight: float = Field(1.0, ge=0.0, description="boost of unstable frontier states")
    lookahead: int = Field(2, ge=0, description="steps before a commit counted as frontier")
    stability_lag: int = Field(2, ge=0, description="steps after a commit still fragile")
    decay: float = Field(0.5, gt=0.0, le=1.0, description="per-step decay away from the commit")
    margin_mix: float = Field(0.5, ge=0.0, le=1.0, description="margin vs agreement in instability")
    min_weight: float = Field(0.1, gt=0.0, le=1.0, description="floor of a normalised weight")
    source: Literal["state", "position", "uniform"] = Field(
        "state",
        description="weights from each state's own rollout, the static position prior of "
        "random-order probes, or uniform",
    )
    position: PositionSettings = Field(
        default_factory=PositionSettings,
        description="the static position prior (source: position)",
    )


@dataclass
class FrontierPrior:
    """The ``state`` weight source: each masked-stage state weighed by its own rollout (the
    module docstring); nothing to estimate beforehand."""

    settings: PriorSettings

    def raw_weights(self, trace: DiffusionTrace, step: int) -> torch.Tensor:
        """Unnormalised ``(B, L)`` token weights of the state before ``step`` of ``trace``."""
        s = self.settings
        hits = frontier_hits(trace, step, s)
        unstable = state_instability(trace, step, s.margin_mix)
        answer = 1 + s.frontier_weight * hits * (1 + s.instability_weight * unstable)
        prompt = torch.ones(answer.shape[0], trace.prompt_length)
        return torch.cat([prompt, answer], dim=1)

    def row_weights(self, rows: CalibrationRows) -> torch.Tensor:
        """The weight-source contract (:mod:`fair_calib_llmc.stage1.sources`): each group of
        state rows weighed by :meth:`raw_weights`, moved to the deciding columns (Dream's last
        column weighs as a prompt token)."""
        if not rows.states:
            raise ValueError(
                f"the {self.settings.source} prior weighs masked-stage states, not clean text; "
                "set stage1.prior.source: position (or uniform), or stage1.inputs: states"
            )
        raw = torch.cat([self.raw_weights(trace, step) for trace, step in rows.states])
        return to_deciding_columns(raw, rows.spec, fill=1.0)


def frontier_hits(trace: DiffusionTrace, step: int, settings: PriorSettings) -> torch.Tensor:
    """``(B, gen)`` frontier score of every answer position of the state before ``step``."""
    when = trace.commit_step()[:, trace.prompt_length :].cpu()  # (B, gen)
    distance = when - step  # > 0: committed later; < 0: committed earlier
    ahead = (distance >= 0) & (distance <= settings.lookahead)
    behind = (distance < 0) & (-distance <= settings.stability_lag)
    score = settings.decay ** distance.abs().float()
    return torch.where(ahead | behind, score, torch.zeros_like(score))


def state_instability(trace: DiffusionTrace, step: int, margin_mix: float) -> torch.Tensor:
    """``(B, gen)`` instability of each answer position of the state before ``step``.

    A position's decision margin is the teacher's top-1/top-2 margin at the step it was
    committed (how borderline the written token was); agreement is whether the teacher's
    current top-1 at a still masked position already equals its final token (1 once written).
    """
    trace = trace.to("cpu")
    answer = slice(trace.prompt_length, None)
    when = trace.commit_step()[:, answer]  # (B, gen)
    margins = trace.margin[:, :, answer].nan_to_num(0.0)  # (T, B, gen)
    decision_margin = margins.gather(0, when.clamp(min=0).unsqueeze(0)).squeeze(0)
    masked = trace.masked[step][:, answer]
    agree = (trace.prediction[step][:, answer] == trace.generated).float()
    agree = torch.where(masked, agree, torch.ones_like(agree))
    return margin_mix * (1 - decision_margin) + (1 - margin_mix) * (1 - agree)


def normalise_weights(
    weights: list[torch.Tensor],
    min_weight: float,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> list[torch.Tensor]:
    """Scale all token weights to mean 1 jointly, then floor them at ``min_weight``.

    ``reduce`` sums the (total, count) pair across processes holding shares of the states.
    """
    if not weights:
        raise ValueError("no calibration tokens to weight; the calibration set is empty")
    flat = torch.cat([w.flatten() for w in weights])
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError("token weights must be finite and non-negative")
    totals = torch.stack([flat.double().sum(), torch.tensor(flat.numel(), dtype=torch.float64)])
    if reduce is not None:
        reduce([totals])
    mean = (totals[0] / totals[1]).float().clamp(min=1e-12)
    return [(w / mean).clamp(min=min_weight) for w in weights]
