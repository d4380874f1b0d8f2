"""integration/paired_report.py: the best baseline is picked by measurement, pairs are per
seed, and rows of two calls are combined only when the rows they share agree."""

from __future__ import annotations

import json

import pytest

from integration.paired_report import report

pytestmark = pytest.mark.unit


def _results(path, flips: dict[str, list[float]], extra_rows=()):
    rows = [{"name": "fp (bfloat16)", "seed": None, "frontier_flip_rate": 0.0}]
    rows += [
        {"name": name, "seed": seed, "frontier_flip_rate": value, "kl_frontier": value / 2}
        for name, values in flips.items()
        for seed, value in enumerate(values)
    ]
    path.write_text(json.dumps({"rows": rows + list(extra_rows)}))
    return path


def test_the_best_baseline_is_the_lowest_measured_and_pairs_are_per_seed(tmp_path):
    first = _results(
        tmp_path / "a.json",
        {"rtn": [0.30, 0.32], "gptq": [0.20, 0.22], "fair": [0.10, 0.22]},
        extra_rows=[
            {
                "name": "rtn-x",
                "seed": 0,
                "frontier_flip_rate": 0.5,
                "reload_max_abs_logit_diff": 3.48,
                "error": "reload not exact (max abs logit difference 3.48)",
            }
        ],
    )
    second = _results(tmp_path / "b.json", {"gptq": [0.20, 0.22], "uniform": [0.20, 0.20]})
    text = report([first, second], ["rtn", "gptq", "missing"], ["fair:uniform"])
    assert "**gptq**" in text
    assert "| fair | -0.0500 | 0.0500 | -0.1000, +0.0000 | 0.762 |" in text
    assert "| fair / uniform | 0.800 | 0.500, 1.100 | -0.1000, +0.0200 |" in text
    # frontier KL first (the primary metric), flips beside it
    kl_pair = "| fair / uniform | 0.800 | 0.500, 1.100 | -0.0500, +0.0100 |"
    assert kl_pair in text and text.index("(kl_frontier)") < text.index("(frontier_flip_rate)")
    assert "- rtn-x: 0.5000" in text  # an inexact reload is listed, never the reference


def test_runs_that_measured_different_models_are_refused(tmp_path):
    first = _results(tmp_path / "a.json", {"gptq": [0.20]})
    second = _results(tmp_path / "b.json", {"gptq": [0.21]})
    with pytest.raises(SystemExit, match="measured different models"):
        report([first, second], ["gptq"], [])


def test_only_keeps_the_named_rows_the_baselines_and_the_pairs(tmp_path):
    path = _results(tmp_path / "a.json", {"gptq": [0.2], "fair": [0.1], "other": [0.3]})
    text = report([path], ["gptq"], [], only=["fair"])
    assert "| fair |" in text and "| gptq |" in text and "| other |" not in text
