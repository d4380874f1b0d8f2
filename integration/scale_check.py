"""Wall time and peak GPU memory of each recipe on an LLaDA-8B-shaped model (random weights).

    python integration/scale_check.py --out scale-h100

The model has LLaDA-8B-Instruct's shapes (d_model 4096, 32 heads, 32 layers, MLP 12288 wide,
vocabulary 126464) in bf16 on one GPU, initialised randomly: no 8B checkpoint can be
downloaded here, and cost does not depend on what the weights say. Every recipe runs the
whole product path, ``fair_calib_llmc.quantize`` (Stage I rollouts with the real sampler, then
``oneshot``) and the compressed save, on the same 64 calibration prompts. Results go to
``results.json`` / ``.md``. ``--recipe NAME=PATH`` adds a method from a recipe file (as in
``integration/benchmark.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch
from loguru import logger

from fair_calib_llmc.evaluation.demo import METHOD_RECIPES
from fair_calib_llmc.io.corpus import chunk_text, stdlib_split
from fair_calib_llmc.io.tokenization import train_bpe_tokenizer
from fair_calib_llmc.models import LLaDAConfig, LLaDAModelLM
from fair_calib_llmc.pipeline import quantize

LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288)


def build(tokenizer, layers: int, config_dir: Path) -> LLaDAModelLM:
    config = LLaDAConfig(
        **{**LLADA_8B, "n_layers": layers},
        vocab_size=126464,
        embedding_size=126464,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LLaDAModelLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    # oneshot re-reads the config from name_or_path: give it one on disk
    config.save_pretrained(config_dir)
    tokenizer.save_pretrained(config_dir)
    model.config._name_or_path = str(config_dir)
    return model


def _learning_cost(modifiers) -> dict:
    """A learning modifier's seconds: all of its work, and (learned rotations) the optimiser's
    steps alone, which is the part that grows with `steps` (a run with fewer steps than a
    recipe's gives its per-step cost); a FlatQuant-class learner reports its seconds only."""
    report = next((m.learning_report for m in modifiers if hasattr(m, "learning_report")), {})
    return {
        "learning_seconds": report.get("seconds"),
        "learning_steps": report.get("steps"),
        "optimise_seconds": report.get("optimise_seconds"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["quarot+gptq", "fair-calib"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    recipes = {**METHOD_RECIPES, **dict(item.split("=", 1) for item in args.recipe)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    texts = chunk_text(stdlib_split("calibration"), 1200)
    tokenizer = train_bpe_tokenizer(stdlib_split("train")[:200], vocab_size=4096)
    rows = []
    for method in args.methods:
        # nothing of the previous method may stay allocated: its peak would count it
        resident = torch.cuda.memory_allocated() / 2**30
        model = build(tokenizer, args.layers, out / "config")
        model_gib = torch.cuda.memory_allocated() / 2**30 - resident
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.monotonic()
        checkpoint = out / "checkpoint"
        result = quantize(
            model,
            tokenizer,
            recipes[method],
            texts,
            max_prompts=args.calibration_prompts,
            output_dir=checkpoint,
        )
        torch.cuda.synchronize()
        seconds = time.monotonic() - start
        shutil.rmtree(checkpoint)  # the next method saves its own
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "stage1_seconds": result.stage1_seconds,
                "stage2_seconds": result.stage2_seconds,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                "model_gib": model_gib,
                "resident_gib_before": resident,
                "states": len(result.calibration),
                **_learning_cost(result.modifiers),
            }
        )
        logger.info(f"{rows[-1]}")
        del model, result  # quantize() released llm-compressor's session
        gc.collect()  # the model sits in reference cycles (modules <-> hooks)
        torch.cuda.empty_cache()
        (out / "results.json").write_text(json.dumps(rows, indent=1))

    lines = [
        "| method | seconds (with save) | Stage I s | Stage II s | of which learning s "
        "| learning steps | s per step | model GiB | peak GPU GiB | GiB before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        learned = r["learning_seconds"] is not None
        stepped = learned and r["learning_steps"] and r["optimise_seconds"] is not None
        lines.append(
            f"| {r['method']} | {r['seconds']:.0f} | {r['stage1_seconds']:.1f} | "
            f"{r['stage2_seconds']:.0f} | "
            + (f"{r['learning_seconds']:.0f} | " if learned else "- | ")
            + (
                f"{r['learning_steps']} | {r['optimise_seconds'] / r['learning_steps']:.2f} | "
                if stepped
                else "- | - | "
            )
            + f"{r['model_gib']:.1f} | {r['peak_gpu_gib']:.1f} | {r['resident_gib_before']:.2f} |"
        )
    gpu = torch.cuda.get_device_name()
    lines.append(f"\n{gpu}, {args.layers} layers, {time.strftime('%Y-%m-%d')}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
