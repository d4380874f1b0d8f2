"""Side-by-side W4A4 comparison runner: quantize -> save -> reload -> generate -> compare.

For every method (a shipped recipe) the same model, calibration text, held-out prompts and
sampler are used. Each quantized model is saved as a compressed-tensors checkpoint, reloaded
with ``AutoModel.from_pretrained`` through :func:`~fair_calib_llmc.io.reload.load_quantized`
(which also fixes FP4 weights that compressed-tensors unpacks to bf16 in an fp32 model; in
bf16 it is plain ``from_pretrained``; a row whose logits differ from the in-memory model's is
reported as failed), and compared decision by decision with the full-precision teacher. The
rows go to :mod:`fair_calib_llmc.evaluation.report`, which writes ``results.json``,
``results.md`` and ``flips.png`` next to the checkpoints after every row (a cut-off run keeps
what it measured).
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from fair_calib_llmc.evaluation.decisions import EvaluationContext
from fair_calib_llmc.evaluation.report import REFERENCE_METHOD, benchmark_results, write_results
from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.io.data import check_prompt_count, heldout_tokens, prompts_from_texts
from fair_calib_llmc.io.output_dir import check_results_dir
from fair_calib_llmc.io.output_lock import output_lock
from fair_calib_llmc.io.reload import load_quantized, probe_logits
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.pipeline import quantize, stage1_settings
from fair_calib_llmc.recipe import RecipeError, load_recipe_and_stage1
from fair_calib_llmc.sampling.samplers import default_sampler

__all__ = ["METHOD_RECIPES", "BenchmarkSettings", "check_methods", "run_benchmark"]

#: method -> shipped recipe name (:func:`fair_calib_llmc.recipe.shipped_recipes`). A method
#: name keeps its meaning across recipe renames (stored result tables use it): ``fair-calib``
#: is FAIR-Calib on fixed QuaRot-style rotations, ``fair-calib-learned`` the learned-rotation
#: pipeline shipped as ``fair_calib_w4a4``.
METHOD_RECIPES = {
    "rtn": "rtn_w4a4",
    "gptq": "gptq_w4a4",
    "r1r2+gptq": "spinquant_gptq_w4a4",
    "quarot+gptq": "quarot_gptq_w4a4",
    "quarot+autoround": "quarot_autoround_w4a4",
    "fair-calib-uniform": "fair_calib_uniform_w4a4",
    "fair-calib": "fair_calib_quarot_w4a4",
    "spinquant-learned+gptq": "spinquant_learned_gptq_w4a4",
    "fair-calib-learned": "fair_calib_w4a4",
    "flatquant": "flatquant_w4a4",
    "fair-calib-flat": "fair_calib_flatquant_w4a4",
}


@dataclass
class BenchmarkSettings:
    methods: tuple[str, ...] = ("rtn", "quarot+gptq", "fair-calib")
    calibration_prompts: int = 32
    eval_prompts: int = 16
    prompt_length: int = 32
    gen_length: int = 32
    heldout_texts: int = 32
    heldout_length: int = 128
    seeds: tuple[int, ...] = (0,)
    #: every other row is also reported as a paired per-seed difference to this one
    reference_method: str = REFERENCE_METHOD

    def __post_init__(self) -> None:
        check_prompt_count(self.calibration_prompts, "calibration_prompts")
        check_prompt_count(self.eval_prompts, "eval_prompts")


def _checkpoint_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _release_memory(device: torch.device) -> None:
    """Free the quantized model now. It sits in reference cycles (modules and the hooks that
    point back at them), which only the cycle collector frees: without this the previous
    method's model is still on the GPU and counted in the next method's peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_methods(
    methods: tuple[str, ...], recipes: dict[str, str], family: str | None = None
) -> None:
    """Every method has a recipe and every recipe loads (names, paths, fields, Stage I
    settings): checked before any model is loaded, so a typo costs seconds, not a GPU run.
    With ``family`` (the model's, where the caller knows it before loading), a recipe whose
    Stage I sampler is another family's is refused too."""
    unknown = set(methods) - set(recipes)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(recipes)}")
    for method in methods:
        recipe, recipe_level = load_recipe_and_stage1(recipes[method])  # RecipeError: one line
        stage1 = stage1_settings(recipe, recipe_level=recipe_level)
        if family is not None:
            try:
                stage1.check_family(family)
            except ValueError as err:
                raise RecipeError(
                    f"method {method}: {err}, or leave the method out for {family}"
                ) from None


