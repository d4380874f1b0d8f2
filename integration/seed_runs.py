"""What the CPU diagnoses of integration/ share: their arguments, their refusal of a non-empty
``--out`` before any work (``evaluate``'s and ``diagnose``'s rule), and their table of each
column's mean ± half-range over seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.io.output_dir import check_results_dir


def add_seed_run_arguments(parser: argparse.ArgumentParser, calibration_prompts: int) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration-prompts", type=int, default=calibration_prompts)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true", help="write over --out's results")


def results_dir(args: argparse.Namespace) -> Path:
    """``--out``, created; a non-empty one without ``--overwrite`` fails before any work."""
    out = check_results_dir(
        args.out, {"the model's directory": args.model}, overwrite=args.overwrite
    )
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_table(row_header: str, results: dict[str, list[dict]], columns: dict[str, str]) -> str:
    """A markdown table: one row per ``results`` key, one cell per ``columns`` key (its label
    the header), each the mean ± half-range of that key over the row's runs (seeds)."""
    lines = [
        f"| {row_header} | " + " | ".join(columns.values()) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, runs in results.items():
        cells = []
        for key in columns:
            values = [run[key] for run in runs]
            mean = sum(values) / len(values)
            cells.append(f"{mean:.4g} ± {(max(values) - min(values)) / 2:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
