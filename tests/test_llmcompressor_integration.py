"""Both families through the real ``llmcompressor.oneshot``: GPTQ baseline, FAIR-Calib
recipe, compressed save, reload with plain transformers, exact logits."""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModel

from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.models.configs import LM_HEADS
from fair_calib_llmc.recipe import shipped_recipes

from .helpers import masked_states, saved

pytestmark = pytest.mark.integration

GPTQ_W4A16 = f"""
gptq_stage:
  gptq_modifiers:
    GPTQModifier:
      scheme: W4A16
      targets: [Linear]
      ignore: {json.dumps(list(LM_HEADS))}
"""


def _probe(model):
    x = torch.arange(3, 40)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(x).logits


def _reload_and_compare(model, tokenizer, path):
    expected = _probe(model)
    save_atomically(model, tokenizer, path)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    reloaded = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(_probe(reloaded), expected)
    return config, reloaded


def test_gptq_w4a16_traces_both_families(dllm, tokenizer, calibration_texts, tmp_path):
    """Plain llm-compressor on raw text: the sequential pipeline traces our models."""
    model = saved(dllm, tokenizer, tmp_path / "fp")
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=GPTQ_W4A16,
        dataset=_text_dataset(calibration_texts),
        num_calibration_samples=4,
        max_seq_length=64,
    )
    config, _ = _reload_and_compare(model, tokenizer, tmp_path / "q")
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert config["quantization_status"] == "compressed"


def _text_dataset(texts):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts})


@pytest.mark.parametrize("recipe", ["fair_calib_quarot_w4a4", "fair_calib_uniform_w4a4"])
def test_fair_calib_recipe_through_oneshot(dllm, tokenizer, calibration_texts, tmp_path, recipe):
    model = saved(dllm, tokenizer, tmp_path / "fp")
    embedding = model.get_input_embeddings().weight.clone()
    spec = diffusion_spec(model, tokenizer)
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=4)
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=shipped_recipes()[recipe],
        dataset=dataset,
        use_loss_mask=True,
        num_calibration_samples=len(dataset),
    )
    config, reloaded = _reload_and_compare(model, tokenizer, tmp_path / "q")
    group = config["config_groups"]["group_0"]
    assert config["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == 4 and group["input_activations"]["num_bits"] == 4
    assert group["input_activations"]["dynamic"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("weight_packed") for k in keys)
    lm_head = "model.transformer.ff_out.weight" if spec.family == "llada" else "lm_head.weight"
    assert lm_head in keys  # the LM head stays in full precision
    # R1/R2/R4 were found through our LLaDA/Dream mappings
    assert set(config["transform_config"]["config_groups"]) == {"R1", "R2", "R4"}
    # the residual-stream rotation really reached the embedding (not quantized itself)
    assert not torch.allclose(reloaded.get_input_embeddings().weight, embedding, atol=1e-3)
