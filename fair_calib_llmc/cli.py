"""Command line: ``fair-calib-llmc demo`` (the main job) and ``fair-calib-llmc quantize``."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from fair_calib_llmc.benchmark import METHOD_RECIPES, BenchmarkSettings, run_benchmark
from fair_calib_llmc.corpus import shipped_texts
from fair_calib_llmc.default_model import DEFAULT_MODEL_DIR, load_default_model
from fair_calib_llmc.evaluation import compare, diagnose


def _load(path: str, device: str):
    model, tokenizer = load_default_model(path)
    return model.to(device), tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fair-calib-llmc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="FAIR-Calib vs RTN / GPTQ W4A4 on a dLLM, side by side")
    demo.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="LLaDA/Dream checkpoint dir")
    demo.add_argument("--out", default="outputs/default")
    demo.add_argument(
        "--methods", nargs="+", default=["rtn", "gptq", "fair-calib"], choices=list(METHOD_RECIPES)
    )
    demo.add_argument("--seeds", nargs="+", type=int, default=[0])
    demo.add_argument("--calibration-prompts", type=int, default=32)
    demo.add_argument("--eval-prompts", type=int, default=16)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    quant = sub.add_parser("quantize", help="quantize one checkpoint with one recipe")
    quant.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    quant.add_argument("--recipe", required=True)
    quant.add_argument(
        "--dataset", help="local .json/.jsonl/.txt (default: shipped calibration text)"
    )
    quant.add_argument("--output-dir", required=True)
    quant.add_argument("--max-prompts", type=int, default=64)

    compare.add_parser(sub)
    diagnose.add_parser(sub)

    args = parser.parse_args(argv)
    if hasattr(args, "func"):  # evaluate, diagnose
        args.func(args)
    elif args.command == "demo":
        settings = BenchmarkSettings(
            methods=tuple(args.methods),
            seeds=tuple(args.seeds),
            calibration_prompts=args.calibration_prompts,
            eval_prompts=args.eval_prompts,
        )
        run_benchmark(
            partial(_load, args.model, args.device),
            shipped_texts("calibration"),
            shipped_texts("heldout"),
            args.out,
            settings,
        )
        print((Path(args.out) / "results.md").read_text())
        print(f"checkpoints, results.json, results.md and flips.png are in {args.out}")
    else:
        from fair_calib_llmc.calibration import load_texts
        from fair_calib_llmc.pipeline import quantize

        model, tokenizer = load_default_model(args.model)
        texts = load_texts(args.dataset) if args.dataset else shipped_texts("calibration")
        result = quantize(
            model,
            tokenizer,
            args.recipe,
            texts,
            output_dir=args.output_dir,
            max_prompts=args.max_prompts,
        )
        print(f"saved compressed checkpoint to {result.output_dir}")


if __name__ == "__main__":
    main()
