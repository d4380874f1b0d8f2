"""``quantize()``: raw text in, compressed checkpoint out, for saved and in-memory models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModel

from fair_calib_llmc import quantize
from fair_calib_llmc.models import DreamModel, LLaDAModelLM

from .helpers import dream_config, llada_config, save_with_tokenizer, saved, tiny_causal_lm

pytestmark = pytest.mark.integration


def test_quantize_a_model_built_in_memory(llada, tokenizer, calibration_texts, tmp_path):
    assert llada.config._name_or_path == ""  # never saved: llm-compressor has no config file
    result = quantize(
        llada,
        tokenizer,
        "fair_calib_quarot_w4a4",
        calibration_texts,
        output_dir=tmp_path / "q",
        max_prompts=2,
    )
    assert llada.config._name_or_path == ""
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    probe = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, result.model(probe).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quantized_models_are_freed_when_dropped(family, tokenizer, calibration_texts, tmp_path):
    """Every model a sweep quantized and dropped is freed at once: llm-compressor's tracing
    registers it in torch.fx's process-wide wrap registry, and its session holds it (and the
    modifiers holding its modules) until the next oneshot; quantize() releases both."""
    import gc
    import weakref

    runs = [
        ("rtn_w4a4", None),
        ("quarot_gptq_w4a4", tmp_path / "q"),  # rotated, and the compressed save
        ("fair_calib_quarot_w4a4", None),
    ]
    for recipe, output_dir in runs:
        model = (
            LLaDAModelLM(llada_config(tokenizer))
            if family == "llada"
            else DreamModel(dream_config(tokenizer))
        )
        weights = [weakref.ref(p) for p in model.parameters()]
        result = quantize(
            model, tokenizer, recipe, calibration_texts, output_dir=output_dir, max_prompts=2
        )
        assert result.modifiers and all(m.finalized for m in result.modifiers)
        del model, result
        gc.collect()  # modules and their hooks form reference cycles
        assert all(ref() is None for ref in weights), recipe


def test_a_later_save_of_the_result_writes_its_recipe(
    llada, tokenizer, calibration_texts, tmp_path
):
    """The released session keeps a copy of the recipe, which the compressed save writes."""
    result = quantize(llada, tokenizer, "quarot_gptq_w4a4", calibration_texts, max_prompts=2)
    result.model.save_pretrained(tmp_path / "later")
    assert "ExactSpinQuantModifier" in (tmp_path / "later" / "recipe.yaml").read_text()


def test_quantize_from_a_jsonl_file(dream, tokenizer, calibration_texts, tmp_path):
    """Raw text + a recipe name is all a user needs; the checkpoint reloads. (Every text form
    is checked in test_data.py.)"""
    texts = [t.replace("\n", " ") for t in calibration_texts[:3]]
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    model = saved(dream, tokenizer, tmp_path / "fp")
    result = quantize(model, tokenizer, "fair_calib_quarot_w4a4", data, output_dir=tmp_path / "q")
    assert len(result.calibration) == 3 * 4  # prompts x states_per_prompt
    weights = torch.tensor([w for row in result.calibration["loss_mask"] for w in row])
    assert abs(weights.mean().item() - 1) < 1e-5 and weights.min() >= 0.1
    AutoModel.from_pretrained(tmp_path / "q")


def test_causal_model_is_rejected_before_stage_one(tokenizer):
    causal = tiny_causal_lm(tokenizer)
    with pytest.raises(ValueError, match="not a diffusion language model"):
        quantize(causal, tokenizer, "fair_calib_w4a4", ["text"])


def test_empty_or_short_calibration_set(llada, tokenizer):
    for texts in ([], ["too short"]):
        with pytest.raises(ValueError, match="calibration set is empty or too short"):
            quantize(llada, tokenizer, "fair_calib_w4a4", texts)


@pytest.mark.parametrize("max_prompts", [0, -1])
def test_non_positive_max_prompts_fail_before_any_work(
    llada, tokenizer, calibration_texts, monkeypatch, max_prompts
):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before max_prompts was checked")

    monkeypatch.setattr("fair_calib_llmc.pipeline.load_recipe_and_stage1", no_work)
    with pytest.raises(ValueError, match="max_prompts must be a positive integer"):
        quantize(llada, tokenizer, "rtn_w4a4", calibration_texts, max_prompts=max_prompts)


def test_tokenizer_none_names_the_fix(llada, calibration_texts):
    with pytest.raises(ValueError, match="needs the model's tokenizer, got NoneType"):
        quantize(llada, None, "rtn_w4a4", calibration_texts)


def test_a_path_is_loaded_and_prompt_length_overrides_the_recipe(
    llada, tokenizer, calibration_texts, tmp_path
):
    save_with_tokenizer(llada, tokenizer, tmp_path / "fp")
    result = quantize(
        str(tmp_path / "fp"), None, "rtn_w4a4", calibration_texts, max_prompts=2, prompt_length=8
    )
    assert isinstance(result.model, LLaDAModelLM)
    answer = 32  # the default sampler's answer length
    assert {len(ids) for ids in result.calibration["input_ids"]} == {8 + answer}


def test_nan_weights_fail_before_calibration(llada, tokenizer, calibration_texts, tmp_path):
    with torch.no_grad():
        llada.model.transformer.blocks[0].q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf weights"):
        quantize(
            llada,
            tokenizer,
            "fair_calib_w4a4",
            calibration_texts,
            output_dir=tmp_path / "out",
            max_prompts=2,
        )
    assert not (tmp_path / "out").exists()


def test_failed_save_leaves_no_checkpoint(
    llada, tokenizer, calibration_texts, tmp_path, monkeypatch
):
    model = saved(llada, tokenizer, tmp_path / "fp")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        quantize(
            model,
            tokenizer,
            "fair_calib_quarot_w4a4",
            calibration_texts,
            output_dir=tmp_path / "out",
            max_prompts=2,
        )
    assert sorted(os.listdir(tmp_path)) == ["fp"]


@pytest.mark.parametrize("save", [False, True])
def test_a_quantized_model_is_refused_before_any_work(
    llada, tokenizer, calibration_texts, tmp_path, monkeypatch, save
):
    """oneshot quantizes the model in place; a second quantize() of the same object failed
    deep inside llm-compressor ('Linear' object has no attribute 'weight')."""
    output_dir = tmp_path / "q" if save else None
    quantize(llada, tokenizer, "rtn_w4a4", calibration_texts, output_dir=output_dir, max_prompts=2)

    def no_work(*args, **kwargs):
        raise AssertionError("work started on an already quantized model")

    monkeypatch.setattr("fair_calib_llmc.pipeline.build_calibration_dataset", no_work)
    with pytest.raises(ValueError, match="went through quantize.*load the full-precision model"):
        quantize(llada, tokenizer, "rtn_w4a4", calibration_texts, max_prompts=2)


@pytest.mark.parametrize("save, cpu_bf16", [(False, True), (True, False)])
def test_an_autoround_result_runs_in_the_models_dtype(
    llada, tokenizer, calibration_texts, tmp_path, monkeypatch, save, cpu_bf16
):
    """auto-round left a float32 model's weights, norms and scales in bfloat16: the returned
    model's forward failed (float != BFloat16) unless a save happened to hide it. It does so
    only where the CPU has bfloat16 (auto-round's amp), so whether the online R4 came back
    float32 or float64 depended on the machine: both kinds of CPU are pinned here.

    The contract (pipeline.kept_dtype): every floating tensor is in the model's dtype, except
    an online transform's weight, which keeps its scheme's precision (float64) in memory and
    in the checkpoint."""
    from auto_round.utils.device_manager import CpuARDevice
    from safetensors import safe_open

    from fair_calib_llmc.recipe import with_overrides

    monkeypatch.setattr(CpuARDevice, "supports_bf16", lambda self: cpu_bf16)
    recipe = with_overrides("quarot_autoround_w4a4", {"AutoRoundModifier.iters": 2})
    output_dir = tmp_path / "q" if save else None
    result = quantize(
        llada, tokenizer, recipe, calibration_texts, output_dir=output_dir, max_prompts=2
    )
    model = result.model
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    dtypes = {name: t.dtype for name, t in tensors if t.is_floating_point()}
    online = {name for name in dtypes if ".R4_input." in name}
    assert len(online) == len(model.model.transformer.blocks)  # one R4 per down projection
    assert {dtypes[name] for name in online} == {torch.float64}
    assert {dtype for name, dtype in dtypes.items() if name not in online} == {torch.float32}
    probe = torch.arange(3, 40)[None]
    with torch.no_grad():
        logits = model(probe).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    if save:
        with safe_open(output_dir / "model.safetensors", "pt") as saved_file:
            stored = {k: saved_file.get_slice(k).get_dtype() for k in saved_file.keys()}
        assert {stored[k] for k in stored if ".R4_input." in k} == {"F64"}


def test_a_baseline_recipe_sets_stage_one(llada, tokenizer, calibration_texts):
    """Stage I settings reach quantize() one way for every recipe: quantize(stage1=...), else
    the recipe's top-level stage1: (a baseline's too), else FAIRCalibModifier.stage1."""
    from fair_calib_llmc.recipe import RecipeError, shipped_recipes

    def lengths(result) -> tuple[set, int]:
        return {len(ids) for ids in result.calibration["input_ids"]}, len(result.calibration)

    answer = 32  # the default sampler's answer length
    rtn = shipped_recipes()["rtn_w4a4"]
    with_stage1 = "stage1:\n  prompt_length: 8\n  states_per_prompt: 2\n" + rtn
    result = quantize(llada, tokenizer, with_stage1, calibration_texts, max_prompts=2)
    assert lengths(result) == ({8 + answer}, 2 * 2)
    argument = {"prompt_length": 12, "states_per_prompt": 3}
    model = LLaDAModelLM(llada.config).eval()
    result = quantize(model, tokenizer, rtn, calibration_texts, max_prompts=2, stage1=argument)
    assert lengths(result) == ({12 + answer}, 2 * 3)
    fair = shipped_recipes()["fair_calib_w4a4"]  # FAIRCalibModifier.stage1: still read
    with pytest.raises(RecipeError, match="sets Stage I twice"):
        quantize(
            LLaDAModelLM(llada.config).eval(),
            tokenizer,
            "stage1: {prompt_length: 8}\n" + fair,
            calibration_texts,
        )


def test_a_mask_token_from_the_tokenizer_is_saved_not_written_into_the_config(
    tokenizer, calibration_texts, tmp_path
):
    """The spec carries the tokenizer's mask token through Stage I and the modifiers; the
    model's config stays as given and the checkpoint's config.json states the token."""
    model = LLaDAModelLM(llada_config(tokenizer, mask_token_id=None)).eval()
    quantize(
        model,
        tokenizer,
        "fair_calib_quarot_w4a4",
        calibration_texts,
        output_dir=tmp_path / "q",
        max_prompts=2,
    )
    assert model.config.mask_token_id is None
    saved_config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved_config["mask_token_id"] == tokenizer.mask_token_id
    assert AutoModel.from_pretrained(tmp_path / "q").config.mask_token_id == tokenizer.mask_token_id


def test_quantize_the_built_in_model_on_clean_text_with_the_position_prior(tmp_path):
    """The paper's Stage I (clean text, static position prior) ends in a checkpoint that
    reloads exactly."""
    from fair_calib_llmc.io.corpus import shipped_texts
    from fair_calib_llmc.io.default_model import load_default_model
    from fair_calib_llmc.stage1.position import StaticPositionPrior

    model, tokenizer = load_default_model()
    stage1 = {
        "sampler": {"family": "llada", "steps": 16, "gen_length": 16, "block_length": 16},
        "prompt_length": 8,
        "inputs": "text",
        "prior": {"source": "position"},
    }
    result = quantize(
        model,
        tokenizer,
        "fair_calib_quarot_w4a4",
        shipped_texts("calibration"),
        output_dir=tmp_path / "q",
        max_prompts=2,
        stage1=stage1,
    )
    assert isinstance(result.prior, StaticPositionPrior)
    ids = torch.tensor(result.calibration["input_ids"])
    assert ids.shape == (2, 8 + 16) and not (ids == model.config.mask_token_id).any()
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)
