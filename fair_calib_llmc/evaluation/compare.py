"""``fair-calib-llmc evaluate --teacher FP_DIR --student Q_DIR``: decision-level metrics of any
quantized checkpoint against its full-precision teacher, on the user's prompts.

Per seed the teacher samples answers to prompts drawn from the user's texts; the student
replays them (frontier flip rate, KL on and off the frontier), generates freely with the same
seed (post-commit mismatch, first divergence), and both get the masked-diffusion ELBO
perplexity on held-out texts. Written to ``STUDENT/evaluation/`` unless ``--out`` says otherwise:
``results.json`` (every seed's row with per-step and per-position flip rates), ``results.md``
(mean ± half-range over seeds) and ``flips_per_step.png`` / ``flips_per_position.png``
(averaged over seeds). The output directory is checked before any work, with ``quantize``'s
rules (:func:`~fair_calib_llmc.io.output_dir.check_results_dir`): a non-empty one (a rerun's
``STUDENT/evaluation/`` too) needs ``--overwrite``, and no other directory inside a model
directory is accepted.

Library use: :func:`evaluate_checkpoints`. CLI: :func:`run` (the arguments are defined in
``fair_calib_llmc_cli``, so ``--help`` imports nothing heavy).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from loguru import logger

from fair_calib_llmc.evaluation.decisions import (
    DecisionSettings,
    EvaluationContext,
    check_pair,
    load_checkpoint,
)
from fair_calib_llmc.evaluation.plots import flip_curves
from fair_calib_llmc.evaluation.report import markdown_table, summarise, write_results
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.data import load_texts
from fair_calib_llmc.io.loading import default_device, resolve_dtype
from fair_calib_llmc.io.output_dir import check_results_dir
from fair_calib_llmc.io.output_lock import output_lock

__all__ = ["evaluate_checkpoints", "run"]


def evaluate_checkpoints(
    teacher_dir: str | os.PathLike,
    student_dir: str | os.PathLike,
    texts: list[str] | None = None,
    settings: DecisionSettings = DecisionSettings(),
    *,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
) -> dict:
    """Compare ``student_dir`` with ``teacher_dir``; write and return the results.

    :param texts: prompts / held-out text (default: the shipped held-out text)
    :param overwrite: write over the results files of a non-empty ``out_dir``
    :param dtype: loads both in this dtype (``auto``: the teacher's own); the student is
        always loaded in the teacher's dtype so only the quantization differs
    :return: ``{"rows": [...], "summary": [...], "files": {...}}``
    """
    warn_if_swapped(teacher_dir, student_dir)
    default = Path(student_dir) / "evaluation"
    out_dir = check_results_dir(
        out_dir if out_dir is not None else default,
        {"the teacher's directory": teacher_dir, "the student's directory": student_dir},
        overwrite=overwrite,
        default=default,
    )
    with output_lock(out_dir):  # a second run into out_dir fails now, not at the end
        device = device or default_device()
        texts = texts if texts is not None else shipped_texts("heldout")
        start = time.monotonic()
        teacher, tokenizer, spec = load_checkpoint(teacher_dir, dtype=dtype, device=device)
        dtype = teacher.get_input_embeddings().weight.dtype
        student, _, student_spec = load_checkpoint(student_dir, dtype=dtype, device=device)
        check_pair(spec, teacher, student_spec, student)
        logger.info(f"evaluate: {student_dir} vs {teacher_dir} ({dtype}, {device})")
        context = EvaluationContext.build(teacher, tokenizer, texts, settings, spec=spec)
        rollouts = context.rollouts
        teacher_rows = [
            {"name": "teacher", "seed": r.seed, "elbo_ppl": r.teacher_elbo_ppl} for r in rollouts
        ]
        rows = teacher_rows + context.student_rows("student", student)
        summary = summarise(rows)
        table = markdown_table(summary)
        footer = (
            f"\nteacher `{teacher_dir}`, student `{student_dir}`; {len(settings.seeds)} seed(s) "
            f"{list(settings.seeds)}, {len(rollouts[0].prompts)} prompts x {settings.gen_length} "
            f"tokens per seed; {dtype}, {device}; {time.monotonic() - start:.0f} s"
        )
        payload = {
            "teacher": str(teacher_dir),
            "student": str(student_dir),
            "settings": settings,
            "dtype": dtype,
            "rows": rows,
            "summary": summary,
        }
        files = write_results(
            out_dir, payload, table + "\n" + footer, flip_curves(rows), overwrite=overwrite
        )
        return {"rows": rows, "summary": summary, "table": table, "files": files}


def _quantized(directory: str | os.PathLike) -> bool | None:
    """Whether a checkpoint directory's config.json has a ``quantization_config`` (``None``:
    no readable config.json, left to the loader's own error)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return isinstance(config, dict) and "quantization_config" in config


def warn_if_swapped(teacher_dir, student_dir) -> bool:
    """Warn, before anything loads, when the teacher is the quantized checkpoint and the
    student is not: the metrics would then measure the wrong way round. Returns whether it
    warned."""
    if _quantized(teacher_dir) and _quantized(student_dir) is False:
        logger.warning(
            f"the teacher {teacher_dir} is quantized and the student {student_dir} is not: "
            "are --teacher and --student swapped? The teacher is the full-precision model"
        )
        return True
    return False


def settings_from_args(args: argparse.Namespace) -> DecisionSettings:
    return DecisionSettings(
        seeds=tuple(args.seeds),
        eval_prompts=args.eval_prompts,
        prompt_length=args.prompt_length,
        gen_length=args.gen_length,
        steps=args.steps,
        block_length=args.block_length,
        heldout_texts=args.elbo_texts,
    )


def run(args: argparse.Namespace) -> dict:
    texts = load_texts(args.dataset) if args.dataset else None
    result = evaluate_checkpoints(
        args.teacher,
        args.student,
        texts,
        settings_from_args(args),
        out_dir=args.out,
        overwrite=args.overwrite,
        dtype=resolve_dtype(args.dtype),
        device=args.device,
    )
    print(result["table"])
    print("wrote " + ", ".join(str(p) for p in result["files"].values()))
    return result
