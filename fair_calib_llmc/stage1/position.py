"""The paper's Stage I: a static, policy-agnostic position prior (``stage1.prior.source:
position``).

The full-precision teacher decodes the calibration prompts with a **random** commit order
(the Stage I sampler with LLaDA ``remasking: random`` / Dream ``alg: origin``: which position
is written when does not follow any decoding policy, as in pre-training corruption). In every
probe rollout of ``T`` steps, every answer position ``i`` collects

    w_i += lambda0(t) * 1[i committed at step t] + lambda1 * c(t, i) * 1[i still masked at t]

* ``lambda0(t) = commit_weight * s(t)`` with the schedule ``s`` (``u = t / (T - 1)``, 0 at the
  first step and 1 at the last; ``u = 0`` when ``T = 1``):
  ``early``: ``1 + commit_boost * (1 - u)`` (an early commit, made from the least context,
  weighs most), ``late``: ``1 + commit_boost * u``, ``flat``: ``1``;
* "still masked at ``t``": masked in the state step ``t`` reads and not committed by step
  ``t`` (so each masked position of a state falls under exactly one of the two terms);
* ``c(t, i)`` is the teacher's confidence at ``i`` in the state of step ``t``
  (``probability``: top-1 probability; ``neg_entropy``: ``1 - H / log V`` with ``V`` the
  vocabulary size, in ``[0, 1]``; ``margin``: top-1 minus top-2 probability), **row-normalised**:
  divided by its sum over the positions still masked in that row at that step, so each step
  hands out ``lambda1`` in total over the masked positions (nothing when none is left);
* ``lambda1 = masked_weight``.

The per-position totals are averaged over all probe rollouts (every prompt, every round,
every ``torchrun`` rank), giving ONE weight per answer position index (not per token or
state), normalised to mean 1 over the window. A calibration row (clean text or a masked-stage
state, ``prompt_length + gen_length`` tokens) carries the vector on its trailing ``K =
window`` positions (answer indices ``gen_length - K .. gen_length - 1``, position ``i`` of the
answer always at column ``prompt_length + i``, before Dream's one-column shift) and weight 0
elsewhere, which Stage I's joint normalisation turns into the floor ``prior.min_weight``.

What shapes the vector: under a uniform random order (one block, ``block_length =
gen_length``, or Dream ``origin``) every answer position's commit step has the same
distribution, so ``lambda0``, whatever its schedule, adds the same expected weight to every
position: the frontier-hit term then only dilutes the masked-stage term (and adds finite-probe
noise), and ``early`` against ``late`` differs by noise alone. The schedule gives the vector a
position profile only through the sampler's semi-autoregressive blocks (``block_length <
gen_length``: a later block commits later). The masked-stage term carries the teacher's own
profile (how confident it is at each position while it is still masked).

The paper gives neither ``lambda0``'s formula, ``lambda1`` nor the floor: the defaults below
were swept on the development seed only, never on the benchmark's seeds, and kept
(``docs/results.md``, "The position prior's constants"). Ablations: ``masked_weight: 0``
(the frontier-hit term only), ``commit_weight: 0`` (the masked-stage term only),
``commit_schedule: late`` against ``early``.

The maths is :func:`probe_position_weights` (plain tensors, one probe batch);
:func:`estimate_position_prior` runs the probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fair_calib_llmc.models.family import DiffusionLMSpec
from fair_calib_llmc.models.registry import family
from fair_calib_llmc.sampling.samplers import SamplerBase, progress
from fair_calib_llmc.stage1.sources import CalibrationRows, to_deciding_columns

__all__ = [
    "PositionSettings",
    "StaticPositionPrior",
    "commit_schedule",
    "estimate_position_prior",
    "probe_confidence",
    "probe_position_weights",
    "probe_sampler",
]

Confidence = Literal["probability", "neg_entropy", "margin"]


class PositionSettings(BaseModel):
    """The static position prior (module docstring: the formula each field enters).

    :param probe_rounds: random-order rollouts of every calibration prompt (each round draws
        new orders); probes = prompts x rounds
    :param probe_batch_size: prompts decoded at once in a probe rollout
    :param commit_weight: scale of ``lambda0`` (0: the masked-stage term only)
    :param commit_schedule: ``early`` / ``late`` / ``flat`` shape of ``lambda0`` over the steps
    :param commit_boost: how much more the first (``early``) or last (``late``) step's commit
        weighs than the opposite end's
    :param masked_weight: ``lambda1`` (0: the frontier-hit term only)
    :param confidence: ``c(t, i)``: ``probability``, ``neg_entropy`` or ``margin``
    :param window: ``K``, the trailing positions that carry the vector; ``None``: the whole
        answer (the sampler's ``gen_length``)
    """

    model_config = ConfigDict(extra="forbid")

    probe_rounds: int = Field(1, ge=1, description="random-order rollouts per prompt")
    probe_batch_size: int = Field(64, ge=1, description="prompts per probe rollout batch")
    commit_weight: float = Field(1.0, ge=0.0, description="scale of lambda0 (frontier hits)")
    commit_schedule: Literal["early", "late", "flat"] = Field(
        "early", description="lambda0 over the steps: early commits weigh more, late, or flat"
    )
    commit_boost: float = Field(1.0, ge=0.0, description="extra weight at the boosted end")
    masked_weight: float = Field(1.0, ge=0.0, description="lambda1 (masked-stage confidence)")
    confidence: Confidence = Field("probability", description="the teacher's confidence c")
    window: int | None = Field(None, gt=0, description="K trailing positions; None: gen_length")

    @model_validator(mode="after")
    def _some_term(self) -> PositionSettings:
        if self.commit_weight == 0 and self.masked_weight == 0:
            raise ValueError(
                "stage1.prior.position has commit_weight 0 and masked_weight 0, so every "
                "position weighs nothing; set one of them above 0 (or prior.source: uniform)"
            )
        return self

    def check_window(self, gen_length: int) -> None:
        """Refuse a window longer than the answer, naming the fix."""
        if self.window is not None and self.window > gen_length:
            raise ValueError(
                f"stage1.prior.position.window ({self.window}) exceeds the sampler's "
                f"gen_length ({gen_length}); set window <= {gen_length} (or null: the whole "
                "answer) or raise stage1.sampler.gen_length"
            )


def commit_schedule(settings: PositionSettings, steps: int) -> torch.Tensor:
    """``(steps,)`` ``lambda0(t)`` (module docstring)."""
    u = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    shape = {
        "early": 1 + settings.commit_boost * (1 - u),
        "late": 1 + settings.commit_boost * u,
        "flat": torch.ones(steps, dtype=torch.float64),
    }[settings.commit_schedule]
    return settings.commit_weight * shape


def probe_confidence(logits: torch.Tensor, kind: Confidence) -> torch.Tensor:
    """``(..., L)`` confidence of aligned ``(..., L, V)`` logits (module docstring)."""
    probs = logits.float().softmax(-1)
    if kind == "probability":
        return probs.amax(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # a -inf logit adds 0, not nan
    return (1 - entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def probe_position_weights(
    committed: torch.Tensor,
    masked: torch.Tensor,
    confidence: torch.Tensor,
    settings: PositionSettings,
) -> torch.Tensor:
    """``(B, G)`` summed ``w_i`` of one probe batch (module docstring).

    :param committed: ``(T, B, G)`` bool, answer position committed at step ``t``
    :param masked: ``(T, B, G)`` bool, masked in the state step ``t`` reads
    :param confidence: ``(T, B, G)`` the teacher's confidence in that state
    """
    if not committed.shape == masked.shape == confidence.shape:
        raise ValueError(
            f"committed {tuple(committed.shape)}, masked {tuple(masked.shape)} and confidence "
            f"{tuple(confidence.shape)} must all be (steps, batch, answer)"
        )
    lambda0 = commit_schedule(settings, committed.shape[0])[:, None, None]
    frontier = (lambda0 * committed.double()).sum(0)
    still = masked & ~committed
    c = confidence.double().clamp(min=0.0) * still
    share = c / c.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (frontier + settings.masked_weight * share.sum(0)).float()


def probe_sampler(sampler: SamplerBase) -> SamplerBase:
    """The Stage I sampler with a random commit order (its steps, answer length, blocks and
    temperature kept): the family's ``random_order`` (LLaDA ``remasking: random``, Dream
    ``alg: origin``)."""
    return sampler.model_copy(update=dict(family(sampler.family).random_order))


@dataclass
class StaticPositionPrior:
    """One weight per answer position index, from random-order probes (module docstring).

    :param per_position: ``(gen_length,)`` the mean probe weight of each answer position,
        normalised to mean 1 over the window (0 before it)
    :param probes: probe rollouts averaged, over all ranks
    """

    per_position: torch.Tensor
    probes: int
    settings: PositionSettings

    @property
    def window(self) -> int:
        return self.settings.window or self.per_position.numel()

    def row_weights(self, rows: CalibrationRows) -> torch.Tensor:
        """The vector on every row's answer positions (its window), 0 elsewhere; column
        frame (:mod:`fair_calib_llmc.stage1.sources`)."""
        if rows.answer_length != self.per_position.numel():
            raise ValueError(
                f"the rows have {rows.answer_length} answer positions, the position prior "
                f"{self.per_position.numel()}; build both with the same stage1.sampler"
            )
        weights = torch.zeros(rows.input_ids.shape)
        weights[:, rows.prompt_length :] = self.per_position
        return to_deciding_columns(weights, rows.spec, fill=0.0)


def estimate_position_prior(
    model: nn.Module,
    sampler: SamplerBase,
    prompts: Sequence[torch.Tensor],
    settings: PositionSettings,
    spec: DiffusionLMSpec,
    *,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> StaticPositionPrior:
    """Run the random-order probes of ``prompts`` (equal lengths) and average ``w_i``.

    Round ``r`` on rank ``rank`` decodes with seed ``seed + r * world + rank`` so no two
    ranks draw the same orders; ``reduce`` sums the totals over ranks
    (:func:`fair_calib_llmc.distributed.all_reduce_sum`). Under ``torchrun`` the probes are
    other draws than one process's, so the prior agrees with it in expectation, not bit for bit.
    """
    settings.check_window(sampler.gen_length)
    probe = probe_sampler(sampler)
    total = torch.zeros(sampler.gen_length, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    batches = [
        torch.stack(list(prompts[start : start + settings.probe_batch_size]))
        for start in range(0, len(prompts), settings.probe_batch_size)
    ]
    desc = f"position-prior probes ({len(prompts)} prompts x {settings.probe_rounds})"
    with progress(total=probe.steps * len(batches) * settings.probe_rounds, desc=desc) as bar:
        for round_ in range(settings.probe_rounds):
            for batch in batches:
                run_seed = seed + round_ * world + rank
                committed, masked, confidence = _probe(
                    model, probe, batch, run_seed, spec, bar, settings.confidence
                )
                weights = probe_position_weights(committed, masked, confidence, settings)
                total += weights.double().sum(0)
                count += weights.shape[0]
    if reduce is not None:
        reduce([total, count])
    if count.item() == 0:
        raise ValueError(
            "the position prior needs at least one probe; the calibration set is empty"
        )
    return StaticPositionPrior(
        per_position=window_vector(total / count, settings.window),
        probes=int(count.item()),
        settings=settings,
    )


def _probe(model, probe, batch, seed, spec, bar, kind: Confidence = "probability"):
    """One random-order rollout of ``batch``: ``(T, B, G)`` commits, masks and the teacher's
    confidence on the answer positions."""
    confidence: list[torch.Tensor] = []
    prompt_length = batch.shape[1]

    def keep_confidence(_step, _state, logits):
        confidence.append(probe_confidence(logits[:, prompt_length:], kind).cpu())
        bar.update()

    trace = probe.generate(model, batch, seed=seed, on_step=keep_confidence, spec=spec)
    trace = trace.to("cpu")
    answer = slice(prompt_length, None)
    return trace.committed[:, :, answer], trace.masked[:, :, answer], torch.stack(confidence)


def window_vector(mean: torch.Tensor, window: int | None) -> torch.Tensor:
    """The mean probe weights kept on the trailing ``window`` answer positions (0 before),
    normalised to mean 1 there."""
    keep = mean.numel() if window is None else window
    vector = torch.zeros_like(mean)
    tail = mean[mean.numel() - keep :]
    vector[mean.numel() - keep :] = tail / tail.mean().clamp(min=torch.finfo(tail.dtype).tiny)
    return vector.float()
