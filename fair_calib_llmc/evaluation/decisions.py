"""Shared core of ``evaluate`` and ``diagnose``: teacher rollouts per seed, student metrics per
seed, summaries over seeds, and the files written next to the results.

A seed fixes which prompts are drawn from the user's texts and the sampler's noise; the teacher
is rolled out once per seed and every student replays the same traces
(:func:`fair_calib_llmc.evaluation.metrics.compare_decisions`), so students differ only by
their weights.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from fair_calib_llmc.evaluation.metrics import compare_decisions, elbo_perplexity
from fair_calib_llmc.evaluation.report import METRICS
from fair_calib_llmc.io.data import check_prompt_count, heldout_tokens, prompts_from_texts
from fair_calib_llmc.io.reload import load_quantized
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.models.registry import family, sampler_classes
from fair_calib_llmc.sampling.samplers import (
    SamplerBase,
    default_sampler,
    teacher_traces,
)

__all__ = [
    "DecisionSettings",
    "EvaluationContext",
    "SeedRollouts",
    "METRICS",
    "check_pair",
    "load_checkpoint",
]


@dataclass
class DecisionSettings:
    """How many prompts, how long, which seeds; the sampler is the family's own."""

    seeds: tuple[int, ...] = (0, 1, 2)
    eval_prompts: int = 16
    prompt_length: int = 32
    gen_length: int = 32
    steps: int | None = None  # default: gen_length (one token per step)
    block_length: int | None = None  # LLaDA only; default: gen_length
    heldout_texts: int = 16  # 0: no ELBO perplexity
    heldout_length: int = 128
    elbo_samples: int = 8

    def __post_init__(self) -> None:
        """Nonsense fails here, before any model loads: a negative ``heldout_texts`` once
        meant "all but one" (minutes of ELBO), bad sampler settings failed after both loads."""
        check_prompt_count(self.eval_prompts, "eval_prompts")
        if self.heldout_texts < 0:
            raise ValueError(
                f"heldout_texts (--elbo-texts) must be 0 (no ELBO) or more, got "
                f"{self.heldout_texts}"
            )
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be a positive integer, got {value}")
        # every family's sampler checks (LLaDA's: block_length divides gen_length, a step per
        # block) on the settings it takes, before the family is known
        settings = {
            "gen_length": self.gen_length,
            "steps": self.steps or self.gen_length,
            "block_length": self.block_length or self.gen_length,
        }
        for sampler in sampler_classes():
            try:
                sampler(**{k: v for k, v in settings.items() if k in sampler.model_fields})
            except ValueError as err:  # pydantic's ValidationError is a ValueError
                errors = getattr(err, "errors", None)
                message = errors()[0]["msg"] if callable(errors) else str(err)
                raise ValueError(message.removeprefix("Value error, ")) from None

    def sampler(self, spec):
        overrides = {}
        if self.steps is not None:
            overrides["steps"] = self.steps
        if self.block_length is not None:
            if "block_length" not in family(spec.family).sampler.model_fields:
                raise ValueError(
                    f"--block-length is a setting of block samplers; the {spec.family} sampler "
                    "has no blocks: leave --block-length out"
                )
            overrides["block_length"] = self.block_length
        return default_sampler(spec, self.gen_length, **overrides)


@dataclass
class SeedRollouts:
    """One seed of an :class:`EvaluationContext`: its prompts, the teacher's traces on them,
    the held-out token sequences and the teacher's ELBO perplexity on those."""

    seed: int
    prompts: list[torch.Tensor]
    traces: list
    heldout: list[torch.Tensor]
    teacher_elbo_ppl: float | None


