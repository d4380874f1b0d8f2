"""Side-by-side W4A4 comparison runner: quantize -> save -> reload -> generate -> compare.

For every method (a shipped recipe) the same model, calibration text, held-out prompts and
sampler are used. Each quantized model is saved as a compressed-tensors checkpoint, reloaded
with plain ``AutoModel.from_pretrained`` (its logits are checked against the in-memory model),
and compared decision by decision with the full-precision teacher. The rows go to
:mod:`fair_calib_llmc.report`, which writes ``results.json``, ``results.md`` and ``flips.png``
next to the checkpoints after every row (a cut-off run keeps what it measured).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoModel

from fair_calib_llmc.calibration import prompts_from_texts
from fair_calib_llmc.checkpoint import check_output_dir, save_atomically
from fair_calib_llmc.metrics import compare_decisions, elbo_perplexity
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.pipeline import default_sampler_settings, quantize
from fair_calib_llmc.report import write_results
from fair_calib_llmc.sampling import sampler_for, teacher_traces

__all__ = ["METHOD_RECIPES", "BenchmarkSettings", "run_benchmark"]

#: method -> shipped recipe name (:func:`fair_calib_llmc.recipe.shipped_recipes`)
METHOD_RECIPES = {
    "rtn": "rtn_w4a4",
    "gptq": "gptq_w4a4",
    "spinquant+gptq": "spinquant_gptq_w4a4",
    "fair-calib": "fair_calib_w4a4",
    "spinquant+fair-calib": "spinquant_fair_calib_w4a4",
}


@dataclass
class BenchmarkSettings:
    methods: tuple[str, ...] = ("rtn", "gptq", "fair-calib")
    calibration_prompts: int = 32
    eval_prompts: int = 16
    prompt_length: int = 32
    gen_length: int = 32
    heldout_texts: int = 32
    heldout_length: int = 128
    seeds: tuple[int, ...] = (0,)


def _probe_logits(model, device) -> torch.Tensor:
    probe = torch.arange(3, 35, device=device)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(probe).logits.float().cpu()


def _checkpoint_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def run_benchmark(
    load_model: Callable[[], tuple[torch.nn.Module, object]],
    calibration_texts: list[str],
    heldout_texts: list[str],
    out_dir: str | Path,
    settings: BenchmarkSettings = BenchmarkSettings(),
    *,
    overwrite: bool = False,
) -> list[dict]:
    """Run every method of ``settings`` and return one row per (method, seed).

    ``out_dir`` follows :func:`~fair_calib_llmc.checkpoint.check_output_dir`'s rules (checked
    before any work): a non-empty directory needs ``overwrite``.
    """
    unknown = set(settings.methods) - set(METHOD_RECIPES)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(METHOD_RECIPES)}")
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_model()
    device = next(teacher.parameters()).device
    spec = diffusion_spec(teacher, tokenizer)
    sampler = sampler_for(spec, **default_sampler_settings(spec, settings.gen_length))
    heldout = [
        torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][: settings.heldout_length])
        for t in heldout_texts[: settings.heldout_texts]
    ]
    rows = [
        {
            "method": f"fp ({str(teacher.dtype).removeprefix('torch.')})",
            "seed": None,
            "frontier_flip_rate": 0.0,
            "post_commit_mismatch": 0.0,
            "first_divergence": float(settings.gen_length),
            "kl_frontier": 0.0,
            "kl_non_frontier": 0.0,
            "elbo_ppl": elbo_perplexity(teacher, heldout, spec=spec),
            "calib_seconds": 0.0,
            "peak_gpu_mib": 0.0,
            "checkpoint_mib": None,
        }
    ]
    per_step: dict[str, list[list[float]]] = {}  # method -> one flip-rate curve per seed
    for seed in settings.seeds:
        # a seed draws its own calibration and evaluation prompts (and sampler noise)
        rng = random.Random(seed)
        seed_calibration = rng.sample(calibration_texts, len(calibration_texts))
        eval_prompts = prompts_from_texts(
            rng.sample(heldout_texts, len(heldout_texts)),
            tokenizer,
            settings.prompt_length,
            settings.eval_prompts,
        )
        traces = teacher_traces(teacher, sampler, eval_prompts, seed=seed, spec=spec)
        for method in settings.methods:
            logger.info(f"=== {method} (seed {seed}) ===")
            model, tokenizer = load_model()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.monotonic()
            result = quantize(
                model,
                tokenizer,
                METHOD_RECIPES[method],
                seed_calibration,
                max_prompts=settings.calibration_prompts,
                seed=seed,
            )
            seconds = time.monotonic() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
            expected = _probe_logits(result.model, device)
            path = save_atomically(
                result.model, tokenizer, out_dir / f"{method}-seed{seed}", overwrite=True
            )
            del model, result
            student = AutoModel.from_pretrained(path, dtype=teacher.dtype).to(device).eval()
            reload_error = float((_probe_logits(student, device) - expected).abs().max())
            report = compare_decisions(
                teacher, student, sampler, eval_prompts, seed=seed, traces=traces, spec=spec
            )
            per_step.setdefault(method, []).append(report.flips_per_step)
            row = {
                "method": method,
                "seed": seed,
                **report.as_row(),
                "elbo_ppl": elbo_perplexity(student, heldout, spec=spec),
                "calib_seconds": seconds,
                "peak_gpu_mib": peak,
                "checkpoint_mib": _checkpoint_mib(path),
                "reload_max_abs_logit_diff": reload_error,
                "flips_per_position": report.flips_per_position,
            }
            logger.info(
                f"{method} (seed {seed}): frontier flip rate {row['frontier_flip_rate']:.3f}, "
                f"ELBO ppl {row['elbo_ppl']:.2f}, calibration {seconds:.1f}s"
            )
            rows.append(row)
            write_results(out_dir, rows, per_step, vars(settings))  # a cut-off run keeps them
            del student
    write_results(out_dir, rows, per_step, vars(settings))
    return rows
