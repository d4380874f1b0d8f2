"""CPU-sized benchmark on the built-in default model, so the runner cannot rot."""

from __future__ import annotations

import json
from functools import partial

from fair_calib_llmc.benchmark import BenchmarkSettings, run_benchmark
from fair_calib_llmc.corpus import shipped_texts
from fair_calib_llmc.default_model import load_default_model
from fair_calib_llmc.metrics import elbo_perplexity
from fair_calib_llmc.models import LLaDAModelLM


def test_default_model_learned_something():
    model, tokenizer = load_default_model()
    texts = [t for t in shipped_texts("heldout")[:8]]
    held = [__import__("torch").tensor(tokenizer(t)["input_ids"][:96]) for t in texts]
    random_init = LLaDAModelLM(model.config).eval()
    trained = elbo_perplexity(model, held, mc_samples=4)
    assert trained < 0.2 * elbo_perplexity(random_init, held, mc_samples=4)
    assert trained < 40  # measured 20.2 on 128-token windows at release


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
    assert [r["method"] for r in rows] == ["fp (float32)", "rtn", "fair-calib"]
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
    assert set(json.loads((tmp_path / "results.json").read_text())["flips_per_step"]) == {
        "rtn",
        "fair-calib",
    }
