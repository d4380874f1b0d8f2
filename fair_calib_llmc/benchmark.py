"""Side-by-side W4A4 comparison: quantize -> save -> reload -> generate -> compare.

For every method (a recipe in ``recipes/``) the same model, calibration text, held-out prompts
and sampler are used. Each quantized model is saved as a compressed-tensors checkpoint,
reloaded with plain ``AutoModel.from_pretrained`` (its logits are checked against the
in-memory model), and compared decision by decision with the full-precision teacher. Results
go next to the checkpoints: ``results.json``, ``results.md`` and ``flips.png``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from llmcompressor.core import reset_session
from loguru import logger
from transformers import AutoModel

from fair_calib_llmc.calibration import prompts_from_texts
from fair_calib_llmc.metrics import compare_decisions, elbo_perplexity, teacher_traces
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.pipeline import quantize, save_atomically
from fair_calib_llmc.sampling import default_sampler

__all__ = ["METHOD_RECIPES", "BenchmarkSettings", "run_benchmark", "write_report"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
#: The strongest baseline: every other row is also reported as a paired difference to it.
REFERENCE_METHOD = "quarot+gptq"
METHOD_RECIPES = {
    "rtn": "rtn_w4a4.yaml",
    "gptq": "gptq_w4a4.yaml",
    "r1r2+gptq": "spinquant_gptq_w4a4.yaml",
    "quarot+gptq": "quarot_gptq_w4a4.yaml",
    "quarot+autoround": "quarot_autoround_w4a4.yaml",
    "fair-calib-uniform": "fair_calib_uniform_w4a4.yaml",
    "fair-calib": "fair_calib_w4a4.yaml",
}
COLUMNS = [
    "method",
    "frontier_flip_rate",
    "post_commit_mismatch",
    "first_divergence",
    "kl_frontier",
    "kl_non_frontier",
    "elbo_ppl",
    "stage1_seconds",
    "stage2_seconds",
    "peak_gpu_mib",
    "checkpoint_mib",
]


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
    reference_method: str = REFERENCE_METHOD


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
    recipes: dict[str, Path] | None = None,
) -> list[dict]:
    """Run every method of ``settings`` and return one row per (method, seed).

    ``recipes`` maps method names to recipe files (default: :data:`METHOD_RECIPES` in the
    shipped ``recipes/``); a method that fails is logged, recorded with its error and skipped,
    so one broken baseline does not lose a whole GPU run.
    """
    recipes = recipes or {name: RECIPES_DIR / file for name, file in METHOD_RECIPES.items()}
    unknown = [m for m in settings.methods if m not in recipes]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(recipes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_model()
    device = next(teacher.parameters()).device
    spec = diffusion_spec(teacher, tokenizer)
    sampler = default_sampler(spec, settings.gen_length)
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
            "elbo_ppl": elbo_perplexity(teacher, heldout),
            "peak_gpu_mib": 0.0,
            "checkpoint_mib": None,
        }
    ]
    per_step = {}
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
        traces = teacher_traces(teacher, sampler, eval_prompts, seed=seed)
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
                    seed_calibration,
                    max_prompts=settings.calibration_prompts,
                    seed=seed,
                )
            except Exception as error:  # noqa: BLE001 - recorded in the results, run goes on
                logger.exception(f"{method} (seed {seed}) failed")
                rows.append({"method": method, "seed": seed, "error": repr(error)})
                _write_results(out_dir, rows, per_step, settings)
                continue
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
            expected = _probe_logits(result.model, device)
            path = save_atomically(result.model, tokenizer, out_dir / f"{method}-seed{seed}")
            stage1, stage2, stats = (
                result.stage1_seconds,
                result.stage2_seconds,
                result.weight_stats,
            )
            del model, result
            reset_session()  # the session holds the model: free it before the next method
            student = AutoModel.from_pretrained(path, dtype=teacher.dtype).to(device).eval()
            reload_error = float((_probe_logits(student, device) - expected).abs().max())
            report = compare_decisions(
                teacher, student, sampler, eval_prompts, seed=seed, traces=traces
            )
            per_step.setdefault(method, []).append(report.flips_per_step)
            row = {
                "method": method,
                "seed": seed,
                **report.as_row(),
                "elbo_ppl": elbo_perplexity(student, heldout),
                "stage1_seconds": stage1,
                "stage2_seconds": stage2,
                "peak_gpu_mib": peak,
                "checkpoint_mib": _checkpoint_mib(path),
                "reload_max_abs_logit_diff": reload_error,
                "flips_per_position": report.flips_per_position,
                "weight_stats": vars(stats),
            }
            logger.info(
                f"{method} seed {seed}: flip rate {row['frontier_flip_rate']:.4f} "
                f"({row['frontier_decisions']} decisions), KL frontier {row['kl_frontier']:.4f}, "
                f"Stage I {row['stage1_seconds']:.1f}s, Stage II {row['stage2_seconds']:.1f}s"
            )
            rows.append(row)
            _write_results(out_dir, rows, per_step, settings)  # a cut-off run keeps its rows
            del student
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _write_results(out_dir, rows, per_step, settings)
    return rows


def _write_results(out_dir: Path, rows, per_step, settings) -> None:
    payload = {"rows": rows, "flips_per_step": per_step, "settings": vars(settings)}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    write_report(rows, per_step, out_dir, settings.reference_method)


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (min-max half range) over seeds, per method, in input order."""
    summary = []
    rows = [r for r in rows if "error" not in r]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(group)}
        for col in COLUMNS[1:]:
            values = [r[col] for r in group if r.get(col) is not None]
            if values:
                mean = sum(values) / len(values)
                entry[col] = (mean, (max(values) - min(values)) / 2)
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict], reference: str, column: str = "frontier_flip_rate"):
    """Per method: ``column`` minus the reference method's on the same seed (same prompts,
    same calibration text), as ``(mean, half-range, per-seed list, mean ratio)``."""
    base = {r["seed"]: r[column] for r in rows if r["method"] == reference and "error" not in r}
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows if r.get("seed") is not None):
        pairs = [
            (r[column], base[r["seed"]])
            for r in rows
            if r["method"] == method and "error" not in r and r["seed"] in base
        ]
        if method == reference or not pairs:
            continue
        diffs = [a - b for a, b in pairs]
        ratio = sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1e-12)
        out[method] = (sum(diffs) / len(diffs), (max(diffs) - min(diffs)) / 2, diffs, ratio)
    return out


