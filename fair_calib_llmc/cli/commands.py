"""What ``fair-calib-llmc demo`` and ``fair-calib-llmc quantize`` do (parsing lives in the
light ``fair_calib_llmc_cli`` module, so ``--help`` does not import torch).

Both check everything cheap before loading the model: the recipe, the calibration text, the
device and the output directory. Logs go to stderr, results to stdout.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace
from functools import partial
from pathlib import Path

from loguru import logger

from fair_calib_llmc.evaluation.demo import BenchmarkSettings, run_benchmark
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.data import load_texts
from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.io.loading import load_model, resolve_device, resolve_dtype
from fair_calib_llmc.io.output_dir import check_output_dir
from fair_calib_llmc.io.output_lock import output_lock
from fair_calib_llmc.pipeline import quantize, stage1_settings
from fair_calib_llmc.recipe import load_recipe_and_stage1

__all__ = ["configure_logging", "run_demo", "run_quantize", "set_threads"]

#: Library log lines the CLI drops unless ``--verbose``: per-layer GPTQ metrics, and the
#: "no accelerator" warning llm-compressor repeats per call (the CLI states the device once).
_NOISE = ("No accelerator available",)


def configure_logging(verbose: bool) -> None:
    """One stderr sink: our INFO lines and library warnings, or everything with ``verbose``."""
    logger.enable("llmcompressor")
    try:
        logger.level("METRIC")
    except ValueError:  # llm-compressor defines it only when its own logging is configured
        logger.level("METRIC", no=38)
    logger.remove()
    if verbose:
        logger.add(sys.stderr, level="DEBUG")
        return
    # torch warns that is_fx_tracing also covers torch.export while llm-compressor traces
    logging.getLogger("torch.fx").setLevel(logging.ERROR)

    def keep(record) -> bool:
        if record["name"].startswith("fair_calib_llmc"):
            return record["level"].no >= logger.level("INFO").no
        if record["level"].name == "METRIC" or record["message"].startswith(_NOISE):
            return False
        return record["level"].no >= logger.level("WARNING").no

    logger.add(sys.stderr, level="DEBUG", filter=keep, format="{time:HH:mm:ss} | {message}")


#: machines with at most this many cores run the commands on one intra-op thread by default
FEW_CORES = 2


def set_threads(setting: str | None) -> int:
    """Set torch's intra-op CPU threads for a command and return them.

    ``setting`` is ``FAIR_CALIB_LLMC_THREADS``: a positive count, or ``0`` for torch's own
    default (one per core). Unset: one thread on a machine of :data:`FEW_CORES` cores or
    fewer, where the many small ops of Stage I's rollouts and of calibration ran several
    times slower with two threads, which spin against each other and any other load (the
    numbers are in the issue tracker, measured with ``quantize`` on the built-in model);
    torch's default elsewhere. Only the CPU is affected.
    """
    import torch

    if setting is None or not setting.strip():
        threads = 1 if (os.cpu_count() or 1) <= FEW_CORES else 0
    else:
        try:
            threads = int(setting)
        except ValueError:
            threads = -1
        if threads < 0:
            raise ValueError(
                f"FAIR_CALIB_LLMC_THREADS={setting!r}: use a positive number of CPU threads, "
                "or 0 for torch's default"
            )
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_demo(args: Namespace) -> None:
    settings = BenchmarkSettings(
        methods=tuple(args.methods),
        seeds=tuple(args.seeds),
        calibration_prompts=args.calibration_prompts,
        eval_prompts=args.eval_prompts,
    )
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model_path = args.model or DEFAULT_MODEL_DIR
    logger.info(f"demo: {', '.join(settings.methods)} on {device}; results in {args.out}")
    run_benchmark(
        partial(load_model, model_path, dtype=dtype, device=device),
        shipped_texts("calibration"),
        shipped_texts("heldout"),
        args.out,
        settings,
        overwrite=args.overwrite,
        model_dir=model_path,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"checkpoints, results.json, results.md and flips.png are in {args.out}")


def run_quantize(args: Namespace) -> None:
    # a bad recipe, scheme, --set or Stage I setting fails first; quantize() then reads the
    # recipe itself (as from Python), so its top-level stage1: is honoured the same way
    overrides = dict(args.overrides)
    recipe, recipe_level = load_recipe_and_stage1(
        args.recipe, scheme=args.scheme, overrides=overrides
    )
    stage1_settings(recipe, None, recipe_level, args.prompt_length)
    texts = (
        load_texts(args.dataset, args.text_column) if args.dataset else shipped_texts("calibration")
    )
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model_path = Path(args.model).expanduser() if args.model else DEFAULT_MODEL_DIR
    # before loading: an 8B model takes minutes to load, a wrong --output-dir seconds to find;
    # locked from here, so a second run into the same directory fails now, not after loading
    target = check_output_dir(
        args.output_dir,
        model_dir=model_path if model_path.is_dir() else None,
        overwrite=args.overwrite,
    )
    with output_lock(target):
        scheme = f" as {args.scheme}" if args.scheme else ""
        logger.info(f"quantizing {model_path} with {args.recipe}{scheme} on {device}")
        model, tokenizer = load_model(model_path, dtype=dtype, device=device)
        result = quantize(
            model,
            tokenizer,
            args.recipe,
            texts,
            scheme=args.scheme,
            overrides=overrides,
            output_dir=args.output_dir,
            overwrite=args.overwrite,
            max_prompts=args.max_prompts,
            prompt_length=args.prompt_length,
        )
    print(f"saved compressed checkpoint to {result.output_dir}")
    print(
        "load it with: import fair_calib_llmc; "
        f"transformers.AutoModel.from_pretrained({str(result.output_dir)!r})"
    )
