"""CPU-sized benchmark on the built-in default model, so the runner cannot rot."""

from __future__ import annotations

import json
from functools import partial

import pytest

from fair_calib_llmc.evaluation.demo import BenchmarkSettings, run_benchmark
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import load_default_model

pytestmark = pytest.mark.integration


def test_cpu_benchmark_end_to_end(tmp_path):
    settings = BenchmarkSettings(
        methods=("rtn", "fair-calib"),
        calibration_prompts=4,
        eval_prompts=2,
        gen_length=16,
        heldout_texts=2,
        heldout_length=64,
    )
    rows = run_benchmark(
        partial(load_default_model),
        shipped_texts("calibration"),
        shipped_texts("heldout"),
        tmp_path,
        settings,
    )
    assert [r["name"] for r in rows] == ["fp (float32)", "rtn", "fair-calib"]
    for row in rows[1:]:
        assert row["reload_max_abs_logit_diff"] == 0.0
        assert 0 <= row["frontier_flip_rate"] <= 1 and row["checkpoint_mib"] > 0
        assert row["elbo_ppl"] > rows[0]["elbo_ppl"] * 0.9
    for name in (
        "results.json",
        "results.md",
        "flips.png",
        "rtn-seed0/config.json",
        "fair-calib-seed0/model.safetensors",
    ):
        assert (tmp_path / name).exists(), name
    assert "fair-calib" in (tmp_path / "results.md").read_text()
    per_step = json.loads((tmp_path / "results.json").read_text())["flips_per_step"]
    assert set(per_step) == {"rtn", "fair-calib"}
    assert len(per_step["rtn"]) == 1 and len(per_step["rtn"][0]) == 16  # one seed, 16 steps


def test_unknown_method_and_used_output_fail_before_loading(tmp_path):
    def no_loading():
        raise AssertionError("loaded the model before checking the settings")

    with pytest.raises(ValueError, match="unknown method.*'fair-calib'"):
        run_benchmark(no_loading, [], [], tmp_path / "b", BenchmarkSettings(methods=("fair",)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.md").write_text("an earlier run")
    with pytest.raises(ValueError, match="--overwrite"):
        run_benchmark(no_loading, [], [], tmp_path / "b")
