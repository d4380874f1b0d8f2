"""The ``fair-calib-llmc`` command: ``demo`` (the main job), ``quantize``, ``evaluate`` and
``diagnose``.

This module sits outside the ``fair_calib_llmc`` package on purpose: importing the package
registers the model classes with transformers and the modifier with llm-compressor (several
seconds of imports), which ``--help`` and a mistyped flag should not wait for. Arguments are
parsed here; the work is done by :mod:`fair_calib_llmc.commands`, imported only after parsing.

User errors (a bad path, recipe, dataset or flag) print one line naming the fix; ``--verbose``
adds the traceback and every library log line.
"""

from __future__ import annotations

import argparse
import os
import sys

METHODS = "rtn, gptq, r1r2+gptq, quarot+gptq, quarot+autoround, fair-calib-uniform, fair-calib"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fair-calib-llmc",
        description="FAIR-Calib W4A4 quantization of diffusion LMs (LLaDA, Dream) with "
        "llm-compressor, saved as compressed-tensors checkpoints.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,quantize,evaluate,diagnose}"
    )
    # listed here; their arguments are defined next to their code (see _EVALUATION)
    sub.add_parser("evaluate", help="decision-level metrics of a checkpoint against its teacher")
    sub.add_parser("diagnose", help="where W4A4 hurts a dLLM: weights, activations, layers")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        help="LLaDA / Dream checkpoint directory or hub id (default: the built-in default model)",
    )
    common.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    common.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's own dtype"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="library logs and tracebacks")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="FAIR-Calib vs RTN / GPTQ W4A4 side by side: quantize, save, reload, compare",
        description="Quantize one model with several methods, save and reload every "
        "checkpoint, and compare each with the full-precision model decision by decision. "
        "Writes checkpoints, results.json, results.md and flips.png to --out.",
    )
    demo.add_argument("--out", default="outputs/default", help="results directory")
    demo.add_argument(
        "--methods",
        nargs="+",
        default=["rtn", "quarot+gptq", "fair-calib"],
        metavar="METHOD",
        help=f"any of: {METHODS} (default: rtn quarot+gptq fair-calib)",
    )
    demo.add_argument("--seeds", nargs="+", type=int, default=[0])
    demo.add_argument("--calibration-prompts", type=int, default=32)
    demo.add_argument("--eval-prompts", type=int, default=16)
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    quant = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize one checkpoint with one recipe",
        description="Stage I rollouts + llm-compressor oneshot + atomic compressed save.",
    )
    quant.add_argument(
        "--recipe",
        required=True,
        help="a shipped recipe name (fair_calib_w4a4, fair_calib_uniform_w4a4, "
        "quarot_gptq_w4a4, quarot_autoround_w4a4, spinquant_gptq_w4a4, gptq_w4a4, rtn_w4a4) "
        "or a .yaml path",
    )
    quant.add_argument(
        "--dataset",
        help="local .json/.jsonl/.csv/.txt/.parquet calibration text "
        "(default: the shipped calibration text)",
    )
    quant.add_argument("--text-column", default="text", help="the dataset column holding text")
    quant.add_argument("--output-dir", required=True)
    quant.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir (deleted only after the new checkpoint is saved)",
    )
    quant.add_argument("--max-prompts", type=int, default=64, help="calibration prompts")
    return parser


#: Subcommands whose parsers live in fair_calib_llmc.evaluation (built only when named).
_EVALUATION = ("evaluate", "diagnose")


def _evaluation_parser(command: str) -> argparse.ArgumentParser:
    from fair_calib_llmc.evaluation import compare, diagnose

    parser = argparse.ArgumentParser(prog="fair-calib-llmc")
    sub = parser.add_subparsers(dest="command", required=True)
    sub_parser = {"evaluate": compare, "diagnose": diagnose}[command].add_parser(sub)
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="library logs")
    return parser


def _set_environment_defaults(verbose: bool) -> None:
    # llm-compressor warns once per run unless this is set; the CLI never tokenizes in workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # llm-compressor logs device warnings to stdout while it is imported; commands'
    # configure_logging re-enables it with the CLI's own sink once the import is done
    os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
    if not verbose:
        # Library progress bars: hidden, or (where a library forces them on) not left behind
        # once done (tqdm reads defaults from TQDM_*; "" is False). Ours opt back in.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TQDM_LEAVE", "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # before any import of tqdm or llm-compressor (evaluate's and diagnose's parsers import
    # them): both read these once, at import
    _set_environment_defaults(verbose=bool({"-v", "--verbose"} & set(argv)))
    evaluation = bool(argv) and argv[0] in _EVALUATION
    parser = _evaluation_parser(argv[0]) if evaluation else build_parser()
    args = parser.parse_args(argv)
    try:
        from fair_calib_llmc import commands

        commands.configure_logging(verbose=args.verbose)
        if evaluation:
            args.func(args)
        else:
            run = {"demo": commands.run_demo, "quantize": commands.run_quantize}[args.command]
            run(args)
    except KeyboardInterrupt:
        print("fair-calib-llmc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # user errors: bad paths, recipes, data, flags
        if args.verbose:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fair-calib-llmc: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
