"""Results people compare: ``results.json``, the ``results.md`` table and ``flips.png``.

Rows come from :func:`fair_calib_llmc.evaluation.demo.run_benchmark`, one per (method, seed), and
``per_step`` holds each method's flip rate per sampler step, one curve per seed. The table
shows the mean over seeds with the min-max half range; the plot shows the mean curve over
seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "COLUMNS",
    "DISPLAY",
    "METRICS",
    "REFERENCE_METHOD",
    "markdown_table",
    "merge_results",
    "paired_differences",
    "summarise",
    "write_report",
    "write_results",
]

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

#: The benchmark's columns: its row key, the decision metrics, then cost.
COLUMNS = [
    "method",
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


def write_results(out_dir: Path, rows: list[dict], per_step: dict, settings: dict) -> str:
    """``results.json`` (every row, per-step flips, settings), then :func:`write_report`."""
    payload = {"rows": rows, "flips_per_step": per_step, "settings": settings}
    (Path(out_dir) / "results.json").write_text(json.dumps(payload, indent=1))
    return write_report(rows, per_step, out_dir, settings.get("reference_method", REFERENCE_METHOD))


def merge_results(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """Merge the ``results.json`` of runs that split one benchmark (say, one process per seed
    on a shared GPU) into ``out_dir``'s results, table and plot.

    The runs must have measured the same full-precision model (their FP rows agree to 0.1% in
    ELBO perplexity; the merged FP row holds the mean) and must not repeat a (method, seed)
    pair; rows keep run order, one FP row leads.
    """
    if (Path(out_dir) / "results.json").exists():  # a run's own rows must never be replaced
        raise ValueError(f"{out_dir} already holds results.json; merge into a new directory")
    payloads = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    if not payloads:
        raise ValueError("no runs to merge")
    fp_rows = [r for p in payloads for r in p["rows"] if r["seed"] is None]
    fp_ppl = [r["elbo_ppl"] for r in fp_rows]
    if len({r["method"] for r in fp_rows}) > 1 or max(fp_ppl) > min(fp_ppl) * (1 + 1e-3):
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
            key = (row["method"], row["seed"])
            if key in seen:
                raise ValueError(f"{key[0]} (seed {key[1]}) was measured by two runs")
            seen.add(key)
            rows.append(row)
        for method, curves in payload["flips_per_step"].items():
            per_step.setdefault(method, []).extend(curves)
    settings = dict(payloads[0]["settings"])
    settings["seeds"] = sorted({r["seed"] for r in rows if r["seed"] is not None})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_results(Path(out_dir), rows, per_step, settings)


def summarise(
    rows: Sequence[dict], key: str = "method", metrics: Sequence[str] = COLUMNS[1:]
) -> list[dict]:
    """Mean and spread (min-max half range) over seeds of every metric, per ``key`` value, in
    input order; failed rows (with an ``error``) are left out."""
    summary = []
    rows = [r for r in rows if "error" not in r]
    for value in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == value]
        entry = {key: value, "seeds": len(group)}
        for metric in metrics:
            values = [r[metric] for r in group if r.get(metric) is not None]
            if values:
                mean = sum(values) / len(values)
                entry[metric] = (mean, (max(values) - min(values)) / 2)
        summary.append(entry)
    return summary


def markdown_table(
    summary: Sequence[dict], key: str = "method", metrics: Sequence[str] = COLUMNS[1:]
) -> str:
    """``| key | seeds | metric ... |`` with ``mean ± half-range`` cells (``-`` where missing),
    headers and decimals from :data:`DISPLAY`; a metric no entry measured (say, peak GPU
    memory on a CPU run) gets no column."""
    metrics = [m for m in metrics if any(m in entry for entry in summary)]
    headers = [DISPLAY.get(m, (m, None))[0] for m in metrics]
    lines = ["| " + " | ".join((key, "seeds", *headers)) + " |", "|" + "---|" * (len(metrics) + 2)]
    for entry in summary:
        cells = [str(entry[key]), str(entry["seeds"])]
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
    rows: list[dict], reference: str, column: str = "frontier_flip_rate"
) -> dict[str, tuple[float, float, list[float], float]]:
    """Per method: ``column`` minus the reference method's on the same seed (same prompts,
    same calibration text), as ``(mean, half-range, per-seed list, ratio of means)``."""
    ok = [r for r in rows if "error" not in r and r.get("seed") is not None]
    base = {r["seed"]: r[column] for r in ok if r["method"] == reference}
    out = {}
    for method in dict.fromkeys(r["method"] for r in ok):
        pairs = [
            (r[column], base[r["seed"]]) for r in ok if r["method"] == method and r["seed"] in base
        ]
        if method == reference or not pairs:
            continue
        diffs = [a - b for a, b in pairs]
        ratio = sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1e-12)
        out[method] = (sum(diffs) / len(diffs), (max(diffs) - min(diffs)) / 2, diffs, ratio)
    return out


def write_report(
    rows: list[dict], per_step: dict, out_dir: Path, reference: str = REFERENCE_METHOD
) -> str:
    """``results.md`` (mean ± half-range over seeds, then every method's paired per-seed
    difference to ``reference``, then failed runs) and ``flips.png``; returns the markdown."""
    lines = [markdown_table(summarise(rows))]
    diffs = paired_differences(rows, reference)
    if diffs:
        lines += [
            "",
            f"Frontier flip rate minus {reference}'s on the same seed (negative = fewer flips):",
            "",
            "| method | mean difference | ± half-range | per seed | ratio of means |",
            "|---|---|---|---|---|",
        ]
        for method, (mean, spread, per_seed, ratio) in diffs.items():
            seeds = ", ".join(f"{d:+.4f}" for d in per_seed)
            lines.append(f"| {method} | {mean:+.4f} | {spread:.4f} | {seeds} | {ratio:.3f} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['method']} (seed {r['seed']}): {r['error']}" for r in failed]
    table = "\n".join(lines)
    (Path(out_dir) / "results.md").write_text(table + "\n")
    _plot(per_step, Path(out_dir) / "flips.png")
    return table


def _plot(per_step: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    n_seeds = 0
    for method, curves in per_step.items():
        mean = [sum(step) / len(step) for step in zip(*curves, strict=True)]
        ax.plot(range(1, len(mean) + 1), mean, label=method, marker=".")
        n_seeds = max(n_seeds, len(curves))
    ax.set_xlabel("sampler step")
    ax.set_ylabel("frontier flip rate")
    seeds = f"mean over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set_title(f"Frontier decision flips vs. FP teacher (W4A4), {seeds}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
