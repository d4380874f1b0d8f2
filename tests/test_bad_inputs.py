"""Inputs that used to run to the end, fail late or lose results (issue 26, items 3-7): each
fails before any work with one line naming the fix, or behaves as documented."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors import SafetensorError

from fair_calib_llmc.io.checkpoint import OutputDirError, expected_checkpoint_bytes, save_atomically
from fair_calib_llmc.recipe import RecipeError, load_recipe, shipped_recipes

from .helpers import output_locked_by_another_process, save_with_tokenizer

pytestmark = pytest.mark.unit


def _no_work(*args, **kwargs):
    raise AssertionError("work started")


class _Stage1Seen(Exception):
    pass


def _one_line(message: str) -> None:
    assert message and "\n" not in message.strip(), message


# --- item 3: the CLI honours the recipe's top-level stage1: ---------------------------------


def test_cli_quantize_honours_a_top_level_stage1_and_refuses_its_typos(
    llada, tokenizer, tmp_path, monkeypatch, capsys
):
    import fair_calib_llmc_cli

    model_dir = save_with_tokenizer(llada, tokenizer, tmp_path / "fp")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage1:\n  states_per_prompt: 1\n" + shipped_recipes()["rtn_w4a4"])

    def seen(model, tokenizer, texts, stage1, **kwargs):
        raise _Stage1Seen(stage1)

    monkeypatch.setattr("fair_calib_llmc.pipeline.build_calibration_dataset", seen)
    argv = ["quantize", "--model", str(model_dir), "--recipe", str(recipe)]
    with pytest.raises(_Stage1Seen) as got:
        fair_calib_llmc_cli.main([*argv, "--output-dir", str(tmp_path / "q")])
    assert got.value.args[0].states_per_prompt == 1

    monkeypatch.setattr("fair_calib_llmc.cli.commands.load_model", _no_work)
    recipe.write_text("stage1:\n  prompt_lenght: 8\n" + shipped_recipes()["rtn_w4a4"])
    assert fair_calib_llmc_cli.main([*argv, "--output-dir", str(tmp_path / "q2")]) == 1
    error = capsys.readouterr().err
    assert "prompt_lenght" in error and "prompt_length" in error
    twice = shipped_recipes()["fair_calib_w4a4"]
    recipe.write_text("stage1:\n  states_per_prompt: 1\n" + twice)
    assert fair_calib_llmc_cli.main([*argv, "--output-dir", str(tmp_path / "q3")]) == 1
    assert "sets Stage I twice" in capsys.readouterr().err


# --- item 4: demo's output directory ---------------------------------------------------------


def test_demo_refuses_the_models_directory_and_a_locked_one(tmp_path):
    from fair_calib_llmc.evaluation.demo import BenchmarkSettings, run_benchmark

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    settings = BenchmarkSettings(methods=("rtn",))
    for out in (model_dir, model_dir / "results"):
        with pytest.raises(OutputDirError, match="directory"):
            run_benchmark(_no_work, [], [], out, settings, overwrite=True, model_dir=model_dir)
    with output_locked_by_another_process(tmp_path / "out") as pid:
        with pytest.raises(OutputDirError, match=str(pid)):
            run_benchmark(_no_work, [], [], tmp_path / "out", settings)


# --- item 5: nonsense accepted or failing late -----------------------------------------------


def test_a_negative_dampening_frac_is_refused():
    for name in ("gptq_w4a4", "fair_calib_w4a4"):
        text = shipped_recipes()[name]
        bad = text.replace("dampening_frac: 0.01", "dampening_frac: -1")
        bad = (
            bad
            if bad != text
            else text.replace("GPTQModifier:\n", "GPTQModifier:\n      dampening_frac: -1\n")
        )
        assert "dampening_frac: -1" in bad
        with pytest.raises(RecipeError, match="dampening_frac must be 0 or more") as got:
            load_recipe(bad)
        _one_line(str(got.value))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--elbo-texts", "-1"], "--elbo-texts"),
        (["--steps", "0"], "--steps"),
        (["--steps", "-1"], "--steps"),
        (["--block-length", "7"], "multiple of block_length"),
    ],
)
def test_evaluate_refuses_bad_sampler_settings_before_loading(
    flags, message, tmp_path, monkeypatch, capsys
):
    import fair_calib_llmc_cli

    monkeypatch.setattr("fair_calib_llmc.evaluation.compare.load_checkpoint", _no_work)
    argv = ["evaluate", "--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s")]
    assert fair_calib_llmc_cli.main([*argv, "--out", str(tmp_path / "o"), *flags]) == 1
    error = capsys.readouterr().err
    assert message in error
    _one_line(error)


def test_quantize_refuses_bad_arguments_before_stage_one(llada, tokenizer, monkeypatch):
    from fair_calib_llmc import quantize

    monkeypatch.setattr("fair_calib_llmc.pipeline.build_calibration_dataset", _no_work)
    cases = [
        (dict(model=None), TypeError, "needs a model"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
        (dict(seed="x"), TypeError, "seed must be an integer"),
        (dict(dataset="line one\nline two"), ValueError, r"list of strings \(\[text\]\)"),
        (dict(stage1={"prompt_lenght": 8}), RecipeError, "prompt_lenght.*prompt_length"),
    ]
    for overrides, error, message in cases:
        arguments = {"model": llada, "dataset": ["some text"] * 4, **overrides}
        with pytest.raises(error, match=message) as got:
            quantize(tokenizer=tokenizer, recipe="rtn_w4a4", **arguments)
        _one_line(str(got.value))


def test_swapped_teacher_and_student_warn(tmp_path):
    from fair_calib_llmc.evaluation.compare import warn_if_swapped

    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "config.json").write_text('{"model_type": "llada"}')
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text('{"quantization_config": {}}')
    assert warn_if_swapped(tmp_path / "q", tmp_path / "fp")
    assert not warn_if_swapped(tmp_path / "fp", tmp_path / "q")


def test_one_huge_line_is_tokenized_only_as_far_as_needed(tokenizer):
    from fair_calib_llmc.io.data import heldout_tokens, leading_tokens, prompts_from_texts

    line = "def frontier(x): return x + 1  # " * 4000
    seen = []

    def counting(text, **kwargs):
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    whole = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert leading_tokens(counting, line, 32) == whole[:32]
    assert max(seen) < len(line) / 50
    assert prompts_from_texts([line], counting, 32)[0].tolist() == whole[:32]
    assert heldout_tokens(counting, [line, "ab"], 64)[0].tolist() == whole[:64]
    assert (
        leading_tokens(tokenizer, "ab", 32)
        == tokenizer("ab", add_special_tokens=False)["input_ids"]
    )


# --- item 6: the disk -------------------------------------------------------------------------


def test_the_size_counts_every_saved_tensor_and_a_full_disk_says_so(
    llada, tokenizer, tmp_path, monkeypatch
):
    before = expected_checkpoint_bytes(llada)
    shared = torch.nn.Parameter(torch.eye(64, dtype=torch.float64), requires_grad=False)
    for block in llada.model.transformer.blocks:  # one float64 transform, saved per layer
        block.register_parameter("online_transform", shared)
    added = expected_checkpoint_bytes(llada) - before
    assert added == len(llada.model.transformer.blocks) * 64 * 64 * 8

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(type(llada), "save_pretrained", full)
    with pytest.raises(OSError, match="disk filled while saving") as got:
        save_atomically(llada, tokenizer, tmp_path / "q")
    assert got.value.errno == errno.ENOSPC
    _one_line(str(got.value))
    assert not list(tmp_path.glob(".q.partial*")) and not (tmp_path / "q").exists()


# --- item 7: messages -------------------------------------------------------------------------


def test_messages_name_the_file_and_the_fix(tmp_path, monkeypatch):
    from fair_calib_llmc.io.loading import load_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setattr("transformers.AutoModel.from_pretrained", _no_work)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*save_pretrained") as got:
        load_model(model_dir)
    assert str(model_dir) in str(got.value)

    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(RecipeError, match="not UTF-8") as got:
        load_recipe(binary)
    assert str(binary) in str(got.value)

    typo = shipped_recipes()["gptq_w4a4"].replace("GPTQModifier", "GPTQModifer")
    with pytest.raises(RecipeError, match="Did you mean GPTQModifier.*FAIRCalibModifier") as got:
        load_recipe(typo)
    _one_line(str(got.value))


def test_a_missing_recipe_fails_before_the_heavy_imports(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom fair_calib_llmc.recipe import RecipeError, load_recipe\n"
        f"try:\n    load_recipe({str(tmp_path / 'nope.yaml')!r})\n"
        "except RecipeError:\n    pass\nassert 'llmcompressor' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --- item 8: the commands' CPU threads --------------------------------------------------------


def test_the_commands_run_one_thread_on_a_small_machine_unless_told(monkeypatch):
    from fair_calib_llmc.cli.commands import set_threads

    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        assert set_threads(None) == 1
        assert set_threads("3") == 3
        for bad in ("x", "-1"):
            with pytest.raises(ValueError, match="FAIR_CALIB_LLMC_THREADS"):
                set_threads(bad)
        torch.set_num_threads(5)
        monkeypatch.setattr("os.cpu_count", lambda: 64)
        assert set_threads(None) == 5  # torch's own setting stays on a larger machine
    finally:
        torch.set_num_threads(threads)
