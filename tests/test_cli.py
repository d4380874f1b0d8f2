"""The ``fair-calib-llmc`` command: fast help, one-line user errors before heavy work, and a
recipe-by-name quantize from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from loguru import logger

import fair_calib_llmc_cli as cli
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR

from .helpers import output_locked_by_another_process

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """main() sets environment defaults and the CLI's log sink: undo both."""
    for name in ("TQDM_DISABLE", "TQDM_LEAVE", "LLM_COMPRESSOR_LOG_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    logger.remove()
    logger.add(sys.stderr)


def test_help_imports_nothing_heavy():
    code = textwrap.dedent(
        """
        import sys, fair_calib_llmc_cli as cli
        for command in ([], ["quantize"], ["demo"], ["evaluate"], ["diagnose"]):
            argv = [*command, "--help"]
            try:
                cli.main(argv)
            except SystemExit as e:
                assert e.code == 0
        heavy = {"torch", "transformers", "llmcompressor", "fair_calib_llmc"} & set(sys.modules)
        assert not heavy, heavy
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--recipe" in out.stdout and "--overwrite" in out.stdout and "--device" in out.stdout
    assert "--teacher" in out.stdout and "--no-layer-scan" in out.stdout


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_defaults_and_plain_text(capsys):
    quantize = _help(capsys, "quantize")
    assert "--output-dir OUTPUT_DIR where the compressed checkpoint goes" in quantize
    assert "calibration prompts (default: 64)" in quantize
    assert "holding text (default: text)" in quantize
    assert "hub id (org/name) needs the hub to be reachable" in quantize
    assert "(default: None)" not in quantize
    for command in ("evaluate", "diagnose"):
        text = _help(capsys, command)
        assert "``" not in text and ":func:" not in text
        assert "prompts per seed (default: 16)" in text


def _error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fair-calib-llmc: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def jsonl_without_text(tmp_path):
    path = tmp_path / "calib.jsonl"
    texts = shipped_texts("calibration")[:4]
    path.write_text("\n".join(json.dumps({"body": t, "n": 1}) for t in texts))
    return path


def test_user_errors_are_one_line_naming_the_fix(capsys, tmp_path, jsonl_without_text):
    out = ["--output-dir", str(tmp_path / "q")]
    cases = [
        (["--recipe", "fair_calib"], "unknown recipe 'fair_calib'"),
        (["--recipe", str(tmp_path / "missing.yaml")], "no such recipe file"),
        (["--recipe", "rtn_w4a4", "--model", str(tmp_path / "nope")], "no such model directory"),
        (["--recipe", "rtn_w4a4", "--dataset", str(jsonl_without_text)], "--text-column"),
        (["--recipe", "rtn_w4a4", "--device", "cuda:7"], "--device cpu"),
        (["--recipe", "rtn_w4a4", "--dataset", str(tmp_path)], "is a directory"),
        (["--recipe", "rtn_w4a4", "--prompt-length", "4096"], "--prompt-length"),
        (["--recipe", "rtn_w4a4", "--set", "GPTQModifier.block_size=64"], "QuantizationModifier"),
        (["--recipe", "rtn_w4a4", "--set", "QuantizationModifier.nope=1"], "valid fields: "),
    ]
    for args, expected in cases:
        assert expected in _error(capsys, "quantize", *args, *out)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rtn_stage:\n  quant_modifiers: [\n")
    assert f"{broken}:" in _error(capsys, "quantize", "--recipe", str(broken), *out)
    assert not (tmp_path / "q").exists()


def test_output_problems_fail_before_the_model_loads(capsys, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr("fair_calib_llmc.cli.commands.load_model", no_loading)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    base = ["quantize", "--recipe", "rtn_w4a4", "--output-dir"]
    assert "--overwrite" in _error(capsys, *base, str(tmp_path / "full"))
    assert "model's own directory" in _error(capsys, *base, str(DEFAULT_MODEL_DIR), "--overwrite")
    monkeypatch.chdir(tmp_path)
    assert "working directory" in _error(capsys, *base, ".", "--overwrite")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_second_quantize_into_one_directory_fails_before_the_model_loads(
    capsys, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although another run holds the directory")

    monkeypatch.setattr("fair_calib_llmc.cli.commands.load_model", no_loading)
    out = tmp_path / "out"
    argv = ["quantize", "--recipe", "rtn_w4a4", "--output-dir", str(out), "--overwrite"]
    with output_locked_by_another_process(out) as pid:
        assert f"another run (PID {pid}," in _error(capsys, *argv)


def test_evaluate_and_diagnose_output_errors_are_one_line(capsys, tmp_path):
    model = str(DEFAULT_MODEL_DIR)
    diagnose = ["diagnose", "--model", model, "--out"]
    assert "/proc is not writable" in _error(capsys, *diagnose, "/proc/x")
    assert "model's own directory" in _error(capsys, *diagnose, model, "--overwrite")
    (tmp_path / "results.md").write_text("mine")
    evaluate = ["evaluate", "--teacher", model, "--student", model, "--out", str(tmp_path)]
    assert "--overwrite" in _error(capsys, *evaluate)
    assert (tmp_path / "results.md").read_text() == "mine"


def test_redirected_diagnose_writes_a_few_stderr_lines(tmp_path):
    argv = ["diagnose", "--model", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "d")]
    argv += ["--seeds", "0", "1", "--eval-prompts", "3", "--gen-length", "8", "--elbo-texts", "2"]
    argv += ["--device", "cpu", "--no-layer-scan"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("TQDM_DISABLE", "TQDM_LEAVE"):
        env.pop(name, None)
    run = subprocess.run(
        [sys.executable, "-m", "fair_calib_llmc_cli", *argv],
        capture_output=True,  # bytes: text mode would turn a bar's \r redraws into lines
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count(b"\n") <= 10, run.stderr  # nested bars: one line per update


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "--recipe", "rtn_w4a4", "--output-dir", "q", "--max-prompts", "0"],
        ["quantize", "--recipe", "rtn_w4a4", "--output-dir", "q", "--max-prompts", "-1"],
        ["demo", "--eval-prompts", "0"],
        ["demo", "--calibration-prompts", "-1"],
        ["evaluate", "--teacher", "t", "--student", "s", "--eval-prompts", "0"],
    ],
)
def test_non_positive_prompt_counts_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        cli.main(["quantize", "--recipe", "nope", "--output-dir", str(tmp_path), "-v"])


def test_quantize_by_recipe_name_from_another_directory(capsys, tmp_path, monkeypatch):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in shipped_texts("calibration")[:4]))
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", "--recipe", "fair_calib_quarot_w4a4", "--output-dir", "q"]
    argv += ["--max-prompts", "2", "--set", "FAIRCalibModifier.target_strength=0.5"]
    assert cli.main([*argv, "--dataset", str(data), "--text-column", "body"]) == 0
    assert "saved compressed checkpoint to" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    # no shipped recipe names the LM head; the loader's ignore keeps it in full precision
    assert "model.transformer.ff_out" in config["quantization_config"]["ignore"]
    assert "target_strength: 0.5" in (tmp_path / "q" / "recipe.yaml").read_text()
    assert sorted(os.listdir(tmp_path)) == ["calib.jsonl", "q"]


def test_quantize_accepts_the_former_name_of_the_flagship(capsys, tmp_path, monkeypatch):
    """Published commands name fair_calib_learned_w4a4: it runs fair_calib_w4a4 (learned
    rotations, then Stage II), overrides included (a few steps keep it fast)."""
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", "--recipe", "fair_calib_learned_w4a4", "--output-dir", "q"]
    argv += ["--max-prompts", "2", "--set", "LearnedSpinQuantModifier.steps=2"]
    assert cli.main(argv) == 0
    assert "saved compressed checkpoint to" in capsys.readouterr().out
    recipe = (tmp_path / "q" / "recipe.yaml").read_text()
    assert "LearnedSpinQuantModifier" in recipe and "FAIRCalibModifier" in recipe
    assert "steps: 2" in recipe


def test_parser_lists_what_the_package_offers():
    """The light parser repeats a few names it cannot import; keep them in step."""
    from fair_calib_llmc.evaluation.demo import METHOD_RECIPES
    from fair_calib_llmc.io.loading import DTYPES
    from fair_calib_llmc.recipe import RECIPE_ALIASES, shipped_recipes

    assert cli.DTYPES == tuple(DTYPES)
    assert set(cli.METHODS.split(", ")) == set(METHOD_RECIPES)
    quantize_help = cli.build_parser()._subparsers._group_actions[0].choices["quantize"]
    recipe_help = next(a.help for a in quantize_help._actions if a.dest == "recipe")
    assert all(name in recipe_help for name in shipped_recipes())
    # an alias is shown as one, not as a recipe of its own
    for alias, target in RECIPE_ALIASES.items():
        assert f"{alias} is an alias of it" in recipe_help
        assert recipe_help.index(target) < recipe_help.index(alias)
