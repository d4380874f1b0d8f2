"""results.json, the results.md table (mean ± half range over seeds) and the plot."""

from __future__ import annotations

import json

import pytest

from fair_calib_llmc.evaluation.report import (
    benchmark_results,
    merge_results,
    summarise,
    write_results,
)

pytestmark = pytest.mark.unit


def _row(method, seed, flip, ppl):
    return {"name": method, "seed": seed, "frontier_flip_rate": flip, "elbo_ppl": ppl}


def _table(rows, per_step, settings) -> str:
    """The benchmark's results.md table of ``rows``."""
    return benchmark_results(rows, per_step, settings)[1]


def _write_benchmark(out_dir, rows, per_step, settings) -> str:
    """Write the benchmark's results as run_benchmark does; return the table."""
    payload, table, curves = benchmark_results(rows, per_step, settings)
    write_results(out_dir, payload, table, curves, overwrite=True)
    return table


def test_summary_is_mean_and_half_range_per_method_in_order():
    rows = [_row("fp", None, 0.0, 20.0), _row("gptq", 0, 0.2, 26.0), _row("gptq", 1, 0.3, 27.0)]
    summary = summarise(rows)
    assert [e["name"] for e in summary] == ["fp", "gptq"]
    assert summary[1]["frontier_flip_rate"] == pytest.approx((0.25, 0.05))
    assert summary[1]["elbo_ppl"] == pytest.approx((26.5, 0.5))
    assert "kl_frontier" not in summary[1]  # not measured: shown as "-"


def test_written_files(tmp_path):
    rows = [_row("gptq", 0, 0.2, 26.0), _row("gptq", 1, 0.3, 27.0)]
    per_step = {"gptq": [[0.1, 0.3], [0.3, 0.5]]}
    table = _write_benchmark(tmp_path, rows, per_step, {"seeds": [0, 1]})
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == "| method | seeds | frontier flip rate | ELBO ppl |"  # measured ones
    assert lines[2] == table.splitlines()[2] == "| gptq | 2 | 0.2500 ± 0.0500 | 26.50 ± 0.50 |"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == {"rows": rows, "flips_per_step": per_step, "settings": {"seeds": [0, 1]}}
    assert (tmp_path / "flips.png").stat().st_size > 1000


def test_paired_differences_match_seeds_and_skip_failed_runs(tmp_path):
    from fair_calib_llmc.evaluation.report import paired_differences

    rows = [
        _row("quarot+gptq", 0, 0.10, 0),
        _row("quarot+gptq", 1, 0.20, 0),
        _row("fair-calib", 1, 0.15, 0),  # out of order on purpose: paired by seed
        _row("fair-calib", 0, 0.12, 0),
        _row("fair-calib", 2, 0.01, 0),  # no reference run for seed 2: not paired
        {"name": "rtn", "seed": 0, "error": "boom"},
    ]
    diffs = paired_differences(rows, "quarot+gptq")
    assert set(diffs) == {"fair-calib"}
    mean, spread, per_seed, ratio = diffs["fair-calib"]
    assert per_seed == pytest.approx([-0.05, 0.02])
    assert mean == pytest.approx(-0.015) and spread == pytest.approx(0.035)
    assert ratio == pytest.approx(0.27 / 0.30)
    table = _table(rows, {}, {"reference_method": "quarot+gptq"})
    assert "| fair-calib | -0.0150 |" in table
    assert "- rtn (seed 0): boom" in table


