"""Command line: ``fair-calib-llmc demo`` (the main job) and ``fair-calib-llmc quantize``."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from fair_calib_llmc.benchmark import METHOD_RECIPES, BenchmarkSettings, run_benchmark
from fair_calib_llmc.corpus import shipped_texts
from fair_calib_llmc.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.loading import DTYPES, load_model, resolve_device


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
    demo.add_argument("--device", help="cpu, cuda, cuda:N (default: the GPU if there is one)")
    demo.add_argument("--dtype", default="auto", choices=list(DTYPES))
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    quant = sub.add_parser("quantize", help="quantize one checkpoint with one recipe")
    quant.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    quant.add_argument("--recipe", required=True, help="a shipped recipe name or a .yaml path")
    quant.add_argument("--device", help="cpu, cuda, cuda:N (default: the GPU if there is one)")
    quant.add_argument(
        "--dtype", default="auto", choices=list(DTYPES), help="default: the checkpoint's"
    )
    quant.add_argument(
        "--dataset", help="local .json/.jsonl/.csv/.txt (default: shipped calibration text)"
    )
    quant.add_argument("--text-column", default="text", help="column holding the text")
    quant.add_argument("--output-dir", required=True)
    quant.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir (deleted only after the new checkpoint is saved)",
    )
    quant.add_argument("--max-prompts", type=int, default=64)

    args = parser.parse_args(argv)
    if args.command == "demo":
        settings = BenchmarkSettings(
            methods=tuple(args.methods),
            seeds=tuple(args.seeds),
            calibration_prompts=args.calibration_prompts,
            eval_prompts=args.eval_prompts,
        )
        run_benchmark(
            partial(load_model, args.model, dtype=args.dtype, device=resolve_device(args.device)),
            shipped_texts("calibration"),
            shipped_texts("heldout"),
            args.out,
            settings,
            overwrite=args.overwrite,
        )
        print((Path(args.out) / "results.md").read_text())
        print(f"checkpoints, results.json, results.md and flips.png are in {args.out}")
    else:
        from fair_calib_llmc.data import load_texts
        from fair_calib_llmc.pipeline import quantize

        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=resolve_device(args.device)
        )
        texts = (
            load_texts(args.dataset, args.text_column)
            if args.dataset
            else shipped_texts("calibration")
        )
        result = quantize(
            model,
            tokenizer,
            args.recipe,
            texts,
            output_dir=args.output_dir,
            overwrite=args.overwrite,
            max_prompts=args.max_prompts,
        )
        print(f"saved compressed checkpoint to {result.output_dir}")


if __name__ == "__main__":
    main()
