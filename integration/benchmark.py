"""Side-by-side W4A4 benchmark of every method on one GPU (or CPU), several seeds.

    python integration/benchmark.py --model ref-llada --corpus stdlib --out bench/ref

``--model`` is any LLaDA or Dream checkpoint directory (the reference model from
``integration/train_dllm.py``, or a real LLaDA-8B / Dream-7B download). Calibration and
held-out text come from the interpreter's standard library split (``stdlib``: the reference
model's own held-out files), the package's shipped text (``shipped``), or local files
(``--calibration F --heldout F``). Results (``results.json``, ``results.md``, ``flips.png``)
and the compressed checkpoints are written to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from fair_calib_llmc.evaluation.demo import (
    METHOD_RECIPES,
    BenchmarkSettings,
    check_methods,
    run_benchmark,
)
from fair_calib_llmc.evaluation.report import REFERENCE_METHOD
from fair_calib_llmc.io.corpus import chunk_text, shipped_texts, stdlib_split
from fair_calib_llmc.io.data import load_texts
from fair_calib_llmc.io.loading import default_device, load_model


def _method_group(parser: argparse.ArgumentParser, methods: list[str], group: str) -> list[str]:
    """Every N-th method from the K-th on (``group`` is ``K/N``): interleaved, so each group
    gets rows from the front of the list, which a DEADLINE cut keeps."""
    k, _, n = group.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        parser.error(f"--method-group takes K/N with 1 <= K <= N, got {group!r}")
    return methods[int(k) - 1 :: int(n)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", choices=["stdlib", "shipped"], default="stdlib")
    parser.add_argument("--calibration", help="local calibration text file (overrides corpus)")
    parser.add_argument("--heldout", help="local held-out text file (overrides corpus)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_RECIPES))
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra method: a name and its recipe file (repeatable)",
    )
    parser.add_argument(
        "--method-group",
        metavar="K/N",
        help="run only the K-th of N interleaved groups of --methods (1-based): one benchmark "
        "split over N processes on one GPU (integration/run_experiments.py --groups N)",
    )
    parser.add_argument("--reference-method", default=REFERENCE_METHOD)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="check that every method has a recipe that loads, then exit (no model is loaded)",
    )
    args = parser.parse_args(argv)
    if args.method_group:
        args.methods = _method_group(parser, args.methods, args.method_group)
    recipes = {**METHOD_RECIPES, **dict(item.split("=", 1) for item in args.recipe)}
    if args.check_only:
        check_methods(tuple(args.methods), recipes)
        print(f"{len(args.methods)} methods, every recipe loads")
        return

    device = default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.corpus == "stdlib":
        calibration = chunk_text(stdlib_split("calibration", recursive=True), 1200)
        heldout = chunk_text(stdlib_split("heldout", recursive=True), 1200)
    else:
        calibration, heldout = shipped_texts("calibration"), shipped_texts("heldout")
    calibration = load_texts(args.calibration) if args.calibration else calibration
    heldout = load_texts(args.heldout) if args.heldout else heldout

    def load():
        return load_model(args.model, dtype=dtype, device=device)

    settings = BenchmarkSettings(
        methods=tuple(args.methods),
        reference_method=args.reference_method,
        seeds=tuple(args.seeds),
        gen_length=args.gen_length,
        calibration_prompts=args.calibration_prompts,
        eval_prompts=args.eval_prompts,
        heldout_texts=64,
        heldout_length=256,
    )
    start = time.monotonic()
    run_benchmark(
        load,
        calibration,
        heldout,
        args.out,
        settings,
        recipes=recipes,
        overwrite=args.overwrite,
        model_dir=args.model if Path(args.model).is_dir() else None,
    )
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    footer = (
        f"\nMeasured on {gpu}, {time.strftime('%Y-%m-%d')}, "
        f"{time.monotonic() - start:.0f}s in all; command: "
        f"python integration/benchmark.py {' '.join(argv or __import__('sys').argv[1:])}\n"
    )
    with open(Path(args.out) / "results.md", "a") as f:
        f.write(footer)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
