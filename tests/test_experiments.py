"""integration/experiments.yaml and the runner's mechanics (integration/run_experiments.py):
rows and controls as declared, the commands each process gets, the deadline, the model parts."""

from __future__ import annotations

import json
import random
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from fair_calib_llmc.recipe import read_recipe, with_overrides
from integration import experiment_runs
from integration.experiment_runs import Run, export_model, restore_model, run_under_deadline
from integration.experiment_steps import benchmark_runs
from integration.experiments import ROOT, ExperimentsError, load_experiments, with_control
from integration.run_experiments import Plan


@pytest.mark.unit
def test_a_control_row_is_its_parent_after_the_rescale():
    """control: true = EquivalentRescaleModifier first, with its defaults, then the parent
    recipe (after its overrides) unchanged; no row asks for the rotation perturbation."""
    experiments = load_experiments()
    controls = [row for row in experiments.rows.values() if row.control]
    assert {"gptq-nvfp4-equivalent", "hadamard32_gptq_mxfp4-equivalent"} <= {
        row.name for row in controls
    }
    for row in controls:
        first, *rest = experiments.recipe(row.name).items()
        assert first == (
            "equivalent_stage",
            {"equivalent_modifiers": {"EquivalentRescaleModifier": {"eps": 0.01, "seed": 0}}},
        )
        parent = row.recipe if "/" not in row.recipe else str(ROOT / row.recipe)
        assert dict(rest) == with_overrides(yaml.safe_load(read_recipe(parent)[0]), row.overrides)
    for row in experiments.rows.values():
        assert not any("equivalent_perturbation" in key for key in row.overrides), row.name
    with pytest.raises(ExperimentsError, match="already"):
        with_control(with_control({"a_stage": {}}), "twice")


@pytest.mark.unit
def test_the_prior_ablation_rows_are_the_recipes_they_were_measured_with():
    """The ablation rows are overrides of the shipped recipe (stage1.<field>), not copies of
    it: each must still be, as a mapping, the recipe stored beside its data, or the rows
    would no longer reproduce the stored results they pair with."""
    experiments = load_experiments()
    stored = ROOT / "integration" / "results"
    for row, path in {
        "fair-calib-flat-hits": "flatquant-rows-cpu-default/fair-calib-flat-hits.yaml",
        "fair-calib-flat-late": "flatquant-rows-cpu-default/fair-calib-flat-late.yaml",
        "fair-calib-flat-blocks": "flatquant-blocks-cpu-default/fair_calib_flatquant_blocks.yaml",
        "fair-calib-flat-blocks-late": (
            "flatquant-blocks-cpu-default/fair_calib_flatquant_blocks_late.yaml"
        ),
    }.items():
        assert experiments.recipe(row) == yaml.safe_load((stored / path).read_text()), row
    masked = experiments.recipe("fair-calib-flat-masked")["stage1"]["prior"]["position"]
    assert (masked["commit_weight"], masked["masked_weight"]) == (0.0, 1.0)
    states = experiments.recipe("fair-calib-flat-states")["stage1"]
    assert states == {
        "inputs": "states",
        "prompt_length": 32,
        "prior": {"source": "state"},
        "states_per_prompt": 4,
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, message",
    [
        ("rows: {}\n", "exactly rows: and jobs:"),
        ("rows: {rtn: {recipe: gptq_w4a4}}\njobs: {a: [rtn]}\n", "reuse built-in method names"),
        ("rows: {x: {recipe: gptq_w4a4, scheme: NVFP4}}\njobs: {a: [x]}\n", "row x: write"),
        ("rows: {}\njobs: {a: [nope]}\n", "job a: ['nope'] are neither"),
        ("rows: {}\njobs: {a: [rtn, rtn]}\n", "listed twice"),
        ("rows: {}\njobs: {a: {rows: [rtn], flags: []}}\n", "job a: write"),
    ],
)
def test_a_bad_experiments_file_fails_in_one_line(tmp_path, text, message):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentsError, match=message.replace("[", r"\[")) as err:
        load_experiments(path)
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_each_process_gets_its_seed_its_group_its_recipes_and_the_extra_arguments(tmp_path):
    """One process per seed x method group; the job's own arguments, then those after `--`
    (which win: argparse keeps the last), then the group."""
    job = Namespace(name="flat", rows=("quarot+gptq", "flatquant-equivalent"), args=("--x", "1"))
    recipes = {"flatquant-equivalent": "/r/flatquant-equivalent.yaml"}
    plan = Plan("dream", job, job.rows, 2, recipes)
    args = Namespace(seeds=[0, 1], eval_prompts=8, calibration_prompts=4, extra=["--corpus", "x"])
    runs = benchmark_runs(plan, Path("/m"), args, tmp_path)
    assert [run.name for run in runs] == ["seed0-g1", "seed0-g2", "seed1-g1", "seed1-g2"]
    command = runs[3].command
    assert command[1].endswith("integration/benchmark.py")
    tail = " ".join(command[2:])
    assert tail.startswith("--model /m --corpus stdlib --seeds 1 --out ")
    assert tail.endswith(
        "--methods quarot+gptq flatquant-equivalent --recipe "
        "flatquant-equivalent=/r/flatquant-equivalent.yaml --eval-prompts 8 "
        "--calibration-prompts 4 --x 1 --corpus x --method-group 2/2"
    )
    assert runs[3].out == tmp_path / "bench-dream" / "seed1-g2"
    assert runs[3].log == tmp_path / "bench-dream-seed1-g2.log"
    single = benchmark_runs(Plan("dream", job, job.rows, 1, {}), Path("/m"), args, tmp_path)
    assert [run.name for run in single] == ["seed0", "seed1"]
    assert "--method-group" not in single[0].command


