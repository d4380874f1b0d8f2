"""The one plotting module: decision-level results averaged over seeds (the benchmark's
``flips.png``, evaluate's and diagnose's ``flips_per_step.png`` / ``flips_per_position.png``,
diagnose's ``layer_sensitivity.png``).

Every function takes per-seed values and draws the mean with a min-max band (or error bar), so
one noisy seed cannot pass for a trend; files are small PNGs (matplotlib, Agg backend).
:class:`SeedCurves` is one curve figure as the results writer
(:func:`fair_calib_llmc.evaluation.report.write_results`) takes it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SeedCurves",
    "flip_curves",
    "mean_and_range",
    "plot_layer_sensitivity",
    "plot_rows",
    "plot_seed_bars",
    "plot_seed_curves",
]


def mean_and_range(per_seed: Sequence[Sequence[float]]) -> tuple[list, list, list]:
    """Mean, min and max over seeds of equally long per-seed series."""
    values = torch.tensor([list(v) for v in per_seed], dtype=torch.float64)
    if values.dim() != 2 or values.shape[0] == 0:
        raise ValueError("pass one equally long series per seed")
    return values.mean(0).tolist(), values.min(0).values.tolist(), values.max(0).values.tolist()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_seed_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    styles: Mapping[str, dict] | None = None,
    panels: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """One line per entry of ``curves`` (label -> per-seed series): mean over seeds, with the
    min-max range shaded when there is more than one seed. ``x`` counts from 1; ``styles``
    gives matplotlib line keywords per label.

    ``panels`` (panel title -> labels) draws one subplot per panel on a shared y axis: six
    lines with six overlapping bands in one plot cannot be read, three plots of a pair each
    can (diagnose: one per precision, without and with rotations). Labels in no panel get
    a last panel of their own.
    """
    plt = _pyplot()
    groups = _panel_groups(list(curves), panels)
    width = 7 if len(groups) == 1 else 3.3 * len(groups) + 0.6
    fig, axes = plt.subplots(1, len(groups), figsize=(width, 3.6), sharey=True, squeeze=False)
    seeds = max(len(per_seed) for per_seed in curves.values())
    for ax, (panel, labels) in zip(axes[0], groups, strict=True):
        for label in labels:
            _draw_curve(ax, label, curves[label], (styles or {}).get(label, {}))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if panel:
            ax.set_title(panel, fontsize=9)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].set_ylim(bottom=0)
    heading = f"{title} (mean over {seeds} seed{'s' if seeds > 1 else ''})"
    if len(groups) == 1:
        axes[0][0].set_title(heading, fontsize=10)
    else:
        fig.suptitle(heading, fontsize=10)
    return _save(fig, plt, path)


def _panel_groups(labels: list[str], panels) -> list[tuple[str | None, list[str]]]:
    """``[(panel title, its labels that have curves)]``; one untitled panel without ``panels``."""
    if not panels:
        return [(None, labels)]
    groups = [(name, [x for x in members if x in labels]) for name, members in panels.items()]
    placed = {label for _, members in groups for label in members}
    rest = [label for label in labels if label not in placed]
    groups += [("other", rest)] if rest else []
    return [(name, members) for name, members in groups if members]


def _draw_curve(ax, label: str, per_seed, style: dict) -> None:
    mean, low, high = mean_and_range(per_seed)
    x = range(1, len(mean) + 1)
    (line,) = ax.plot(x, mean, label=label, **{"marker": ".", "linewidth": 1.2, **style})
    if len(per_seed) > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)


@dataclass
class SeedCurves:
    """One figure of :func:`plot_seed_curves`: its file name, the curves (label -> per-seed
    series) and how it is labelled."""

    file: str
    curves: Mapping[str, Sequence[Sequence[float]]]
    xlabel: str
    title: str
    ylabel: str = "frontier flip rate"
    styles: Mapping[str, dict] | None = None
    panels: Mapping[str, Sequence[str]] | None = None

    def draw(self, out_dir: str | Path) -> Path:
        return plot_seed_curves(
            self.curves,
            Path(out_dir) / self.file,
            xlabel=self.xlabel,
            ylabel=self.ylabel,
            title=self.title,
            styles=self.styles,
            panels=self.panels,
        )


def flip_curves(rows: Sequence[dict], styles=None, panels=None) -> list[SeedCurves]:
    """``flips_per_step.png`` and ``flips_per_position.png`` of result rows (as in
    ``results.json``: each row's ``flips_per_step`` / ``flips_per_position``): one curve per
    row name, averaged over that name's seeds, in ``panels`` if given."""
    figures = []
    axes = (("flips_per_step", "sampler step"), ("flips_per_position", "answer position"))
    for series, xlabel in axes:
        curves: dict[str, list] = {}
        for row in rows:
            if row.get(series):
                curves.setdefault(row["name"], []).append(row[series])
        title = f"Frontier flips vs. the FP teacher per {xlabel.split()[-1]}"
        figures.append(
            SeedCurves(f"{series}.png", curves, xlabel, title, styles=styles, panels=panels)
        )
    return figures


def plot_rows(out_dir: Path, rows: Sequence[dict], styles=None, panels=None) -> dict:
    """Draw :func:`flip_curves` into ``out_dir``; returns the paths by file name."""
    return {c.file: c.draw(out_dir) for c in flip_curves(rows, styles, panels) if c.curves}


def plot_layer_sensitivity(layer_rows, rows, path: Path) -> Path:
    """Bar per decoder layer (flip rate with only that layer W4A4, mean and range over seeds),
    with the whole-model W4A4 rate of ``rows`` as a reference line (diagnose)."""
    per_layer: dict[str, list[float]] = {}
    for row in layer_rows:
        per_layer.setdefault(row["name"].rsplit(".", 1)[-1], []).append(row["frontier_flip_rate"])
    whole = [r["frontier_flip_rate"] for r in rows if r["name"] == "W4A4"]
    return plot_seed_bars(
        per_layer,
        path,
        xlabel="decoder layer quantized W4A4 (all others FP)",
        ylabel="frontier flip rate",
        title="Per-layer sensitivity",
        reference={"whole model W4A4": sum(whole) / len(whole)} if whole else None,
    )


def plot_seed_bars(
    bars: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
    xlabel: str = "",
    reference: Mapping[str, float] | None = None,
) -> Path:
    """One bar per entry of ``bars`` (label -> per-seed values): the mean, with a min-max
    error bar; ``reference`` draws labelled horizontal lines (e.g. the whole-model rate)."""
    plt = _pyplot()
    labels = list(bars)
    mean, low, high = mean_and_range([list(v) for v in zip(*bars.values(), strict=True)])
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(labels) + 2), 3.6))
    ax.bar(
        range(len(labels)),
        mean,
        yerr=[
            [m - lo for m, lo in zip(mean, low, strict=True)],
            [hi - m for m, hi in zip(mean, high, strict=True)],
        ],
        color="#4c72b0",
        capsize=3,
    )
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="#c44e52")
        ax.annotate(name, (len(labels) - 0.5, value), ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    n_seeds = len(next(iter(bars.values()))) if bars else 0
    ax.set_title(f"{title} (mean over {n_seeds} seed{'s' if n_seeds != 1 else ''})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    """PNG with a 64-colour palette: a third of the size of matplotlib's RGBA output."""
    from PIL import Image  # a matplotlib dependency

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)
    return path
