"""Diffusion-aware calibration data: masked-stage states (or clean text) with per-token weights.

A causal LM is calibrated on text; a dLLM never sees clean text at inference, only partially
masked answers. With ``stage1.inputs: states`` (the default) this module turns raw
calibration text into exactly those inputs:

1. cut a prompt of ``prompt_length`` tokens from each text;
2. run the full-precision teacher with its real sampler on the prompts (Stage I rollouts);
3. emit ``states_per_prompt`` masked-stage states per rollout (``input_ids`` with mask tokens
   where the answer is still masked at that step).

With ``stage1.inputs: text`` (the paper's teacher-forced calibration) every row is instead
``prompt_length + gen_length`` tokens of the calibration text itself, fully observed (no mask
token), the last ``gen_length`` of them standing where an answer would.

Either way ONE weight source (:mod:`fair_calib_llmc.stage1.sources`; ``stage1.prior.source``)
weighs the rows, and the weights are normalised jointly and floored. The result is an ordinary
``datasets.Dataset`` (``input_ids``, ``attention_mask``, ``loss_mask``) for
``llmcompressor.oneshot(dataset=..., use_loss_mask=True)``. The FP hidden-state targets are
the teacher's own activations on these ``input_ids``, which the sequential pipeline computes
layer by layer. For Dream, whose logit column ``i - 1`` predicts position ``i``, weights move
one column left so they land on the hidden state that makes the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch
from datasets import Dataset
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fair_calib_llmc.distributed import all_reduce_sum, my_share, rank_and_world
from fair_calib_llmc.io.data import check_prompt_count, prompts_from_texts
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.models.registry import sampler_classes
from fair_calib_llmc.sampling.samplers import (
    DiffusionTrace,
    SamplerBase,
    default_sampler,
    teacher_traces,
)
from fair_calib_llmc.stage1.position import estimate_position_prior
from fair_calib_llmc.stage1.prior import FrontierPrior, PriorSettings, normalise_weights
from fair_calib_llmc.stage1.sources import CalibrationRows, UniformWeights, WeightSource

__all__ = [
    "Stage1Settings",
    "WeightStats",
    "check_prompt_count",
    "prompts_from_texts",
    "build_calibration_dataset",
    "weight_source",
]

#: A family's own sampler, told apart by its ``family`` field (a registered family's name).
SamplerSettings = Annotated[Union[sampler_classes()], Field(discriminator="family")]  # noqa: UP007

#: Sources that weigh masked-stage states from their own rollouts (no clean text).
STATE_SOURCES = ("state",)


def _valid_fields(model: type[BaseModel], error: dict) -> str:
    """For a misspelt field, the fields valid where it stands (``; valid: ...``)."""
    if error["type"] != "extra_forbidden":
        return ""
    for key in error["loc"][:-1]:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return f"; valid: {', '.join(model.model_fields)}"


class Stage1Settings(BaseModel):
    """How Stage I turns calibration text into weighted calibration rows (the one home of
    Stage I's settings).

    :param prior: the weight source and its coefficients (:class:`PriorSettings`)
    :param sampler: the rollout sampler, e.g. ``{family: llada, steps: 32, gen_length: 32,
        block_length: 32}``; ``None`` = one commit per step over a 32-token answer. Its
        ``gen_length`` is the answer length of every row, text rows included
    :param prompt_length: tokens of calibration text used as the rollout prompt (with
        ``inputs: text``, the row's leading part)
    :param states_per_prompt: masked-stage states kept per rollout (evenly spaced steps;
        ``inputs: states`` only)
    :param inputs: ``states``: masked-stage states of the teacher's rollouts; ``text``: fully
        observed calibration text of ``prompt_length + gen_length`` tokens (teacher forcing,
        the paper's Stage II input), weighed by ``prior.source: position`` or ``uniform``
    """

    model_config = ConfigDict(extra="forbid")

    prior: PriorSettings = Field(default_factory=PriorSettings)
    sampler: SamplerSettings | None = None
    prompt_length: int = Field(32, gt=0)
    states_per_prompt: int = Field(4, gt=0)
    inputs: Literal["states", "text"] = "states"

    @model_validator(mode="after")
    def _consistent(self) -> Stage1Settings:
        if self.inputs == "text" and self.prior.source in STATE_SOURCES:
            raise ValueError(
                f"stage1.inputs: text has no masked-stage states for prior.source: "
                f"{self.prior.source}; set prior.source: position (the paper's prior for clean "
                "text) or uniform, or inputs: states"
            )
        if self.sampler is not None:
            self.prior.position.check_window(self.sampler.gen_length)
        return self

    @classmethod
    def parse(cls, value: Stage1Settings | dict | None) -> Stage1Settings:
        """``value`` as settings (``None``: the defaults), or a ``ValueError`` on one line
        naming every bad field (``stage1.<field>: <what is wrong>``)."""
        if isinstance(value, Stage1Settings):
            value = value.model_dump()
        try:
            return cls.model_validate(value or {})
        except ValidationError as err:
            problems = "; ".join(
                f"stage1.{'.'.join(str(p) for p in e['loc'])}: " * bool(e["loc"])
                + e["msg"].removeprefix("Value error, ")
                + ("" if e["type"] == "value_error" else f" (got {e.get('input')!r})")
                + _valid_fields(cls, e)
                for e in err.errors()
            )
            raise ValueError(f"bad Stage I settings: {problems}") from None

    def check_family(self, family: str) -> None:
        """Refuse a configured sampler of another model family than ``family``, naming the
        fix (callers that know the family before loading the model check it early)."""
        if self.sampler is not None and self.sampler.family != family:
            raise ValueError(
                f"stage1.sampler is a {self.sampler.family} sampler but the model is a "
                f"{family} dLLM; set stage1.sampler.family: {family}"
            )

    def sampler_for(self, spec: DiffusionLMSpec) -> SamplerBase:
        """The configured sampler, checked against the model family and the position prior's
        window, or the default one."""
        self.check_family(spec.family)
        sampler = self.sampler if self.sampler is not None else default_sampler(spec)
        self.prior.position.check_window(sampler.gen_length)
        if self.inputs == "states" and self.states_per_prompt > sampler.steps:
            raise ValueError(
                f"states_per_prompt ({self.states_per_prompt}) exceeds the sampler's steps "
                f"({sampler.steps}); lower stage1.states_per_prompt or raise the sampler's steps"
            )
        return sampler


@dataclass(frozen=True)
class WeightStats:
    """Where Stage I put the loss mass: read this to see whether the weighting can matter.

    Clean-text rows (``inputs: text``) have no frontier: the three frontier fields are 0.
    """

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
) -> tuple[Dataset, WeightSource, WeightStats]:
    """Stage I: calibration rows (masked-stage states or clean text) weighed by one source.

    Returns the dataset, the weight source (:class:`~fair_calib_llmc.stage1.prior.FrontierPrior`;
    with its estimate, the vector of :class:`~fair_calib_llmc.stage1.position.StaticPositionPrior`;
    :class:`~fair_calib_llmc.stage1.sources.UniformWeights`) and where the weight went
    (:class:`WeightStats`).

    :param spec: the run's :class:`~fair_calib_llmc.models.family.DiffusionLMSpec`
        (:func:`fair_calib_llmc.quantize` passes its own); called on its own, this reads it
        off ``model`` and ``tokenizer``
    """
    settings = settings or Stage1Settings()
    if spec is None:  # called on its own (an entry point, as in the examples)
        spec = diffusion_spec(model, tokenizer)
    sampler = settings.sampler_for(spec)  # every setting checked before any rollout
    text = settings.inputs == "text"
    length = settings.prompt_length + (sampler.gen_length if text else 0)
    need = (
        f"with stage1.inputs: text a row is stage1.prompt_length ({settings.prompt_length}) + "
        f"the sampler's gen_length ({sampler.gen_length}) tokens; pass longer texts or lower "
        "either"
        if text
        else None
    )
    # under torchrun each process takes its share; the prior and the normalisation are
    # summed over processes (fair_calib_llmc.distributed)
    cut = my_share(prompts_from_texts(texts, tokenizer, length, max_prompts, need=need))
    prompts = [row[: settings.prompt_length] for row in cut]
    if text:
        rows, rollouts = text_rows(cut, settings.prompt_length, spec), []
    else:
        logger.info(f"Stage I: {len(prompts)} teacher rollouts, {sampler!r}")
        rollouts = [
            trace.to("cpu")
            for _, trace in teacher_traces(model, sampler, prompts, seed=seed, spec=spec)
        ]
        rows = state_rows(rollouts, sampler.steps, settings.states_per_prompt, spec)
    source = weight_source(model, settings, sampler, prompts, spec, seed=seed)
    raw = source.row_weights(rows)
    weights = normalise_weights(list(raw), settings.prior.min_weight, all_reduce_sum)
    stats = weight_stats(weights, list(rows.frontier()))
    logger.info(
        f"Stage I: {len(weights)} {'clean-text rows' if text else 'masked-stage states'}, "
        f"{settings.prior.source} weights; weight max/mean {stats.max_over_mean:.2f}, frontier "
        f"tokens {stats.frontier_token_share:.1%} of tokens carry "
        f"{stats.frontier_mass_share:.1%} of the weight"
    )
    dataset = Dataset.from_dict(
        {
            "input_ids": rows.input_ids.tolist(),
            "attention_mask": torch.ones_like(rows.input_ids).tolist(),
            "loss_mask": [w.tolist() for w in weights],
        }
    )
    return dataset, source, stats


def weight_source(
    model: torch.nn.Module,
    settings: Stage1Settings,
    sampler: SamplerBase,
    prompts: Sequence[torch.Tensor],
    spec: DiffusionLMSpec,
    *,
    seed: int = 0,
) -> WeightSource:
    """The one place Stage I branches on ``stage1.prior.source``: the source, estimated.

    :param prompts: this rank's calibration prompts (the position prior's probes decode them)
    """
    prior = settings.prior
    if prior.source == "uniform":
        return UniformWeights()
    if prior.source == "position":
        rank, world = rank_and_world()
        return estimate_position_prior(
            model,
            sampler,
            prompts,
            prior.position,
            spec,
            seed=seed,
            rank=rank,
            world=world,
            reduce=all_reduce_sum,
        )
    return FrontierPrior(prior)  # weighs each state by its own rollout: nothing to estimate


def state_rows(
    rollouts: list[DiffusionTrace], steps: int, states_per_prompt: int, spec: DiffusionLMSpec
) -> CalibrationRows:
    """``states_per_prompt`` masked-stage states of every rollout, at evenly spaced steps."""
    picks = torch.linspace(0, steps - 1, states_per_prompt).round().long().unique().tolist()
    groups = [(trace, step) for trace in rollouts for step in picks]
    input_ids = torch.cat([trace.states(spec.mask_token_id)[step] for trace, step in groups])
    return CalibrationRows(input_ids, rollouts[0].prompt_length, spec, groups)


def text_rows(
    cut: Sequence[torch.Tensor], prompt_length: int, spec: DiffusionLMSpec
) -> CalibrationRows:
    """Clean-text rows (teacher forcing): the cut texts as they are, refused if one holds the
    mask token (a clean row has none)."""
    input_ids = torch.stack(list(cut))
    holding = int((input_ids == spec.mask_token_id).any(dim=1).sum())
    if holding:
        raise ValueError(
            f"{holding} calibration text(s) hold the mask token ({spec.mask_token_id}), which "
            "clean-text rows (stage1.inputs: text) must not; remove it from the calibration text"
        )
    return CalibrationRows(input_ids, prompt_length, spec)


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
