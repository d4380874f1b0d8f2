"""``evaluate`` and ``diagnose`` on the built-in default model (CPU, few prompts), through the
argparse wiring the ``fair-calib-llmc`` command uses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

import fair_calib_llmc_cli as cli
from fair_calib_llmc.evaluation import compare, diagnose
from fair_calib_llmc.evaluation.report import METRICS, write_results
from fair_calib_llmc.io.checkpoint import OutputDirError
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR, load_default_model
from fair_calib_llmc.models import LLaDAModelLM
from fair_calib_llmc.models.configs import LM_HEADS

from .helpers import llada_config, save_with_tokenizer
from .reload_exactness import save_and_verify

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

SMALL = ["--seeds", "0", "1", "--eval-prompts", "3", "--gen-length", "8", "--elbo-texts", "2"]
SMALL += ["--device", "cpu"]


def _cli(argv):
    """What fair_calib_llmc_cli.main does, returning the command's result."""
    args = cli.build_parser().parse_args(argv)
    return cli._command(args)(args)


@pytest.fixture(scope="module")
def rtn_w4a4(tmp_path_factory):
    model, tokenizer = load_default_model()
    recipe = QuantizationModifier(
        scheme="W4A4_G128_PACKED",
        targets=["Linear"],
        ignore=list(LM_HEADS),
    )
    model = oneshot(model=model, recipe=recipe)
    return save_and_verify(model, tokenizer, tmp_path_factory.mktemp("rtn") / "w4a4")


def test_evaluate_teacher_against_itself_is_all_zero(tmp_path):
    result = _cli(
        ["evaluate", "--teacher", str(DEFAULT_MODEL_DIR), "--student", str(DEFAULT_MODEL_DIR)]
        + SMALL
        + ["--out", str(tmp_path)]
    )
    students = [r for r in result["rows"] if r["name"] == "student"]
    teachers = [r for r in result["rows"] if r["name"] == "teacher"]
    assert [r["seed"] for r in students] == [0, 1]
    for student, teacher in zip(students, teachers, strict=True):
        assert student["frontier_flip_rate"] == student["post_commit_mismatch"] == 0.0
        assert student["kl_frontier"] == student["kl_non_frontier"] == 0.0
        assert student["first_divergence"] == 8
        assert student["elbo_ppl"] == teacher["elbo_ppl"]


def test_evaluate_writes_table_json_and_plots_next_to_the_student(rtn_w4a4):
    result = _cli(
        ["evaluate", "--teacher", str(DEFAULT_MODEL_DIR), "--student", str(rtn_w4a4)] + SMALL
    )
    out = rtn_w4a4 / "evaluation"
    expected = {"results.json", "results.md", "flips_per_step.png", "flips_per_position.png"}
    assert {p.name for p in out.iterdir()} == expected
    saved = json.loads((out / "results.json").read_text())
    students = [r for r in saved["rows"] if r["name"] == "student"]
    assert len(students) == 2 and all(len(r["flips_per_step"]) == 8 for r in students)
    assert 0 < students[0]["frontier_flip_rate"] <= 1
    mean = sum(r["frontier_flip_rate"] for r in students) / 2
    table = (out / "results.md").read_text().splitlines()
    line = next(row for row in table if row.startswith("| student"))
    assert line.split("|")[3].strip().startswith(f"{mean:.4f} ±")  # after name and seeds
    assert [e["name"] for e in result["summary"]] == ["teacher", "student"]


def test_evaluate_refuses_a_student_of_another_model(tokenizer, tmp_path):
    other = save_with_tokenizer(LLaDAModelLM(llada_config(tokenizer)), tokenizer, tmp_path / "x")
    with pytest.raises(ValueError, match="not the same model"):
        _cli(["evaluate", "--teacher", str(DEFAULT_MODEL_DIR), "--student", str(other)] + SMALL)
    assert not (other / "evaluation").exists()


