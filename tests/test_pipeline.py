"""``quantize()``: raw text in, compressed checkpoint out, for saved and in-memory models."""

from __future__ import annotations

import torch
from transformers import AutoModel

from fair_calib_llmc import quantize


def test_quantize_a_model_built_in_memory(llada, tokenizer, calibration_texts, tmp_path):
    assert llada.config._name_or_path == ""  # never saved: llm-compressor has no config file
    result = quantize(
        llada,
        tokenizer,
        "fair_calib_w4a4",
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
