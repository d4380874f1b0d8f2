"""FAIR-Calib Stage I: the frontier position prior.

From the full-precision teacher's sampler traces we estimate, for every answer position ``i``
and masked stage ``s`` (a bucket of the answer's masking ratio):

* ``frontier_hits[i, s]``: how strongly ``(i, s)`` sits at the write frontier, averaged over
  traces. A position scores 1 at the step it is committed, ``decay**k`` when it will be
  committed in ``k <= lookahead`` steps, and ``decay**k`` when it was committed ``k <=
  stability_lag`` steps ago (a fresh commit stays fragile: the stability lag);
* ``instability[i, s]``: how unreliable the teacher is there while the position is masked,
  ``margin_mix * (1 - margin) + (1 - margin_mix) * (1 - agreement)``, with ``margin`` the
  top-1/top-2 probability margin and ``agreement`` whether the teacher's current top-1 already
  equals the token it finally commits.

A token of a masked-stage state then weighs
``1 + frontier_weight * hits * (1 + instability_weight * instability)`` (prompt tokens weigh
1), normalised to mean 1 over the calibration set and floored at ``min_weight`` so no token is
ignored.

``source`` chooses where ``hits`` and ``instability`` come from for a state Stage I emits:

* ``"state"`` (default): the state's own rollout. Stage I knows exactly which positions that
  rollout commits at this step and the steps around it, and how borderline each of those
  decisions was (the margin at the step it was written), so the weight lands on this state's
  actual frontier;
* ``"table"``: the ``(position, stage)`` averages above, the same for every state of a stage.
  Averaging over all steps of a stage and all rollouts spreads the weight thinly, so the
  committed token is often not the top-weighted one of its state (docs/results.md);
* ``"sensitivity"``: the state's frontier decisions (weighted as in ``"state"``) are traced
  back to the hidden states that make them, with one teacher backward pass
  (:mod:`fair_calib_llmc.stage1.sensitivity`): a token weighs
  ``1 + frontier_weight * s_t / max_t s_t`` with ``s_t`` its decision sensitivity, so the
  context a decision reads (its keys and values, the tokens written just before) is weighted,
  not only the decided token. Stage I computes it (:meth:`PositionPrior.decision_weights`
  gives the per-position decision weights it starts from);
* ``"position"``: the paper's static position prior, one weight per answer position index
  from random-order probe rollouts (:mod:`fair_calib_llmc.stage1.position`, settings in
  ``position:``); the only source that also weighs clean text (``stage1.inputs: text``);
* ``"uniform"``: every token weighs the same (no rollout is needed for clean text).

Every source answers the one contract of :mod:`fair_calib_llmc.stage1.sources`.
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

__all__ = ["PriorSettings", "PositionPrior", "estimate_prior", "normalise_weights"]


class PriorSettings(BaseModel):
    """Coefficients of the Stage I prior (all documented in the module docstring).

    ``frontier_weight`` .. ``margin_mix`` shape the frontier prior (``state``, ``table``,
    ``sensitivity``), ``position`` the static position prior; ``min_weight`` floors every
    source's normalised weights (the position prior's "small floor" outside its window).
    """

    model_config = ConfigDict(extra="forbid")

    frontier_weight: float = Field(4.0, ge=0.0, description="extra weight of frontier states")
    instability_weight: float = Field(1.0, ge=0.0, description="boost of unstable frontier states")
    lookahead: int = Field(2, ge=0, description="steps before a commit counted as frontier")
    stability_lag: int = Field(2, ge=0, description="steps after a commit still fragile")
    decay: float = Field(0.5, gt=0.0, le=1.0, description="per-step decay away from the commit")
    num_stages: int = Field(4, ge=1, description="masking-ratio buckets")
    margin_mix: float = Field(0.5, ge=0.0, le=1.0, description="margin vs agreement in instability")
    min_weight: float = Field(0.1, gt=0.0, le=1.0, description="floor of a normalised weight")
    source: Literal["state", "table", "sensitivity", "position", "uniform"] = Field(
        "state",
        description="weights from each state's own rollout, the averaged table, the "
        "teacher's sensitivity of the state's frontier decisions to each hidden state, the "
        "static position prior of random-order probes, or uniform",
    )
    position: PositionSettings = Field(
        default_factory=PositionSettings,
        description="the static position prior (source: position)",
    )


@dataclass
class PositionPrior:
    """``(gen_length, num_stages)`` tables estimated from teacher traces."""

    frontier_hits: torch.Tensor
    instability: torch.Tensor
    settings: PriorSettings

    def raw_weights(self, trace: DiffusionTrace, step: int) -> torch.Tensor:
        """Unnormalised ``(B, L)`` token weights of the state before ``step`` of ``trace``
        (``"state"`` and ``"table"``; ``"sensitivity"`` weights need the model, see
        :func:`fair_calib_llmc.stage1.states.build_calibration_dataset`)."""
        s = self.settings
        if s.source == "sensitivity":
            raise ValueError("sensitivity weights come from the teacher, not from the prior")
        if s.source == "state":
            hits = frontier_hits(trace, step, s)
            unstable = state_instability(trace, step, s.margin_mix)
        else:
            stage = stage_index(trace, step, s.num_stages)  # (B,)
            hits = self.frontier_hits[:, stage].T  # (B, gen)
            unstable = self.instability[:, stage].T
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

    def decision_weights(self, trace: DiffusionTrace, step: int) -> torch.Tensor:
        """``(B, L)`` weight of the decision at each position of the state before ``step``:
        the state's frontier score times its instability boost where the position is still
        masked, 0 elsewhere (prompt, already written)."""
        s = self.settings
        hits = frontier_hits(trace, step, s)
        unstable = state_instability(trace, step, s.margin_mix)
        answer = hits * (1 + s.instability_weight * unstable)
        answer = answer * trace.masked[step][:, trace.prompt_length :].cpu().float()
        prompt = torch.zeros(answer.shape[0], trace.prompt_length)
        return torch.cat([prompt, answer], dim=1)


def stage_index(trace: DiffusionTrace, step: int, num_stages: int) -> torch.Tensor:
    """``(B,)`` masked-stage bucket of each row before ``step`` (stage 0 = fully masked)."""
    answer = trace.masked[step, :, trace.prompt_length :].float()
    ratio = answer.mean(dim=1)  # 1.0 = fully masked
    return ((1 - ratio) * num_stages).long().clamp(0, num_stages - 1).cpu()


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


def estimate_prior(
    traces: list[DiffusionTrace],
    settings: PriorSettings,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> PositionPrior:
    """Average frontier hits and instability per (answer position, masked stage).

    ``reduce`` sums the four running totals in place across processes that each hold a share
    of the traces (:func:`fair_calib_llmc.distributed.all_reduce_sum`), so all of them
    estimate the prior of all traces.
    """
    if not traces:
        raise ValueError("Stage I needs at least one teacher trace; the calibration set is empty")
    gen = traces[0].generated.shape[1]
    n_stages = settings.num_stages
    hit_sum = torch.zeros(gen, n_stages)
    hit_n = torch.zeros(gen, n_stages)
    unstable_sum = torch.zeros(gen, n_stages)
    unstable_n = torch.zeros(gen, n_stages)
    for trace in traces:
        trace = trace.to("cpu")
        final = trace.generated  # (B, gen)
        for step in range(trace.steps):
            stage = stage_index(trace, step, n_stages)  # (B,)
            one_hot = torch.nn.functional.one_hot(stage, n_stages).float()  # (B, S)
            hits = frontier_hits(trace, step, settings)  # (B, gen)
            hit_sum += hits.T @ one_hot
            hit_n += torch.ones_like(hits).T @ one_hot

            answer = slice(trace.prompt_length, None)
            masked = trace.masked[step][:, answer].float()
            margin = trace.margin[step][:, answer].nan_to_num(0.0)
            agree = (trace.prediction[step][:, answer] == final).float()
            mix = settings.margin_mix
            unstable = mix * (1 - margin) + (1 - mix) * (1 - agree)
            unstable_sum += (unstable * masked).T @ one_hot
            unstable_n += masked.T @ one_hot
    if reduce is not None:
        reduce([hit_sum, hit_n, unstable_sum, unstable_n])
    return PositionPrior(
        frontier_hits=hit_sum / hit_n.clamp(min=1),
        instability=unstable_sum / unstable_n.clamp(min=1),
        settings=settings,
    )


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
