"""Diffusion-aware calibration data: masked-stage states with per-token frontier weights.

A causal LM is calibrated on text; a dLLM never sees clean text at inference, only partially
masked answers. This module turns raw calibration text into exactly those inputs:

1. cut a prompt of ``prompt_length`` tokens from each text;
2. run the full-precision teacher with its real sampler on the prompts (Stage I rollouts);
3. estimate the :class:`~fair_calib_llmc.stage1.prior.PositionPrior` from the traces;
4. emit ``states_per_prompt`` masked-stage states per rollout (``input_ids`` with mask tokens
   where the answer is still masked at that step) with the prior's per-token weight as a float
   ``loss_mask``.

The result is an ordinary ``datasets.Dataset`` (``input_ids``, ``attention_mask``,
``loss_mask``) for ``llmcompressor.oneshot(dataset=..., use_loss_mask=True)``. The FP
hidden-state targets are the teacher's own activations on these ``input_ids``, which the
sequential pipeline computes layer by layer. For Dream, whose logit column ``i - 1``
predicts position ``i``, weights move one column left so they land on the hidden state that
makes the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from datasets import Dataset
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from fair_calib_llmc.distributed import all_reduce_sum, my_share
from fair_calib_llmc.io.data import check_prompt_count, prompts_from_texts
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.sampling.samplers import (
    DreamSampler,
    LLaDASampler,
    SamplerBase,
    default_sampler,
    teacher_traces,
)
from fair_calib_llmc.stage1.prior import (
    PositionPrior,
    PriorSettings,
    estimate_prior,
    normalise_weights,
)
from fair_calib_llmc.stage1.sensitivity import layer_sensitivity

__all__ = [
    "Stage1Settings",
    "WeightStats",
    "check_prompt_count",
    "prompts_from_texts",
    "build_calibration_dataset",
]

#: A family's own sampler, told apart by its ``family`` field (``llada`` or ``dream``).
SamplerSettings = Annotated[LLaDASampler | DreamSampler, Field(discriminator="family")]


class Stage1Settings(BaseModel):
    """How Stage I turns calibration text into weighted masked-stage states.

    :param prior: coefficients of the frontier prior (:class:`PriorSettings`)
    :param sampler: the rollout sampler, e.g. ``{family: llada, steps: 32, gen_length: 32,
        block_length: 32}``; ``None`` = one commit per step over a 32-token answer
    :param prompt_length: tokens of calibration text used as the rollout prompt
    :param states_per_prompt: masked-stage states kept per rollout (evenly spaced steps)
    """

    model_config = ConfigDict(extra="forbid")

    prior: PriorSettings = Field(default_factory=PriorSettings)
    sampler: SamplerSettings | None = None
    prompt_length: int = Field(32, gt=0)
    states_per_prompt: int = Field(4, gt=0)

    def sampler_for(self, spec: DiffusionLMSpec) -> SamplerBase:
        """The configured sampler, checked against the model family, or the default one."""
        if self.sampler is None:
            return default_sampler(spec)
        if self.sampler.family != spec.family:
            raise ValueError(
                f"stage1.sampler is a {self.sampler.family} sampler but the model is a "
                f"{spec.family} dLLM; set stage1.sampler.family: {spec.family}"
            )
        return self.sampler


@dataclass(frozen=True)
class WeightStats:
    """Where Stage I put the loss mass: read this to see whether the weighting can matter."""

    max_over_mean: float
    frontier_token_share: float  # fraction of tokens committed at their state's step
    frontier_mass_share: float  # fraction of the total weight on those tokens
    committed_is_top_weight: float  # states whose committed token has the largest weight


def build_calibration_dataset(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    settings: Stage1Settings | None = None,
    *,
    max_prompts: int | None = None,
    seed: int = 0,
    spec: DiffusionLMSpec | None = None,
) -> tuple[Dataset, PositionPrior, WeightStats]:
    """Stage I: teacher rollouts -> position prior -> weighted masked-stage states.

    :param spec: the run's :class:`~fair_calib_llmc.models.family.DiffusionLMSpec`
        (:func:`fair_calib_llmc.quantize` passes its own); called on its own, this reads it
        off ``model`` and ``tokenizer``
    """
    settings = settings or Stage1Settings()
    if spec is None:  # called on its own (an entry point, as in the examples)
        spec = diffusion_spec(model, tokenizer)
    sampler = settings.sampler_for(spec)
    # under torchrun each process rolls out its share; the prior and the normalisation are
    # summed over processes (fair_calib_llmc.distributed)
    prompts = my_share(prompts_from_texts(texts, tokenizer, settings.prompt_length, max_prompts))
    if settings.states_per_prompt > sampler.steps:
        raise ValueError(
            f"states_per_prompt ({settings.states_per_prompt}) exceeds the sampler's steps "
            f"({sampler.steps}); lower stage1.states_per_prompt or raise the sampler's steps"
        )
    logger.info(f"Stage I: {len(prompts)} teacher rollouts, {sampler!r}")
    rollouts = teacher_traces(model, sampler, prompts, seed=seed, spec=spec)
    prior = estimate_prior([trace for _, trace in rollouts], settings.prior, all_reduce_sum)

    picks = torch.linspace(0, sampler.steps - 1, settings.states_per_prompt).round().long()
    by_sensitivity = settings.prior.source == "sensitivity"
    input_ids, weights, frontier, decided = [], [], [], []
    for _, trace in rollouts:
        trace = trace.to("cpu")
        states = trace.states(spec.mask_token_id)
        for step in picks.unique().tolist():
            committed = trace.committed[step]
            if by_sensitivity:
                raw = prior.decision_weights(trace, step)  # per decided position, see below
                decided.extend(trace.sequences)
            else:
                raw = prior.raw_weights(trace, step)
            if spec.shift_logits:  # column i-1 decides position i
                committed = torch.cat([committed[:, 1:], committed[:, :1] & False], dim=1)
                if not by_sensitivity:  # sensitivities already sit on the deciding columns
                    raw = torch.cat([raw[:, 1:], torch.ones_like(raw[:, :1])], dim=1)
            input_ids.extend(states[step])
            weights.extend(raw)
            frontier.extend(committed)
    if by_sensitivity:
        weights = list(
            sensitivity_weights(
                model, input_ids, decided, weights, spec, settings.prior.frontier_weight
            )
        )
    weights = normalise_weights(weights, settings.prior.min_weight, all_reduce_sum)
    stats = weight_stats(weights, frontier)
    logger.info(
        f"Stage I: {len(input_ids)} masked-stage states; weight max/mean "
        f"{stats.max_over_mean:.2f}, frontier tokens {stats.frontier_token_share:.1%} of "
        f"tokens carry {stats.frontier_mass_share:.1%} of the weight"
    )
    dataset = Dataset.from_dict(
        {
            "input_ids": [x.tolist() for x in input_ids],
            "attention_mask": [[1] * len(x) for x in input_ids],
            "loss_mask": [w.tolist() for w in weights],
        }
    )
    return dataset, prior, stats


def sensitivity_weights(
    model, states, decided, decision_weights, spec, frontier_weight: float
) -> torch.Tensor:
    """``(N, L)`` raw token weights ``1 + frontier_weight * s_t / max_t s_t`` from the
    teacher's decision sensitivity (:mod:`fair_calib_llmc.stage1.sensitivity`), per state."""
    sensitivity = layer_sensitivity(
        model, torch.stack(states), torch.stack(decided), torch.stack(decision_weights), spec
    ).mean(0)  # one weight per token serves every layer
    peak = sensitivity.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return 1 + frontier_weight * sensitivity / peak


def weight_stats(weights: list[torch.Tensor], frontier: list[torch.Tensor]) -> WeightStats:
    """Summarise normalised token weights against each state's committed (frontier) tokens."""
    flat, hit = torch.cat(weights), torch.cat(frontier)
    tops = [bool(f.any() and w[f].max() >= w.max()) for w, f in zip(weights, frontier, strict=True)]
    return WeightStats(
        max_over_mean=float(flat.max() / flat.mean()),
        frontier_token_share=float(hit.float().mean()),
        frontier_mass_share=float(flat[hit].sum() / flat.sum()),
        committed_is_top_weight=sum(tops) / max(len(tops), 1),
    )