def run_benchmark(
    load_model: Callable[[], tuple[torch.nn.Module, object]],
    calibration_texts: list[str],
    heldout_texts: list[str],
    out_dir: str | Path,
    settings: BenchmarkSettings = BenchmarkSettings(),
    *,
    recipes: dict[str, str] | None = None,
    overwrite: bool = False,
    model_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Run every method of ``settings`` and return one row per (method, seed).

    ``recipes`` maps method names to recipes (a shipped name, a path or YAML text; default
    :data:`METHOD_RECIPES`). A method that fails is logged, recorded with its error and
    skipped, so one broken baseline does not lose a whole GPU run. ``out_dir`` follows
    :func:`~fair_calib_llmc.io.output_dir.check_results_dir`'s rules (checked before any
    work): a non-empty directory needs ``overwrite`` (its results files are written over, its
    other files stay), and neither ``model_dir`` (the model the run loads) nor a directory in
    it is accepted. It is locked for the run, so a second run into it fails at once instead of
    dropping the first one's rows.
    """
    recipes = recipes or METHOD_RECIPES
    check_methods(settings.methods, recipes)
    models = {"the model's directory": model_dir} if model_dir is not None else {}
    out_dir = check_results_dir(out_dir, models, overwrite=overwrite)
    with output_lock(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return _run_locked(load_model, calibration_texts, heldout_texts, out_dir, settings, recipes)


def _run_locked(load_model, calibration_texts, heldout_texts, out_dir: Path, settings, recipes):
    teacher, tokenizer = load_model()
    device = next(teacher.parameters()).device
    spec = diffusion_spec(teacher, tokenizer)  # once for the run
    heldout = heldout_tokens(
        tokenizer, heldout_texts[: settings.heldout_texts], settings.heldout_length
    )
    calibration, prompts = {}, {}
    for seed in settings.seeds:
        # a seed draws its own calibration and evaluation prompts (and sampler noise)
        rng = random.Random(seed)
        calibration[seed] = rng.sample(calibration_texts, len(calibration_texts))
        prompts[seed] = prompts_from_texts(
            rng.sample(heldout_texts, len(heldout_texts)),
            tokenizer,
            settings.prompt_length,
            settings.eval_prompts,
        )
    # every seed scores the same held-out texts with the same ELBO draws
    context = EvaluationContext.from_prompts(
        teacher,
        tokenizer,
        default_sampler(spec, settings.gen_length),
        prompts,
        dict.fromkeys(settings.seeds, heldout),
        spec=spec,
        elbo_seed=0,
    )
    rows = [
        {
            "name": f"fp ({str(teacher.dtype).removeprefix('torch.')})",
            "seed": None,
            "frontier_flip_rate": 0.0,
            "post_commit_mismatch": 0.0,
            "first_divergence": float(settings.gen_length),
            "kl_frontier": 0.0,
            "kl_non_frontier": 0.0,
            "elbo_ppl": context.rollouts[0].teacher_elbo_ppl,
            "peak_gpu_mib": None,
            "checkpoint_mib": None,
        }
    ]
    per_step: dict[str, list[list[float]]] = {}  # method -> one flip-rate curve per seed
    for rollout in context.rollouts:
        seed = rollout.seed
        for method in settings.methods:
            logger.info(f"=== {method} (seed {seed}) ===")
            model, tokenizer = load_model()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                result = quantize(
                    model,
                    tokenizer,
                    recipes[method],
                    calibration[seed],
                    max_prompts=settings.calibration_prompts,
                    seed=seed,
                )
            except (Exception, SystemExit) as error:  # noqa: BLE001 - recorded, run goes on
                logger.exception(f"{method} (seed {seed}) failed")
                rows.append({"name": method, "seed": seed, "error": repr(error)})
                _write(out_dir, rows, per_step, settings)
                _release_memory(device)
                continue
            # not measured on the CPU: None, so the table leaves the column out
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            expected = probe_logits(result.model, device=device)
            path = save_atomically(
                result.model, tokenizer, out_dir / f"{method}-seed{seed}", overwrite=True
            )
            timings = {
                "stage1_seconds": result.stage1_seconds,
                "stage2_seconds": result.stage2_seconds,
            }
            weight_stats = vars(result.weight_stats)
            learning = [
                m.learning_report for m in result.modifiers if hasattr(m, "learning_report")
            ]
            del model, result  # quantize() released llm-compressor's session
            _release_memory(device)
            student = load_quantized(path, dtype=teacher.dtype, device=device)
            reload_error = float((probe_logits(student, device=device) - expected).abs().max())
            if reload_error != 0.0:  # a checkpoint that computes something else: say so loudly
                logger.error(f"{method} (seed {seed}): reloaded logits differ by {reload_error}")
            measured = context.measure(student, rollout)
            per_step.setdefault(method, []).append(measured.pop("flips_per_step"))
            per_position = measured.pop("flips_per_position")
            row = {
                "name": method,
                "seed": seed,
                **measured,
                **timings,
                "peak_gpu_mib": peak,
                "checkpoint_mib": _checkpoint_mib(path),
                "reload_max_abs_logit_diff": reload_error,
                "flips_per_position": per_position,
                "weight_stats": weight_stats,
                **({"learning": learning[0]} if learning else {}),
            }
            if reload_error != 0.0:
                row["error"] = f"reload not exact (max abs logit difference {reload_error:.3g})"
            logger.info(
                f"{method} (seed {seed}): frontier flip rate {row['frontier_flip_rate']:.4f} "
                f"over {row['frontier_decisions']} decisions, ELBO ppl {row['elbo_ppl']:.2f}, "
                f"Stage I {timings['stage1_seconds']:.1f}s, "
                f"Stage II {timings['stage2_seconds']:.1f}s"
            )
            rows.append(row)
            _write(out_dir, rows, per_step, settings)  # a cut-off run keeps them
            del student
            _release_memory(device)
    _write(out_dir, rows, per_step, settings)
    return rows


def _write(out_dir: Path, rows: list[dict], per_step: dict, settings: BenchmarkSettings) -> None:
    """Rewrite the results so far (the directory was checked before any work)."""
    write_results(out_dir, *benchmark_results(rows, per_step, vars(settings)), overwrite=True)