class _WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Loading a checkpoint (the first piece of work) raises :class:`_WorkStarted`."""

    def load(*args, **kwargs):
        raise _WorkStarted()

    for module in (compare, diagnose):
        monkeypatch.setattr(module, "load_checkpoint", load)


def _evaluate(teacher, student, *extra):
    return _cli(["evaluate", "--teacher", str(teacher), "--student", str(student), *SMALL, *extra])


def _diagnose(model, *extra):
    return _cli(["diagnose", "--model", str(model), *SMALL, *extra])


def test_existing_results_are_refused_before_any_work(tmp_path, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("mine")
    with pytest.raises(OutputDirError, match="exists and is not empty.*--overwrite"):
        _evaluate(DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR, "--out", str(out))
    with pytest.raises(OutputDirError, match="exists and is not empty.*--overwrite"):
        _diagnose(DEFAULT_MODEL_DIR, "--out", str(out))
    assert (out / "results.md").read_text() == "mine"
    with pytest.raises(_WorkStarted):  # --overwrite: accepted, the work begins
        _diagnose(DEFAULT_MODEL_DIR, "--out", str(out), "--overwrite")


def test_rerun_does_not_replace_the_students_evaluation(tmp_path, no_work):
    student = tmp_path / "student"
    (student / "evaluation").mkdir(parents=True)
    (student / "evaluation" / "results.json").write_text("{}")
    with pytest.raises(OutputDirError, match="evaluation' exists and is not empty"):
        _evaluate(DEFAULT_MODEL_DIR, student)
    with pytest.raises(_WorkStarted):
        _evaluate(DEFAULT_MODEL_DIR, student, "--overwrite")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_results_never_go_into_a_model_directory(tmp_path, no_work, overwrite):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for path in (teacher, student):
        path.mkdir()
        (path / "config.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    cases = [
        (teacher, "is the teacher's directory"),
        (student, "is the student's directory"),
        (tmp_path, "contains the teacher's directory"),
        (teacher / "eval", "is inside the teacher's directory"),
        (student / "other", "is inside the student's directory"),
    ]
    for out, message in cases:
        with pytest.raises(OutputDirError, match=message):
            _evaluate(teacher, student, "--out", str(out), *overwrite)
    for out in (teacher, teacher / "eval"):
        with pytest.raises(OutputDirError, match="the model's own directory"):
            _diagnose(teacher, "--out", str(out), *overwrite)
    assert sorted(tmp_path.rglob("*")) == before


def test_unwritable_results_directory_is_refused_before_any_work(no_work):
    with pytest.raises(OutputDirError, match="cannot write the results.*is not writable"):
        _diagnose(DEFAULT_MODEL_DIR, "--out", "/proc/fair-calib-diagnose")
    with pytest.raises(OutputDirError, match="cannot write the results.*is not writable"):
        _evaluate(DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR, "--out", "/proc/fair-calib-evaluate")


def test_diagnose_refuses_a_quantized_checkpoint_before_any_work(rtn_w4a4, tmp_path, no_work):
    with pytest.raises(ValueError, match="already quantized.*full-precision model"):
        _diagnose(rtn_w4a4, "--out", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_results_that_appear_during_the_run_are_not_replaced(tmp_path):
    (tmp_path / "results.md").write_text("mine")
    with pytest.raises(OutputDirError, match="results.md appeared while this run worked"):
        write_results(tmp_path, {"rows": []}, "| table |")
    assert (tmp_path / "results.md").read_text() == "mine"
    write_results(tmp_path, {"rows": []}, "| table |", overwrite=True)
    assert (tmp_path / "results.md").read_text() == "| table |\n"


def test_variant_schemes_split_weights_and_activations():
    schemes = diagnose.variant_schemes("W4A4_G128_PACKED")
    assert schemes["W4A16"].input_activations is None and schemes["W4A16"].weights.num_bits == 4
    assert schemes["W16A4"].weights is None
    act = schemes["W16A4"].input_activations
    assert (act.num_bits, act.type, act.strategy, act.dynamic) == (4, "int", "token", True)
    assert schemes["W4A4"].weights == schemes["W4A16"].weights
    assert not diagnose.needs_calibration(schemes["W16A4"])
    nvfp4 = diagnose.variant_schemes("NVFP4")  # a global activation scale: calibrated on data
    assert diagnose.needs_calibration(nvfp4["W4A4"])
    assert not diagnose.needs_calibration(nvfp4["W4A16"])


def test_diagnose_nvfp4_calibrates_its_activation_global_scales(tmp_path):
    result = _cli(
        ["diagnose", "--model", str(DEFAULT_MODEL_DIR), "--scheme", "NVFP4", "--no-layer-scan"]
        + ["--no-rotations", "--out", str(tmp_path)]
        + SMALL
    )
    assert list(dict.fromkeys(r["name"] for r in result["rows"])) == ["W4A16", "W16A4", "W4A4"]
    assert "activation scales calibrated on 16 texts; NVFP4" in result["markdown"]
    rates = [r["frontier_flip_rate"] for r in result["rows"] if r["name"] == "W16A4"]
    assert all(0 <= rate < 1 for rate in rates)
    scheme = diagnose.variant_schemes("NVFP4")["W16A4"]
    calibration = shipped_texts("calibration")
    student = diagnose._quantized(
        DEFAULT_MODEL_DIR, torch.float32, "cpu", scheme, False, calibration
    )
    global_scale = student.model.transformer.blocks[0].q_proj.input_global_scale
    assert torch.isfinite(global_scale).all() and (global_scale != 1).all()  # set from the data


def test_diagnose_variants_layers_and_plots(rtn_w4a4, tmp_path):
    result = _cli(["diagnose", "--model", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path)] + SMALL)
    names = list(dict.fromkeys(r["name"] for r in result["rows"]))
    assert names == [
        "W4A16",
        "W16A4",
        "W4A4",
        "W4A16 + rotations",
        "W16A4 + rotations",
        "W4A4 + rotations",
    ]
    layers = list(dict.fromkeys(r["name"] for r in result["layer_rows"]))
    assert layers == [f"model.transformer.blocks.{i}" for i in range(4)]
    assert {p.name for p in tmp_path.iterdir()} == {
        "results.json",
        "results.md",
        "flips_per_step.png",
        "flips_per_position.png",
        "layer_sensitivity.png",
    }
    # the in-memory W4A4 variant is the RTN checkpoint evaluate scores (saved, reloaded)
    evaluated = _cli(
        ["evaluate", "--teacher", str(DEFAULT_MODEL_DIR), "--student", str(rtn_w4a4)]
        + SMALL
        + ["--out", str(tmp_path / "eval")]
    )
    for metric in METRICS[:-1]:
        ours = [r[metric] for r in result["rows"] if r["name"] == "W4A4"]
        theirs = [r[metric] for r in evaluated["rows"] if r["name"] == "student"]
        assert ours == pytest.approx(theirs, abs=1e-6), metric
    # one layer at a time flips less than all layers at once, on average
    by_layer = [r["frontier_flip_rate"] for r in result["layer_rows"]]
    whole = [r["frontier_flip_rate"] for r in result["rows"] if r["name"] == "W4A4"]
    assert sum(by_layer) / len(by_layer) < sum(whole) / len(whole)


def test_layer_scan_quantizes_exactly_one_layer():
    model, _ = load_default_model()
    layers = diagnose.layer_linears(model)
    assert len(layers) == 4 and all(len(linears) == 7 for _, linears in layers)
    scheme = diagnose._only(layers[2][1], diagnose.variant_schemes()["W4A4"])
    model = oneshot(model=model, recipe=QuantizationModifier(config_groups={"g": scheme}))
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert quantized == set(layers[2][1])
    assert torch.is_tensor(model.model.transformer.blocks[2].q_proj.weight_scale)
