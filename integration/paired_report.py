"""The comparison a format's or an ablation's table needs, from benchmark ``results.json`` files:
paired per-seed differences to the **best baseline** (the lowest mean frontier flip rate among
``--baselines``, chosen after measuring, not named in advance) and per-seed ratios of named
pairs (FAIR-Calib over its uniform-weight ablation: the issue's "0.85x on every seed").

    python integration/paired_report.py RESULTS_JSON [RESULTS_JSON ...] \
        --baselines rtn-nvfp4 gptq-nvfp4 hadamard16_gptq_nvfp4 \
        --pairs fair_calib_nvfp4:fair_calib_nvfp4-uniform --out paired.md

Several files may be combined (rows of one model measured by two device calls): a (name,
seed) measured twice must have the same frontier flip rate to the last digit (the GPU runs are
deterministic), which proves the two calls measured the same model on the same prompts;
otherwise the script refuses. Rows the benchmark marked ``error`` only because the in-memory
model and its checkpoint differ (RTN in bf16 on CUDA, docs/formats.md "Exact reload", cause 1) still
hold the checkpoint's measured flips; they are listed apart, never used as the reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fair_calib_llmc.evaluation.report import (
    ROW_KEY,
    markdown_table,
    paired_table,
    summarise,
    upgrade_row,
)

FLIPS = "frontier_flip_rate"
#: the columns compared across calls (ELBO perplexity is left out: its estimator changed
#: between stored runs, and rows of different calls are not comparable in it)
TABLE_METRICS = (FLIPS, "post_commit_mismatch", "kl_frontier", "stage2_seconds")


def combined_rows(paths: list[Path]) -> list[dict]:
    """The measured rows of ``paths`` (no FP row), each (name, seed) once; refuses files whose
    shared rows disagree."""
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            row = upgrade_row(row)
            if row.get("seed") is None or row.get(FLIPS) is None:
                continue
            key = (row[ROW_KEY], row["seed"])
            if key in rows and rows[key][FLIPS] != row[FLIPS]:
                raise SystemExit(
                    f"{key[0]} (seed {key[1]}) has flip rate {rows[key][FLIPS]} in one file and "
                    f"{row[FLIPS]} in {path}: these runs measured different models or prompts; "
                    "combine only runs of one model"
                )
            rows.setdefault(key, row)
    return list(rows.values())


def _reload_only(row: dict) -> bool:
    """A row that failed only its reload check: measured, with a nonzero logit difference."""
    return "error" in row and bool(row.get("reload_max_abs_logit_diff"))


def best_baseline(rows: list[dict], baselines: list[str]) -> str:
    means = {
        entry[ROW_KEY]: entry[FLIPS][0]
        for entry in summarise(rows, [FLIPS])
        if entry[ROW_KEY] in baselines and FLIPS in entry
    }
    if not means:
        raise SystemExit(f"none of the baselines {baselines} has a measured row; check names")
    return min(means, key=means.get)


def pair_lines(rows: list[dict], pairs: list[str]) -> list[str]:
    lines = [
        "| pair | ratio of means | per-seed ratio | per-seed difference |",
        "|---|---|---|---|",
    ]
    for pair in pairs:
        numerator, denominator = pair.split(":")
        values = {
            name: {r["seed"]: r[FLIPS] for r in rows if r[ROW_KEY] == name}
            for name in (numerator, denominator)
        }
        seeds = sorted(set(values[numerator]) & set(values[denominator]))
        if not seeds:
            lines.append(f"| {numerator} / {denominator} | not measured | - | - |")
            continue
        top, bottom = ([values[name][s] for s in seeds] for name in (numerator, denominator))
        lines.append(
            f"| {numerator} / {denominator} | {sum(top) / sum(bottom):.3f} | "
            + ", ".join(f"{a / b:.3f}" for a, b in zip(top, bottom, strict=True))
            + " | "
            + ", ".join(f"{a - b:+.4f}" for a, b in zip(top, bottom, strict=True))
            + " |"
        )
    return lines


def report(
    paths: list[Path], baselines: list[str], pairs: list[str], only: list[str] | None = None
) -> str:
    all_rows = combined_rows(paths)
    if only:  # the named rows, the baselines and the pairs' rows; the files may hold others
        keep = {*only, *baselines, *(name for pair in pairs for name in pair.split(":"))}
        all_rows = [r for r in all_rows if r[ROW_KEY] in keep]
    rows = [r for r in all_rows if "error" not in r]
    reference = best_baseline(rows, baselines)
    lines = [
        markdown_table(summarise(rows, TABLE_METRICS), TABLE_METRICS, header="method"),
        "",
        f"Best baseline (lowest mean flip rate of {', '.join(baselines)}): **{reference}**.",
        "",
        paired_table(rows, reference, header="method"),
    ]
    if pairs:
        lines += ["", *pair_lines(rows, pairs)]
    marked = [r for r in all_rows if _reload_only(r)]
    if marked:
        lines += [
            "",
            "Checkpoints whose reload differs from the in-memory model (flips measured "
            'on the reloaded checkpoint; docs/formats.md "Exact reload", cause 1):',
            "",
        ]
        for entry in summarise(
            [{k: v for k, v in r.items() if k != "error"} for r in marked], [FLIPS]
        ):
            mean, spread = entry[FLIPS]
            lines.append(f"- {entry[ROW_KEY]}: {mean:.4f} ± {spread:.4f} ({entry['seeds']} seeds)")
    failed = [r for r in all_rows if "error" in r and not _reload_only(r)]
    lines += [f"- failed: {r[ROW_KEY]} (seed {r['seed']}): {r['error']}" for r in failed]
    sources = ", ".join(str(p) for p in paths)
    lines += ["", f"From {sources} (`integration/paired_report.py`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--baselines", nargs="+", required=True)
    parser.add_argument("--pairs", nargs="*", default=[], help="NUMERATOR:DENOMINATOR")
    parser.add_argument("--only", nargs="*", help="report only these rows (and the above)")
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    args = parser.parse_args(argv)
    bad = [p for p in args.pairs if p.count(":") != 1]
    if bad:
        parser.error(f"--pairs takes NUMERATOR:DENOMINATOR, got {bad}")
    text = report(args.results, args.baselines, args.pairs, args.only)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
