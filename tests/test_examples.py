"""The examples run top to bottom as a user would run them, and save loadable checkpoints."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "quantization_w4a4"


@pytest.mark.parametrize(
    "script,save_dir",
    [("llada_example.py", "default-llada-W4A4-FAIR"), ("dream_example.py", "tiny-dream-W4A4-FAIR")],
)
def test_example_quantizes_generates_and_saves(script, save_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert "SAMPLE GENERATION" in capsys.readouterr().out
    config = json.loads((tmp_path / save_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    model = AutoModel.from_pretrained(tmp_path / save_dir, dtype=torch.float32)
    assert torch.isfinite(model(torch.arange(3, 20)[None]).logits).all()
