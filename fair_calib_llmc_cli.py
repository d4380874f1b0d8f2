"""The ``fair-calib-llmc`` command: ``demo`` (the main job), ``quantize``, ``evaluate`` and
``diagnose``.

This module sits outside the ``fair_calib_llmc`` package on purpose: importing the package
registers the model classes with transformers and the modifier with llm-compressor (several
seconds of imports), which ``--help`` and a mistyped flag should not wait for. Arguments are
parsed here; the work is done by :mod:`fair_calib_llmc.cli.commands`, imported only after parsing.

User errors (a bad path, recipe, dataset or flag) print one line naming the fix; ``--verbose``
adds the traceback and every library log line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

METHODS = (
    "rtn, gptq, r1r2+gptq, quarot+gptq, quarot+autoround, fair-calib-uniform, fair-calib, "
    "spinquant-learned+gptq, fair-calib-learned, flatquant, fair-calib-flat"
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: intra-op CPU threads of every command (0: torch's default); see commands.set_threads
THREADS_ENV = "FAIR_CALIB_LLMC_THREADS"


def positive_int(text: str) -> int:
    """An argparse type: 0 or -1 prompts would otherwise quietly run one prompt."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def recipe_override(text: str) -> tuple[str, object]:
    """An argparse type for ``--set Modifier.field=value`` (or ``stage1.field=value``): the
    value is read as YAML (``3``, ``true``, ``[R1, R2]``, ``table``), as a recipe file would
    hold it."""
    import yaml

    path, sep, raw = text.partition("=")
    if not sep or "." not in path:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not Modifier.field=value (e.g. FAIRCalibModifier.target_strength=0.5)"
        )
    try:
        return path.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help, except where the help already names its
    default or there is none to show (``None``, a flag's ``False``)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fair-calib-llmc",
        description="FAIR-Calib W4A4 quantization of diffusion LMs (LLaDA, Dream) with "
        "llm-compressor, saved as compressed-tensors checkpoints.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,quantize,evaluate,diagnose}"
    )
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="library logs and tracebacks")
    common = argparse.ArgumentParser(add_help=False, parents=[verbose])
    common.add_argument(
        "--model",
        help="LLaDA / Dream checkpoint directory (default: the built-in default model); a hub "
        "id (org/name) needs the hub to be reachable, or the model in the local cache",
    )
    common.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    common.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's own dtype"
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_HelpFormatter,
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
    demo.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="one run per seed (default: 0)"
    )
    demo.add_argument(
        "--calibration-prompts", type=positive_int, default=32, help="calibration prompts"
    )
    demo.add_argument(
        "--eval-prompts", type=positive_int, default=16, help="held-out prompts per seed"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.set_defaults(run="fair_calib_llmc.cli.commands:run_demo")

    quant = sub.add_parser(
        "quantize",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="quantize one checkpoint with one recipe",
        description="Stage I rollouts + llm-compressor oneshot + atomic compressed save.",
    )
    quant.add_argument(
        "--recipe",
        required=True,
        help="a shipped recipe name (int W4A4: fair_calib_w4a4 (learned rotations + FAIR-Calib "
        "Stage II; fair_calib_learned_w4a4 is an alias of it), fair_calib_quarot_w4a4, "
        "fair_calib_uniform_w4a4, fair_calib_flatquant_w4a4, flatquant_w4a4, quarot_gptq_w4a4, "
        "quarot_autoround_w4a4, "
        "spinquant_gptq_w4a4, spinquant_learned_gptq_w4a4, gptq_w4a4, rtn_w4a4; NVFP4: "
        "fair_calib_nvfp4, hadamard16_gptq_nvfp4; MXFP4: fair_calib_hadamard32_mxfp4, "
        "fair_calib_mxfp4, hadamard32_gptq_mxfp4) or a .yaml path",
    )
    quant.add_argument(
        "--scheme",
        help="replace the recipe's quantization scheme: a compressed-tensors preset such as "
        "NVFP4, MXFP4, W4A4_G128_PACKED (int4 per-token activations), W4A4_G128_AG128_PACKED "
        "or W4A4_G128_AG32_PACKED (int4 per-group activations)",
    )
    quant.add_argument(
        "--set",
        dest="overrides",
        metavar="MODIFIER.FIELD=VALUE",
        type=recipe_override,
        action="append",
        default=[],
        help="set one field of the recipe's modifiers or of its Stage I settings (repeatable), "
        "e.g. LearnedSpinQuantModifier.steps=50 or stage1.prior.position.commit_boost=4; an "
        "unknown modifier or field fails at once",
    )
    quant.add_argument(
        "--dataset",
        help="local .json/.jsonl/.csv/.txt/.parquet calibration text "
        "(default: the shipped calibration text)",
    )
    quant.add_argument("--text-column", default="text", help="the dataset column holding text")
    quant.add_argument(
        "--output-dir",
        required=True,
        help="where the compressed checkpoint goes: a new or empty directory (a non-empty one "
        "needs --overwrite; the model's own directory and the working directory are refused)",
    )
    quant.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir (deleted only after the new checkpoint is saved)",
    )
    quant.add_argument("--max-prompts", type=positive_int, default=64, help="calibration prompts")
    quant.add_argument(
        "--prompt-length",
        type=positive_int,
        help="tokens of each calibration text used as a Stage I prompt (default: the "
        "recipe's FAIRCalibModifier.stage1.prompt_length, else 32)",
    )
    quant.set_defaults(run="fair_calib_llmc.cli.commands:run_quantize")

    _add_evaluation_parsers(sub, verbose)
    return parser


