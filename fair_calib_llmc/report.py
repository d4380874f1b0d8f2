"""Results people compare: ``results.json``, the ``results.md`` table and ``flips.png``.

Rows come from :func:`fair_calib_llmc.benchmark.run_benchmark`, one per (method, seed), and
``per_step`` holds each method's flip rate per sampler step, one curve per seed. The table
shows the mean over seeds with the min-max half range; the plot shows the mean curve over
seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["COLUMNS", "summarise", "write_report", "write_results"]

COLUMNS = [
    "method",
    "frontier_flip_rate",
    "post_commit_mismatch",
    "first_divergence",
    "kl_frontier",
    "kl_non_frontier",
    "elbo_ppl",
    "calib_seconds",
    "peak_gpu_mib",
    "checkpoint_mib",
]


def write_results(out_dir: Path, rows: list[dict], per_step: dict, settings: dict) -> str:
    """``results.json`` (every row, per-step flips, settings), then :func:`write_report`."""
    payload = {"rows": rows, "flips_per_step": per_step, "settings": settings}
    (Path(out_dir) / "results.json").write_text(json.dumps(payload, indent=1))
    return write_report(rows, per_step, out_dir)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (min-max half range) over seeds, per method, in input order."""
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(group)}
        for col in COLUMNS[1:]:
            values = [r[col] for r in group if r.get(col) is not None]
            if values:
                mean = sum(values) / len(values)
                entry[col] = (mean, (max(values) - min(values)) / 2)
        summary.append(entry)
    return summary


def write_report(rows: list[dict], per_step: dict, out_dir: Path) -> str:
    """``results.md`` (mean ± half-range over seeds) and ``flips.png``; returns the table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in summarise(rows):
        cells = [entry["method"]]
        for col in COLUMNS[1:]:
            if col not in entry:
                cells.append("-")
                continue
            mean, spread = entry[col]
            cells.append(f"{mean:.4g}" + (f" ± {spread:.2g}" if entry["seeds"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
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
