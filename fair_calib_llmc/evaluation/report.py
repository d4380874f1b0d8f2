"""Results people compare: one row schema, one metric list, one writer.

Every producer (the benchmark / demo, ``evaluate``, ``diagnose``) writes rows of one schema:
``{"name": what was measured, "seed": int | None, <metrics of METRICS>, ...}`` (the
benchmark's name is its method, ``evaluate``'s ``teacher`` / ``student``, ``diagnose``'s
variant or decoder layer). Rows written before the schema was one (benchmark rows keyed
``"method"``) are read as if keyed ``"name"`` (:func:`upgrade_row`).

:func:`write_results` is the one writer: ``results.json`` (the producer's payload, holding its
rows), ``results.md`` (its markdown) and its seed-averaged curves
(:class:`~fair_calib_llmc.evaluation.plots.SeedCurves`). :func:`summarise` and
:func:`markdown_table` make the mean ± half-range tables; :func:`paired_differences` the
per-seed differences to a reference row name; :func:`benchmark_results` what the benchmark
writes (``results.json`` with ``rows`` / ``flips_per_step`` / ``settings``, the table with the
paired differences to :data:`REFERENCE_METHOD`, ``flips.png``); :func:`merge_results` merges
benchmark runs split over processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from fair_calib_llmc.evaluation.plots import SeedCurves
from fair_calib_llmc.io.output_dir import OutputDirError

__all__ = [
    "COLUMNS",
    "DISPLAY",
    "METRICS",
    "REFERENCE_METHOD",
    "ROW_KEY",
    "benchmark_results",
    "markdown_table",
    "merge_results",
    "paired_differences",
    "summarise",
    "upgrade_row",
    "write_results",
]

#: The key of every result row: what was measured (a method, a variant, a layer, ...).
ROW_KEY = "name"

#: The strongest baseline: every other row is also reported as a paired difference to it.
REFERENCE_METHOD = "quarot+gptq"

#: The decision-level metrics of every result row (benchmark, evaluate, diagnose), in table
#: order: the one metric list.
METRICS = (
    "frontier_flip_rate",
    "post_commit_mismatch",
    "first_divergence",
    "kl_frontier",
    "kl_non_frontier",
    "elbo_ppl",
)

#: The columns of a results table: the row key, the decision metrics, then cost (which only
#: the benchmark measures; a column no row has is left out of the table).
COLUMNS = [
    ROW_KEY,
    *METRICS,
    "stage1_seconds",
    "stage2_seconds",
    "peak_gpu_mib",
    "checkpoint_mib",
]


#: metric -> (table header, decimals): the README's names; decimals follow each metric's
#: spread over seeds (rates to 1e-4, perplexities to 1e-2, seconds to 0.1).
DISPLAY = {
    "frontier_flip_rate": ("frontier flip rate", 4),
    "post_commit_mismatch": ("post-commit mismatch", 3),
    "first_divergence": ("first divergence", 2),
    "kl_frontier": ("KL frontier", 4),
    "kl_non_frontier": ("KL non-frontier", 4),
    "elbo_ppl": ("ELBO ppl", 2),
    "stage1_seconds": ("Stage I s", 1),
    "stage2_seconds": ("Stage II s", 1),
    "peak_gpu_mib": ("peak GPU MiB", 0),
    "checkpoint_mib": ("checkpoint MiB", 2),
}


def upgrade_row(row: dict) -> dict:
    """``row`` in the one schema: a benchmark row written keyed ``"method"`` (every
    ``results.json`` before the schema was one) gets that value as its ``"name"``, first."""
    if ROW_KEY in row or "method" not in row:
        return row
    rest = {k: v for k, v in row.items() if k != "method"}
    return {ROW_KEY: row["method"], **rest}


def write_results(
    out_dir: str | Path,
    payload: dict,
    markdown: str,
    curves: Sequence[SeedCurves] = (),
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """The one results writer: ``results.json`` (``payload``), ``results.md`` (``markdown``)
    and each of ``curves`` (a PNG averaged over seeds; one without curves is skipped);
    returns the paths written by file name.

    Without ``overwrite`` an existing ``results.*`` is never replaced, not even one that
    appeared after the up-front :func:`~fair_calib_llmc.io.output_dir.check_results_dir`
    (the benchmark, which rewrites its results after every row into a directory it checked
    itself, passes ``overwrite=True``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results.json": out_dir / "results.json", "results.md": out_dir / "results.md"}
    existing = [path for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise OutputDirError(
            f"{existing[0]} appeared while this run worked and is not replaced; move it away "
            "and rerun, or pass --overwrite"
        )
    mode = "w" if overwrite else "x"  # "x": nor one that appears this very moment
    with open(paths["results.json"], mode) as file:
        file.write(json.dumps(payload, indent=1, default=_jsonable))
    with open(paths["results.md"], mode) as file:
        file.write(markdown + "\n")
    for plot in curves:
        if plot.curves:
            paths[plot.file] = plot.draw(out_dir)
    return paths


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot write {type(value).__name__} to results.json")


def summarise(rows: Sequence[dict], metrics: Sequence[str] = COLUMNS[1:]) -> list[dict]:
    """Mean and spread (min-max half range) over seeds of every metric, per row name, in
    input order; failed rows (with an ``error``) are left out."""
    summary = []
    rows = [upgrade_row(r) for r in rows if "error" not in r]
    for value in dict.fromkeys(r[ROW_KEY] for r in rows):
        group = [r for r in rows if r[ROW_KEY] == value]
        entry = {ROW_KEY: value, "seeds": len(group)}
        for metric in metrics:
            values = [r[metric] for r in group if r.get(metric) is not None]
            if values:
                mean = sum(values) / len(values)
                entry[metric] = (mean, (max(values) - min(values)) / 2)
        summary.append(entry)
    return summary


def markdown_table(
    summary: Sequence[dict], metrics: Sequence[str] = COLUMNS[1:], header: str = ROW_KEY
) -> str:
    """``| header | seeds | metric ... |`` with ``mean ± half-range`` cells (``-`` where
    missing), headers and decimals from :data:`DISPLAY`; a metric no entry measured (say, peak
    GPU memory on a CPU run) gets no column. ``header`` names the first column (the
    benchmark's reads ``method``)."""
    metrics = [m for m in metrics if any(m in entry for entry in summary)]
    headers = [DISPLAY.get(m, (m, None))[0] for m in metrics]
    lines = [
        "| " + " | ".join((header, "seeds", *headers)) + " |",
        "|" + "---|" * (len(metrics) + 2),
    ]
    for entry in summary:
        cells = [str(entry[ROW_KEY]), str(entry["seeds"])]
        for metric in metrics:
            if metric not in entry:
                cells.append("-")
                continue
            mean, spread = entry[metric]
            decimals = DISPLAY.get(metric, (None, None))[1]
            number = f".{decimals}f" if decimals is not None else ".4g"
            cells.append(
                f"{mean:{number}}" + (f" ± {spread:{number}}" if entry["seeds"] > 1 else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(
    rows: Sequence[dict], reference: str, column: str = "frontier_flip_rate"
) -> dict[str, tuple[float, float, list[float], float]]:
    """Per row name: ``column`` minus the ``reference`` name's on the same seed (same
    prompts, same calibration text), as ``(mean, half-range, per-seed list, ratio of
    means)``; names without a reference row on any of their seeds are left out."""
    ok = [upgrade_row(r) for r in rows if "error" not in r and r.get("seed") is not None]
    ok = [r for r in ok if r.get(column) is not None]
    base = {r["seed"]: r[column] for r in ok if r[ROW_KEY] == reference}
    out = {}
    for name in dict.fromkeys(r[ROW_KEY] for r in ok):
        pairs = [
            (r[column], base[r["seed"]]) for r in ok if r[ROW_KEY] == name and r["seed"] in base
        ]
        if name == reference or not pairs:
            continue
        diffs = [a - b for a, b in pairs]
        ratio = sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1e-12)
        out[name] = (sum(diffs) / len(diffs), (max(diffs) - min(diffs)) / 2, diffs, ratio)
    return out


def paired_table(rows: Sequence[dict], reference: str, header: str = ROW_KEY) -> str:
    """The markdown of :func:`paired_differences` in the frontier flip rate ("" if none)."""
    diffs = paired_differences(rows, reference)
    if not diffs:
        return ""
    lines = [
        f"Frontier flip rate minus {reference}'s on the same seed (negative = fewer flips):",
        "",
        f"| {header} | mean difference | ± half-range | per seed | ratio of means |",
        "|---|---|---|---|---|",
    ]
    for name, (mean, spread, per_seed, ratio) in diffs.items():
        seeds = ", ".join(f"{d:+.4f}" for d in per_seed)
        lines.append(f"| {name} | {mean:+.4f} | {spread:.4f} | {seeds} | {ratio:.3f} |")
    return "\n".join(lines)


def benchmark_results(
    rows: list[dict], per_step: dict, settings: dict
) -> tuple[dict, str, list[SeedCurves]]:
    """What the benchmark writes (:func:`write_results`' arguments): the payload
    ``{"rows", "flips_per_step", "settings"}``; ``results.md`` (mean ± half-range over seeds,
    then every method's paired per-seed difference to ``settings["reference_method"]``, then
    failed runs); ``flips.png`` (each method's flip rate per sampler step, averaged over
    seeds)."""
    rows = [upgrade_row(r) for r in rows]
    reference = settings.get("reference_method", REFERENCE_METHOD)
    lines = [markdown_table(summarise(rows), header="method")]
    paired = paired_table(rows, reference, header="method")
    if paired:
        lines += ["", paired]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r[ROW_KEY]} (seed {r['seed']}): {r['error']}" for r in failed]
    payload = {"rows": rows, "flips_per_step": per_step, "settings": settings}
    curves = SeedCurves(
        "flips.png",
        per_step,
        xlabel="sampler step",
        title="Frontier decision flips vs. FP teacher (W4A4)",
    )
    return payload, "\n".join(lines), [curves]


def merge_results(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """Merge the ``results.json`` of runs that split one benchmark (say, one process per seed
    on a shared GPU) into ``out_dir``'s results, table and plot; returns the table.

    The runs must have measured the same full-precision model (their FP rows agree to 0.1% in
    ELBO perplexity; the merged FP row holds the mean) and must not repeat a (name, seed)
    pair; rows keep run order, one FP row leads. Files written before the row schema was one
    (rows keyed ``"method"``) are read too.
    """
    if (Path(out_dir) / "results.json").exists():  # a run's own rows must never be replaced
        raise ValueError(f"{out_dir} already holds results.json; merge into a new directory")
    payloads = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    if not payloads:
        raise ValueError("no runs to merge")
    for payload in payloads:
        payload["rows"] = [upgrade_row(r) for r in payload["rows"]]
    fp_rows = [r for p in payloads for r in p["rows"] if r["seed"] is None]
    fp_ppl = [r["elbo_ppl"] for r in fp_rows]
    if len({r[ROW_KEY] for r in fp_rows}) > 1 or max(fp_ppl) > min(fp_ppl) * (1 + 1e-3):
        raise ValueError(
            f"the runs measured different full-precision models (FP rows {fp_rows}); "
            "merge only runs of one model with one held-out set"
        )
    # the same model, held-out set and draws; GPU kernels can still differ in the last bits
    fp_row = {**fp_rows[0], "elbo_ppl": sum(fp_ppl) / len(fp_ppl)}
    rows, seen, per_step = [fp_row], set(), {}
    for payload in payloads:
        for row in payload["rows"]:
            if row["seed"] is None:
                continue
            key = (row[ROW_KEY], row["seed"])
            if key in seen:
                raise ValueError(f"{key[0]} (seed {key[1]}) was measured by two runs")
            seen.add(key)
            rows.append(row)
        for name, curves in payload["flips_per_step"].items():
            per_step.setdefault(name, []).extend(curves)
    settings = dict(payloads[0]["settings"])
    settings["seeds"] = sorted({r["seed"] for r in rows if r["seed"] is not None})
    payload, markdown, curves = benchmark_results(rows, per_step, settings)
    write_results(Path(out_dir), payload, markdown, curves)
    return markdown