def _add_evaluation_parsers(sub, verbose: argparse.ArgumentParser) -> None:
    """``evaluate`` and ``diagnose`` (their work: fair_calib_llmc.evaluation.compare /
    .diagnose, whose ``run`` reads these arguments)."""
    settings = argparse.ArgumentParser(add_help=False, parents=[verbose])
    settings.add_argument(
        "--dataset", help="local .json/.jsonl/.txt with prompts (default: shipped held-out text)"
    )
    settings.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)"
    )
    settings.add_argument("--eval-prompts", type=positive_int, default=16, help="prompts per seed")
    settings.add_argument("--prompt-length", type=positive_int, default=32, help="prompt tokens")
    settings.add_argument("--gen-length", type=positive_int, default=32, help="answer tokens")
    settings.add_argument("--steps", type=int, help="sampler steps (default: gen-length)")
    settings.add_argument("--block-length", type=int, help="LLaDA block (default: gen-length)")
    settings.add_argument(
        "--elbo-texts", type=int, default=16, help="held-out texts for ELBO perplexity (0: skip)"
    )
    settings.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's own dtype"
    )
    settings.add_argument("--device", help="default: cuda when available, else cpu")
    settings.add_argument(
        "--out", help="output directory, new or empty unless --overwrite (default: see above)"
    )
    settings.add_argument(
        "--overwrite", action="store_true", help="write over the results files of a non-empty --out"
    )

    evaluate = sub.add_parser(
        "evaluate",
        parents=[settings],
        formatter_class=_HelpFormatter,
        help="decision-level metrics of a checkpoint against its teacher",
        description="Per seed the teacher samples answers to prompts drawn from the user's "
        "texts; the student replays them (frontier flip rate, KL on and off the frontier), "
        "generates freely with the same seed (post-commit mismatch, first divergence), and "
        "both get the masked-diffusion ELBO perplexity on held-out texts. Written to "
        "STUDENT/evaluation/ unless --out says otherwise: results.json, results.md and "
        "flips_per_step.png / flips_per_position.png (averaged over seeds).",
    )
    evaluate.add_argument("--teacher", required=True, help="full-precision checkpoint dir")
    evaluate.add_argument("--student", required=True, help="quantized (or any) checkpoint dir")
    evaluate.set_defaults(run="fair_calib_llmc.evaluation.compare:run")

    diagnose = sub.add_parser(
        "diagnose",
        parents=[settings],
        formatter_class=_HelpFormatter,
        help="where W4A4 hurts a dLLM: weights, activations, layers",
        description="Round-to-nearest, data-free variants of the full-precision model (in "
        "memory, nothing saved): weights only (W4A16), input activations only (W16A4), both "
        "(W4A4), each without and with rotations, plus a per-layer scan that quantizes one "
        "decoder layer at a time W4A4. Each variant replays the FP teacher's rollouts over "
        "several seeds. Written to --out (default: outputs/diagnose-<model dir name>).",
    )
    diagnose.add_argument("--model", required=True, help="full-precision checkpoint dir")
    diagnose.add_argument("--scheme", default="W4A4_G128_PACKED", help="W4A4 scheme to split")
    diagnose.add_argument("--no-rotations", action="store_true", help="skip the rotated variants")
    diagnose.add_argument("--no-layer-scan", action="store_true", help="skip the per-layer scan")
    diagnose.set_defaults(run="fair_calib_llmc.evaluation.diagnose:run")


def _command(args: argparse.Namespace):
    """The function that does ``args.command``'s work, imported now (after parsing)."""
    module, name = args.run.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # Set before anything imports tqdm or llm-compressor (parsing imports neither): both read
    # these once, at import.
    # llm-compressor warns once per run unless this is set; the CLI never tokenizes in workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # llm-compressor logs device warnings to stdout while it is imported; commands'
    # configure_logging re-enables it with the CLI's own sink once the import is done
    os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
    if not args.verbose:
        # Library progress bars: hidden, or (where a library forces them on) not left behind
        # once done (tqdm reads defaults from TQDM_*; "" is False). Ours opt back in.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TQDM_LEAVE", "")
    try:
        from fair_calib_llmc.cli import commands

        commands.configure_logging(verbose=args.verbose)
        commands.set_threads(os.environ.get(THREADS_ENV))
        _command(args)(args)
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