def write_report(
    rows: list[dict], per_step: dict, out_dir: Path, reference: str = REFERENCE_METHOD
) -> str:
    """``results.md`` (mean ± half-range over seeds, paired differences to ``reference``)
    and ``flips.png`` (per-step flip rate averaged over seeds); returns the markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in _summarise(rows):
        cells = [entry["method"]]
        for col in COLUMNS[1:]:
            if col not in entry:
                cells.append("-")
                continue
            mean, spread = entry[col]
            cells.append(f"{mean:.4g}" + (f" ± {spread:.2g}" if entry["seeds"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    diffs = paired_differences(rows, reference)
    if diffs:
        lines += [
            "",
            f"Frontier flip rate minus {reference}'s on the same seed (negative = fewer flips):",
            "",
            "| method | mean difference | ± half-range | per seed | ratio of means |",
            "|---|---|---|---|---|",
        ]
        for method, (mean, spread, per_seed, ratio) in diffs.items():
            seeds = ", ".join(f"{d:+.4f}" for d in per_seed)
            lines.append(f"| {method} | {mean:+.4f} | {spread:.4f} | {seeds} | {ratio:.3f} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['method']} (seed {r['seed']}): {r['error']}" for r in failed]
    table = "\n".join(lines)
    (Path(out_dir) / "results.md").write_text(table + "\n")
    _plot(per_step, Path(out_dir) / "flips.png")
    return table


def _plot(per_step: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in per_step.items():
        mean = torch.tensor(runs).mean(dim=0).tolist()
        ax.plot(range(1, len(mean) + 1), mean, label=method, marker=".")
    ax.set_xlabel("sampler step")
    ax.set_ylabel("frontier flip rate (mean over seeds)")
    ax.set_title("Frontier decision flips vs. FP teacher (W4A4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
