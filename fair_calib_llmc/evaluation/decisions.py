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
from fair_calib_llmc.io.data import check_prompt_count, prompts_from_texts
from fair_calib_llmc.io.reload import load_quantized
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.sampling.samplers import default_sampler, teacher_traces

__all__ = [
    "DecisionSettings",
    "SeedRollouts",
    "METRICS",
    "load_checkpoint",
    "check_pair",
    "teacher_rollouts",
    "student_rows",
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
        check_prompt_count(self.eval_prompts, "eval_prompts")

    def sampler(self, spec):
        overrides = {}
        if self.steps is not None:
            overrides["steps"] = self.steps
        if self.block_length is not None:
            if spec.family != "llada":
                raise ValueError("--block-length is a LLaDA sampler setting; Dream has no blocks")
            overrides["block_length"] = self.block_length
        return default_sampler(spec, self.gen_length, **overrides)


@dataclass
class SeedRollouts:
    seed: int
    prompts: list[torch.Tensor]
    traces: list
    heldout: list[torch.Tensor]
    teacher_elbo_ppl: float


def load_checkpoint(path: str | os.PathLike, *, dtype="auto", device=None):
    """(model, tokenizer) of a LLaDA / Dream checkpoint dir, FP or compressed, exactly as
    saved (:func:`fair_calib_llmc.io.reload.load_quantized`); fails early on anything else."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    model = load_quantized(path, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    diffusion_spec(model, tokenizer)  # not a dLLM / no mask token: a clear error, now
    return model, tokenizer


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must share family, vocabulary and mask token."""
    t, s = diffusion_spec(teacher), diffusion_spec(student)
    t_vocab = teacher.get_input_embeddings().num_embeddings
    s_vocab = student.get_input_embeddings().num_embeddings
    if (t.family, t.mask_token_id, t_vocab) != (s.family, s.mask_token_id, s_vocab):
        raise ValueError(
            f"teacher ({t.family}, mask {t.mask_token_id}, vocab {t_vocab}) and student "
            f"({s.family}, mask {s.mask_token_id}, vocab {s_vocab}) are not the same model; "
            "pass the full-precision checkpoint the student was quantized from"
        )


def teacher_rollouts(
    teacher: nn.Module, tokenizer, texts: Sequence[str], settings: DecisionSettings
) -> list[SeedRollouts]:
    """Per seed: draw prompts and held-out texts, roll the teacher out, score its ELBO."""
    sampler = settings.sampler(diffusion_spec(teacher, tokenizer))
    rollouts = []
    for seed in settings.seeds:
        shuffled = random.Random(seed).sample(list(texts), len(texts))
        prompts = prompts_from_texts(
            shuffled, tokenizer, settings.prompt_length, settings.eval_prompts
        )
        heldout = [
            torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])[
                : settings.heldout_length
            ]
            for t in shuffled[: settings.heldout_texts]
        ]
        heldout = [h for h in heldout if h.numel() > 1]
        rollouts.append(
            SeedRollouts(
                seed=seed,
                prompts=prompts,
                traces=teacher_traces(teacher, sampler, prompts, seed=seed),
                heldout=heldout,
                teacher_elbo_ppl=_elbo(teacher, heldout, settings, seed),
            )
        )
    return rollouts


def student_rows(
    name: str,
    teacher: nn.Module,
    student: nn.Module,
    rollouts: Sequence[SeedRollouts],
    settings: DecisionSettings,
    *,
    elbo: bool = True,
    **labels,
) -> list[dict]:
    """One result row per seed for ``student`` (``labels`` are copied into every row)."""
    sampler = settings.sampler(diffusion_spec(teacher))
    rows = []
    for r in rollouts:
        report = compare_decisions(
            teacher, student, sampler, r.prompts, seed=r.seed, traces=r.traces
        )
        row = {"name": name, **labels, "seed": r.seed, **report.as_row()}
        if elbo:
            row["elbo_ppl"] = _elbo(student, r.heldout, settings, r.seed)
        row["flips_per_step"] = report.flips_per_step
        row["flips_per_position"] = report.flips_per_position
        rows.append(row)
    return rows


def _elbo(model, heldout, settings: DecisionSettings, seed: int) -> float | None:
    if not heldout:
        return None
    return elbo_perplexity(model, heldout, mc_samples=settings.elbo_samples, seed=seed)
