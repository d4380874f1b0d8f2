"""CPU-sized benchmark on the built-in default model, so the runner cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import pytest

from fair_calib_llmc.evaluation.demo import BenchmarkSettings, check_methods, run_benchmark
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import load_default_model
from fair_calib_llmc.recipe import RecipeError

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


#: the GPU benchmark scripts and the environment that picks their table
#: (each format branch of formats_benchmark.sh once: FP4 recipes, with MXFP4's extra rows,
#: and re-schemed int recipes)
GPU_SCRIPTS = [
    ("learned_rotations_benchmark.sh", {}),
    ("flatquant_benchmark.sh", {}),
    ("formats_benchmark.sh", {"FORMAT": "nvfp4"}),
    ("formats_benchmark.sh", {"FORMAT": "mxfp4"}),
    ("formats_benchmark.sh", {"FORMAT": "ag32"}),
]


@pytest.mark.parametrize(
    "script, env", GPU_SCRIPTS, ids=[env.get("FORMAT", s) for s, env in GPU_SCRIPTS]
)
def test_every_gpu_benchmark_row_has_a_recipe_that_loads(script, env, tmp_path):
    """The scripts a device call runs check every row's recipe before training (CHECK_ONLY
    stops there): a typo in a variant must fail here, not after minutes of GPU time."""
    root = Path(__file__).resolve().parents[1]
    environment = {
        **os.environ,
        **env,
        "CHECK_ONLY": "1",
        "WORK_DIR": str(tmp_path / "work"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(root / "integration" / script), str(tmp_path / "out")],
        env=environment,
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every recipe loads" in done.stdout


def _side_by_side(tmp_path, *args, **env):
    """integration/side_by_side.sh in check mode: no preflight, no training, no model."""
    root = Path(__file__).resolve().parents[1]
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("METHODS", "METHOD_GROUPS"))},
        **env,
        "CHECK_ONLY": "1",
        "DEVICE": "cpu",
        "SCRATCH": str(tmp_path / "scratch"),
        "OUT": str(tmp_path / "out"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", str(root / "integration" / "side_by_side.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
        cwd=root,
    )


def test_side_by_side_runs_each_job_on_its_family_with_its_own_rows(tmp_path):
    """`side_by_side.sh FAMILY [FAMILY:]JOB...`: a plain JOB takes the first family, each job
    checks the rows METHODS_<family>_<job> names (a learned job without one takes METHODS, as
    before), and each job's output has its own folder."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's")  # not the script's: stays
    done = _side_by_side(
        tmp_path,
        "dream",
        "learned",
        "llada:ag32",
        "llada:learned",
        METHODS="quarot+gptq",
        METHODS_dream_learned="quarot+gptq quarot+gptq-equivalent",
        METHODS_llada_ag32="rtn-ag32 gptq-ag32 fair-calib-ag32",
        METHOD_GROUPS_llada_ag32="2",
    )
    log = (tmp_path / "out" / "driver.log").read_text()
    assert done.returncode == 0, log[-3000:]
    # the driver's "== <family>-<job> (exit N)" sections hold each job's own log tail
    tails = {part.split(" ", 1)[0]: part for part in log.split("\n== ")[1:] if "(exit 0)" in part}
    assert set(tails) == {"dream-learned", "llada-ag32", "llada-learned"}
    assert "2 methods, every recipe loads" in tails["dream-learned"]
    assert "3 methods, every recipe loads" in tails["llada-ag32"]
    assert "1 methods, every recipe loads" in tails["llada-learned"]
    assert "llada-ag32: METHODS=rtn-ag32 gptq-ag32 fair-calib-ag32 METHOD_GROUPS=2" in log
    assert "dream-learned: METHODS=quarot+gptq quarot+gptq-equivalent METHOD_GROUPS=1" in log
    # the jobs' folders are packed into one file (a device call returns at most 8)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"driver.log", "jobs.tgz", "notes.txt"}
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"
    with tarfile.open(tmp_path / "out" / "jobs.tgz") as packed:
        folders = {name.split("/")[0] for name in packed.getnames()}
    assert folders == {"dream-learned", "llada-ag32", "llada-learned"}
    assert not (tmp_path / "scratch" / "wd" / "preflight.ok").exists()  # no preflight ran


def test_side_by_side_rejects_bad_jobs_and_rows_of_another_job(tmp_path):
    for args, message in [
        (("dream", "llada:nope"), "unknown JOB llada:nope"),
        (("dream", "tex:ag32"), "unknown FAMILY in tex:ag32"),
        (("dream", "learned", "dream:learned"), "dream:learned given twice"),
    ]:
        done = _side_by_side(tmp_path, *args)
        assert done.returncode == 2 and message in done.stderr
    # a shipped name has a recipe, but it is not a row of the format's table
    done = _side_by_side(tmp_path, "dream", "nvfp4", METHODS_dream_nvfp4="gptq")
    assert done.returncode == 1
    log = (tmp_path / "out" / "driver.log").read_text()
    assert "gptq is not a row of FORMAT=nvfp4" in log


def test_a_benchmark_row_without_a_loadable_recipe_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      sheme: W4A4\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        check_methods(("rtn", "broken"), {"rtn": "rtn_w4a4", "broken": str(bad)})
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(("nope",), {"rtn": "rtn_w4a4"})


def test_method_groups_split_the_methods_interleaved_and_reject_bad_groups(capsys):
    """METHOD_GROUPS=N runs each seed's methods as N processes: together they run every
    method once, each group from the front of the list (what a DEADLINE cut keeps)."""
    import argparse

    from integration.benchmark import _method_group, main

    methods = ["rtn", "gptq", "fair-calib", "quarot+gptq", "fair-calib-uniform"]
    parser = argparse.ArgumentParser()
    groups = [_method_group(parser, methods, f"{k}/2") for k in (1, 2)]
    assert groups == [["rtn", "fair-calib", "fair-calib-uniform"], ["gptq", "quarot+gptq"]]
    for group in ("1/2", "2/2"):
        main(
            [
                "--model",
                "x",
                "--out",
                "y",
                "--check-only",
                "--methods",
                *methods,
                "--method-group",
                group,
            ]
        )
    assert capsys.readouterr().out.split("\n")[:2] == [
        "3 methods, every recipe loads",
        "2 methods, every recipe loads",
    ]
    with pytest.raises(SystemExit):
        main(["--model", "x", "--out", "y", "--check-only", "--method-group", "0/2"])
    assert "1 <= K <= N, got '0/2'" in capsys.readouterr().err