def _fake_run(tmp_path: Path, name: str, rows: int, then: str) -> Run:
    """A process that writes ``rows`` finished rows into its results.json, then ``then``."""
    out = tmp_path / name
    script = (
        "import json, pathlib, signal, time\n"
        f"out = pathlib.Path({str(out)!r}); out.mkdir(parents=True)\n"
        "rows = [{'name': 'fp', 'seed': None}]\n"
        f"for i in range({rows}):\n"
        "    rows.append({'name': f'row{i}', 'seed': 0, 'frontier_flip_rate': 0.1,\n"
        "                 'stage1_seconds': 1.0, 'stage2_seconds': 2.0})\n"
        "    (out / 'results.json').write_text(json.dumps({'rows': rows}))\n"
        f"{then}\n"
    )
    command = [sys.executable, "-c", script]
    return Run("llada-flat", name, command, out, tmp_path / f"{name}.log")


@pytest.mark.integration
def test_the_deadline_stops_what_is_left_and_keeps_every_finished_row(tmp_path, monkeypatch):
    """At the deadline SIGTERM, and SIGKILL for a process that ignores it; rows finished before
    are logged with their timings and stay in results.json."""
    monkeypatch.setattr(experiment_runs, "KILL_AFTER", 1)
    monkeypatch.setattr(experiment_runs, "POLL_SECONDS", 0.1)
    done = _fake_run(tmp_path, "seed0", 2, "")
    stubborn = _fake_run(
        tmp_path, "seed1", 1, "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    )
    lines = []
    start = time.monotonic()
    run_under_deadline([done, stubborn], {}, time.monotonic() + 3, lines.append)
    assert time.monotonic() - start < 15
    assert done.process.returncode == 0 and not done.stopped
    assert stubborn.stopped and stubborn.process.returncode == -9  # SIGKILL
    log = "\n".join(lines)
    assert "llada-flat seed0: row1 (seed 0) done in" in log
    assert "Stage I 1.0s, Stage II 2.0s" in log
    assert "llada-flat seed1: row0 (seed 0) done" in log
    assert "llada-flat seed1: SIGKILL" in log and "seed1: stopped at the deadline" in log
    assert json.loads((stubborn.out / "results.json").read_text())["rows"][-1]["name"] == "row0"


@pytest.mark.unit
def test_a_model_goes_out_in_parts_and_comes_back_whole(tmp_path, monkeypatch):
    """--export-models writes parts of at most PART_BYTES; .models/ parts restore the model."""
    monkeypatch.setattr(experiment_runs, "PART_BYTES", 4096)
    model = tmp_path / "wd" / "model-dream"
    model.mkdir(parents=True)
    payload = random.Random(0).randbytes(20000)  # incompressible: several parts
    (model / "model.safetensors").write_bytes(payload)
    (model / "config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    parts = export_model(model, tmp_path / "out")
    assert len(parts) > 2 and all(p.stat().st_size <= 4096 for p in parts)
    assert parts[0].name == "model-dream.tgz.part00"
    restore_model(parts, tmp_path / "restored")
    assert (tmp_path / "restored" / "model-dream" / "model.safetensors").read_bytes() == payload


@pytest.mark.unit
def test_a_model_is_given_restored_from_carried_parts_or_reused(tmp_path, monkeypatch):
    """Before training, a family's model comes from --model-dir, else from the parts a call
    carries in .models/, else from a machine that still has it."""
    from integration import experiment_steps

    trained = tmp_path / "earlier" / "model-dream"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text('{"model_type": "Dream"}')
    carried = tmp_path / "checkout" / ".models"
    carried.mkdir(parents=True)
    export_model(trained, carried)
    monkeypatch.setattr(experiment_steps, "ROOT", tmp_path / "checkout")
    given = tmp_path / "given"
    lines = []
    args = Namespace(device="cpu", export_models=False)
    wd = tmp_path / "wd"
    found = experiment_steps.models(
        args, ["llada", "dream"], {"llada": given}, {}, wd, tmp_path, {}, lines.append
    )
    assert found == {"llada": given, "dream": wd / "model-dream"}
    assert (wd / "model-dream" / "config.json").read_text() == '{"model_type": "Dream"}'
    assert "model-dream: restored from .models (1 parts)" in lines
    lines.clear()
    experiment_steps.models(args, ["dream"], {}, {}, wd, tmp_path, {}, lines.append)
    assert lines == ["model-dream: reused"]


@pytest.mark.unit
def test_the_merge_runs_in_the_calls_environment(tmp_path):
    """On the device the package and its wheels import only through the call's PYTHONPATH
    (a merge without it failed every job of three calls): the merge gets that environment."""
    fake = tmp_path / "site" / "fair_calib_llmc" / "evaluation"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "report.py").write_text(
        "def merge_results(runs, out):\n"
        "    out.mkdir(parents=True)\n"
        "    (out / 'results.json').write_text('{\"merged by\": \"the call env\"}')\n"
        "    (out / 'results.md').write_text('table')\n"
        "    return 'table'\n"
    )
    work, recipes = tmp_path / "work", tmp_path / "recipes"
    recipes.mkdir()
    run = Run("llada-flat", "seed0", [], work / "bench-llada" / "seed0", work / "seed0.log")
    run.out.mkdir(parents=True)
    (run.out / "results.json").write_text('{"rows": []}')
    (run.out / "results.md").write_text("Measured on cpu\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    dest = tmp_path / "out" / "llada.tgz"
    model = tmp_path / "model"
    assert experiment_runs.pack_family([run], "llada", work, model, dest, recipes, env)
    merged = json.loads((work / "pack-llada" / "results.json").read_text())
    assert merged == {"merged by": "the call env"} and dest.is_file()


@pytest.mark.unit
def test_more_processes_than_the_gpu_holds_are_refused_before_any_work():
    """18 processes at 256 prompts ran out of memory on one H100 (79 GiB); 12 fit."""
    from integration.run_experiments import UsageError, check_gpu_memory

    check_gpu_memory(12, 256, 79.2)
    check_gpu_memory(18, 64, 79.2)  # fewer prompts, smaller batches
    with pytest.raises(UsageError, match=r"^18 benchmark processes .* 117 GiB .*fewer --groups"):
        check_gpu_memory(18, 256, 79.2)
