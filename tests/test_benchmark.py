"""CPU-sized benchmark on the built-in default model, so the runner cannot rot."""

from __future__ import annotations

import json
import tarfile
from functools import partial

import pytest

from fair_calib_llmc.evaluation.demo import BenchmarkSettings, check_methods, run_benchmark
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import load_default_model
from fair_calib_llmc.recipe import RecipeError, read_recipe

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


def _runner(tmp_path, *args):
    """integration/run_experiments.py in check mode, in this process: no preflight, no
    training, no model; its exit status."""
    from integration.run_experiments import main

    return main(
        [
            *args,
            "--check-only",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            "--scratch",
            str(tmp_path / "scratch"),
        ]
    )


def test_every_job_row_has_a_recipe_that_loads(tmp_path):
    """A device call checks every row's recipe before training (--check-only stops there): a
    typo in a row of integration/experiments.yaml must fail here, not after minutes of GPU
    time. Every job, each format's rows included (FP4 recipes, MXFP4's extra rows, re-schemed
    int recipes and the controls)."""
    from integration.experiments import load_experiments

    jobs = list(load_experiments().jobs)
    assert {"flat", "learned", "nvfp4", "mxfp4", "ag128", "ag32", "token"} <= set(jobs)
    assert _runner(tmp_path, *jobs) == 0
    log = (tmp_path / "out" / "driver.log").read_text()
    for job, rows in load_experiments().jobs.items():
        assert f"llada-{job}: {len(rows.rows)} rows, every recipe loads" in log


def test_the_runner_runs_each_job_on_its_family_with_its_own_rows(tmp_path):
    """`run_experiments.py [FAMILY:]JOB...`: a plain JOB takes --family, each job checks the
    rows --rows names for it (all its rows without one), its groups come from --groups, and
    each job's output has its own folder, packed into one file."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's")  # not the runner's: stays
    status = _runner(
        tmp_path,
        "--family",
        "dream",
        "learned",
        "llada:ag32",
        "llada:learned",
        "--rows",
        "learned=quarot+gptq,quarot+gptq-equivalent",
        "--rows",
        "llada:ag32=rtn-ag32,gptq-ag32,fair-calib-ag32",
        "--groups",
        "llada:ag32=2",
        "--rows",
        "llada:learned=quarot+gptq",
    )
    log = (tmp_path / "out" / "driver.log").read_text()
    assert status == 0, log[-3000:]
    assert "dream-learned: 2 rows, every recipe loads" in log
    assert "llada-ag32: 3 rows, every recipe loads" in log
    assert "llada-learned: 1 rows, every recipe loads" in log
    assert "== llada-ag32: rows rtn-ag32 gptq-ag32 fair-calib-ag32; 2 group(s) a seed" in log
    assert "== dream-learned: rows quarot+gptq quarot+gptq-equivalent; 1 group(s)" in log
    # the jobs' folders are packed into one file (a device call returns at most 8)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"driver.log", "jobs.tgz", "notes.txt"}
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"
    with tarfile.open(tmp_path / "out" / "jobs.tgz") as packed:
        names = packed.getnames()
    assert {name.split("/")[0] for name in names} == {
        "dream-learned",
        "llada-ag32",
        "llada-learned",
    }
    # each declared row's recipe, as it runs (built-in rows have none: benchmark.py knows them)
    assert "dream-learned/recipes/quarot+gptq-equivalent.yaml" in names
    assert "llada-ag32/recipes/fair-calib-ag32.yaml" in names
    assert not (tmp_path / "scratch" / "wd" / "preflight.ok").exists()  # no preflight ran


def test_the_runner_rejects_bad_jobs_and_rows_of_another_job(tmp_path, capsys):
    """Bad input fails before any work, in one line naming the fix."""
    for args, message in [
        (("--family", "dream", "llada:nope"), "unknown job llada:nope; use one of flat,"),
        (("--family", "dream", "tex:ag32"), "unknown family in tex:ag32 (llada, dream)"),
        (("--family", "dream", "learned", "dream:learned"), "dream:learned given twice"),
        # a shipped name has a recipe, but it is not a row of the format's table
        (("dream:nvfp4", "--rows", "dream:nvfp4=gptq"), "gptq is not a row of job nvfp4"),
        (("flat", "--rows", "token=rtn-token"), "llada:token is not a job of this call"),
        (("flat", "--rows", "flat=quarot+gptq", "--rows", "flat=flatquant"), "given twice"),
        (("flat", "--groups", "flat=0"), "write --groups N or --groups [FAMILY:]JOB=N"),
    ]:
        assert _runner(tmp_path, *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: one line as well
        _runner(tmp_path, "flat", "--budget", "soon")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_benchmark_row_without_a_loadable_recipe_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      sheme: W4A4\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        check_methods(("rtn", "broken"), {"rtn": "rtn_w4a4", "broken": str(bad)})
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(("nope",), {"rtn": "rtn_w4a4"})
    stage1 = tmp_path / "stage1.yaml"  # Stage I settings are a recipe's too: checked here
    stage1.write_text("stage1:\n  prior: {source: nowhere}\n" + read_recipe("rtn_w4a4")[0])
    with pytest.raises(RecipeError, match="stage1.prior.source: .*nowhere"):
        check_methods(("stage1",), {"stage1": str(stage1)})


def test_a_row_whose_stage1_sampler_is_another_familys_fails_before_any_work(tmp_path, capsys):
    """The LLaDA-only rows (semi-autoregressive probes) on a Dream job: refused at the check,
    in one line naming the row and the fix, not after the job's other rows ran."""
    from integration.experiments import load_experiments

    blocks = load_experiments().write_recipes(["fair-calib-flat-blocks"], tmp_path)
    blocks = blocks["fair-calib-flat-blocks"]
    check_methods(("blocks",), {"blocks": blocks}, "llada")
    with pytest.raises(RecipeError, match="leave the method out for dream") as err:
        check_methods(("rtn", "blocks"), {"rtn": "rtn_w4a4", "blocks": blocks}, "dream")
    assert "\n" not in str(err.value) and str(err.value).startswith("method blocks:")
    assert _runner(tmp_path, "dream:flat-blocks") == 2
    assert (
        "method fair-calib-flat-blocks: stage1.sampler is a llada sampler but the model is a "
        "dream dLLM; set stage1.sampler.family: dream, or leave the method out for dream"
        in capsys.readouterr().err
    )


def test_method_groups_split_the_methods_interleaved_and_reject_bad_groups(capsys):
    """--groups N (run_experiments.py) runs each seed's methods as N processes: together they
    run every method once, each group from the front of the list (what a deadline cut keeps)."""
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
