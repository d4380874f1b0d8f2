"""Online rotations (SpinQuant R4) survive a compressed save and plain ``from_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModel

from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.recipe import shipped_recipes

from .helpers import masked_states, saved

pytestmark = pytest.mark.integration


def _probe(model):
    x = torch.arange(3, 40)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(x).logits


def test_online_rotation_checkpoint_reloads_with_identical_logits(
    dllm, tokenizer, calibration_texts, tmp_path
):
    model = saved(dllm, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=shipped_recipes()["quarot_gptq_w4a4"],
        dataset=dataset,
        num_calibration_samples=len(dataset),
    )
    online = {n for n, _ in model.named_modules() if n.endswith("R4_input")}
    assert len(online) == model.config.num_hidden_layers  # one per down projection
    expected = _probe(model)
    save_atomically(model, tokenizer, tmp_path / "q")

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(config["transform_config"]["config_groups"]) == {"R1", "R2", "R4"}
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert {n for n, _ in reloaded.named_modules() if n.endswith("R4_input")} == online
    shared = {id(m.weight) for n, m in reloaded.named_modules() if n.endswith("R4_input")}
    assert len(shared) == 1  # stored once, tied on load, not left uninitialised
    assert torch.equal(_probe(reloaded), expected)

    # and the rotation matters: without it the same weights compute something else
    for name, module in reloaded.named_modules():
        if name.endswith("R4_input"):
            module.weight.data = torch.eye(module.weight.shape[0], dtype=module.weight.dtype)
            module._scale = torch.tensor(1.0, dtype=torch.float64)
    assert (_probe(reloaded) - expected).abs().max() > 1e-2