@dataclass
class EvaluationContext:
    """Everything a student is measured against, built once per run: the teacher, its
    tokenizer and :class:`~fair_calib_llmc.models.family.DiffusionLMSpec`, the sampler, and
    per seed the prompts, the teacher's traces, the held-out text and the teacher's ELBO.

    ``evaluate``, ``diagnose`` and the benchmark (:func:`fair_calib_llmc.evaluation.demo.
    run_benchmark`) each build one (:meth:`build`, :meth:`from_prompts`) and measure every
    student with :meth:`measure` / :meth:`student_rows`, so students differ only by their
    weights.
    """

    teacher: nn.Module
    tokenizer: object
    spec: DiffusionLMSpec
    sampler: SamplerBase
    rollouts: list[SeedRollouts]
    elbo_samples: int = 8
    #: the seed of the ELBO's mask draws; None: each rollout's own seed
    elbo_seed: int | None = None

    @classmethod
    def from_prompts(
        cls,
        teacher: nn.Module,
        tokenizer,
        sampler: SamplerBase,
        prompts: dict[int, list[torch.Tensor]],
        heldout: dict[int, list[torch.Tensor]],
        *,
        spec: DiffusionLMSpec,
        elbo_samples: int = 8,
        elbo_seed: int | None = None,
    ) -> EvaluationContext:
        """Roll the teacher out on each seed's ``prompts`` and score its ELBO on that seed's
        ``heldout`` token sequences (the caller decides how a seed draws them; seeds that
        share one held-out list and one ``elbo_seed`` share one teacher ELBO)."""
        context = cls(teacher, tokenizer, spec, sampler, [], elbo_samples, elbo_seed)
        teacher_elbo: dict[tuple[int, int], float | None] = {}
        for seed, seed_prompts in prompts.items():
            key = (id(heldout[seed]), seed if elbo_seed is None else elbo_seed)
            if key not in teacher_elbo:
                teacher_elbo[key] = context.elbo(teacher, heldout[seed], seed)
            context.rollouts.append(
                SeedRollouts(
                    seed=seed,
                    prompts=seed_prompts,
                    traces=teacher_traces(teacher, sampler, seed_prompts, seed=seed, spec=spec),
                    heldout=heldout[seed],
                    teacher_elbo_ppl=teacher_elbo[key],
                )
            )
        return context

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        tokenizer,
        texts: Sequence[str],
        settings: DecisionSettings,
        *,
        spec: DiffusionLMSpec,
    ) -> EvaluationContext:
        """``evaluate`` / ``diagnose``: per seed, shuffle ``texts``, cut prompts from them,
        take the first ``settings.heldout_texts`` as held-out text, roll the teacher out."""
        prompts, heldout = {}, {}
        for seed in settings.seeds:
            shuffled = random.Random(seed).sample(list(texts), len(texts))
            prompts[seed] = prompts_from_texts(
                shuffled, tokenizer, settings.prompt_length, settings.eval_prompts
            )
            heldout[seed] = heldout_tokens(
                tokenizer, shuffled[: settings.heldout_texts], settings.heldout_length
            )
        return cls.from_prompts(
            teacher,
            tokenizer,
            settings.sampler(spec),
            prompts,
            heldout,
            spec=spec,
            elbo_samples=settings.elbo_samples,
        )

    def elbo(self, model: nn.Module, heldout: Sequence[torch.Tensor], seed: int) -> float | None:
        """``model``'s ELBO perplexity on ``heldout`` (None without held-out text)."""
        if not heldout:
            return None
        seed = seed if self.elbo_seed is None else self.elbo_seed
        return elbo_perplexity(
            model, heldout, spec=self.spec, mc_samples=self.elbo_samples, seed=seed
        )

    def measure(self, student: nn.Module, rollout: SeedRollouts, *, elbo: bool = True) -> dict:
        """One seed's metrics of ``student``: the decision metrics, ``elbo_ppl`` (with
        ``elbo``) and the per-step / per-position flip rates."""
        report = compare_decisions(
            self.teacher,
            student,
            self.sampler,
            rollout.prompts,
            seed=rollout.seed,
            traces=rollout.traces,
            spec=self.spec,
        )
        row = report.as_row()
        if elbo:
            row["elbo_ppl"] = self.elbo(student, rollout.heldout, rollout.seed)
        row["flips_per_step"] = report.flips_per_step
        row["flips_per_position"] = report.flips_per_position
        return row

    def student_rows(
        self, name: str, student: nn.Module, *, elbo: bool = True, **labels
    ) -> list[dict]:
        """One result row per seed for ``student`` (``labels`` are copied into every row)."""
        return [
            {"name": name, **labels, "seed": r.seed, **self.measure(student, r, elbo=elbo)}
            for r in self.rollouts
        ]


def check_pair(
    spec: DiffusionLMSpec, teacher: nn.Module, s: DiffusionLMSpec, student: nn.Module
) -> None:
    """The student (spec ``s``) must share the teacher's (``spec``'s) family, vocabulary and
    mask token."""
    t_vocab = teacher.get_input_embeddings().num_embeddings
    s_vocab = student.get_input_embeddings().num_embeddings
    if (spec.family, spec.mask_token_id, t_vocab) != (s.family, s.mask_token_id, s_vocab):
        raise ValueError(
            f"teacher ({spec.family}, mask {spec.mask_token_id}, vocab {t_vocab}) and student "
            f"({s.family}, mask {s.mask_token_id}, vocab {s_vocab}) are not the same model; "
            "pass the full-precision checkpoint the student was quantized from"
        )


def load_checkpoint(path: str | os.PathLike, *, dtype="auto", device=None):
    """(model, tokenizer, spec) of a LLaDA / Dream checkpoint dir, FP or compressed, exactly
    as saved (:func:`fair_calib_llmc.io.reload.load_quantized`); fails early on anything
    else."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    model = load_quantized(path, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = diffusion_spec(model, tokenizer)  # not a dLLM / no mask token: a clear error, now
    return model, tokenizer, spec