def test_merged_seed_runs_equal_one_run_and_reject_overlaps(tmp_path):
    fp = _row("fp", None, 0.0, 20.0)
    runs = [
        ([fp, _row("gptq", 0, 0.2, 26.0), _row("rtn", 0, 0.4, 30.0)], 0),
        ([fp, _row("gptq", 1, 0.3, 27.0)], 1),
    ]
    for rows, seed in runs:
        (tmp_path / f"seed{seed}").mkdir()
        per_step = {r["name"]: [[r["frontier_flip_rate"]] * 2] for r in rows[1:]}
        _write_benchmark(tmp_path / f"seed{seed}", rows, per_step, {"seeds": [seed]})
    merged = merge_results([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "all")
    whole = [fp, _row("gptq", 0, 0.2, 26.0), _row("rtn", 0, 0.4, 30.0), _row("gptq", 1, 0.3, 27.0)]
    assert merged == _table(whole, {}, {})
    payload = json.loads((tmp_path / "all" / "results.json").read_text())
    assert payload["settings"]["seeds"] == [0, 1]
    assert payload["flips_per_step"]["gptq"] == [[0.2, 0.2], [0.3, 0.3]]

    with pytest.raises(ValueError, match="already holds results.json; merge into a new"):
        merge_results([tmp_path / "seed0"], tmp_path / "seed1")  # would replace seed 1's rows
    assert json.loads((tmp_path / "seed1" / "results.json").read_text())["settings"]["seeds"] == [1]
    with pytest.raises(ValueError, match=r"gptq \(seed 0\) was measured by two runs"):
        merge_results([tmp_path / "seed0", tmp_path / "seed0"], tmp_path / "again")
    other = json.loads((tmp_path / "seed1" / "results.json").read_text())
    other["rows"][0]["elbo_ppl"] = 20.1
    (tmp_path / "seed1" / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different full-precision models"):
        merge_results([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "again")


def test_results_written_before_one_row_schema_still_merge(tmp_path):
    """A run's results.json from before rows were keyed "name" (keyed "method"): merging the
    per-seed files of a stored GPU run reproduces that run's own merged rows and table."""
    import shutil
    from pathlib import Path

    from fair_calib_llmc.evaluation.report import upgrade_row

    run = Path(__file__).parents[1] / "integration/results/learned-rotations-h200/llada-r4/run1"
    dirs = []
    for seed in range(3):
        (tmp_path / f"s{seed}").mkdir()
        shutil.copy(run / f"results-seed{seed}.json", tmp_path / f"s{seed}" / "results.json")
        dirs.append(tmp_path / f"s{seed}")
    old = json.loads((run / "results.json").read_text())
    assert "method" in old["rows"][0] and "name" not in old["rows"][0]
    table = merge_results(dirs, tmp_path / "all")
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["rows"] == [upgrade_row(r) for r in old["rows"]]
    assert merged["flips_per_step"] == old["flips_per_step"]
    assert (run / "results.md").read_text().startswith(table)
    assert _table(old["rows"], old["flips_per_step"], old["settings"]) == table


def test_diagnose_curves_get_one_panel_per_precision(tmp_path, monkeypatch):
    from fair_calib_llmc.evaluation import plots
    from fair_calib_llmc.evaluation.diagnose import variant_panels, variant_styles
    from fair_calib_llmc.evaluation.plots import plot_rows

    figures = []
    save = plots._save
    monkeypatch.setattr(
        plots, "_save", lambda fig, plt, path: figures.append(fig) or save(fig, plt, path)
    )
    names = ["W4A16", "W16A4", "W4A4"]
    rows = [
        {"name": f"{name}{suffix}", "seed": seed, "flips_per_step": [0.1, 0.2, seed / 10]}
        for name in names
        for suffix in ("", " + rotations")
        for seed in (0, 1)
    ]
    paths = plot_rows(tmp_path, rows, variant_styles(names), variant_panels(names))
    assert paths["flips_per_step.png"].stat().st_size > 0
    (figure,) = figures
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in figure.axes}
    assert panels == {name: [name, f"{name} + rotations"] for name in names}
    # evaluate's curves (no panels): one plot, as before
    figures.clear()
    plot_rows(tmp_path / "evaluate", [{"name": "student", "seed": 0, "flips_per_step": [0.1]}])
    assert len(figures[0].axes) == 1


def test_table_uses_readable_headers_and_drops_what_no_run_measured(tmp_path):
    """The demo prints this table: it used raw field names, 4-5 significant digits, and a
    peak_gpu_mib column of zeros on CPU runs."""
    rows = [
        {**_row("rtn", 0, 0.123456, 107.7549), "stage1_seconds": 3.14159, "peak_gpu_mib": None},
        {**_row("rtn", 1, 0.125, 107.75), "stage1_seconds": 3.0, "peak_gpu_mib": None},
    ]
    header, _, line = _table(rows, {}, {}).splitlines()[:3]
    assert header == "| method | seeds | frontier flip rate | ELBO ppl | Stage I s |"
    assert line == "| rtn | 2 | 0.1242 ± 0.0008 | 107.75 ± 0.00 | 3.1 ± 0.1 |"
