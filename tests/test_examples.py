"""The examples run top to bottom as a user would run them, and save loadable checkpoints."""

from __future__ import annotations

import json
import re
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
    """The script as shipped but for its calibration-prompt count and rotation-learning steps
    (fewer exercise the same lines; those are the settings the example names for that)."""
    cheaper = (EXAMPLES / script).read_text()
    for setting, value in (("NUM_CALIBRATION_PROMPTS", 4), ("LEARNING_STEPS", 2)):
        cheaper, replaced = re.subn(
            rf"^{setting} = \d+$", f"{setting} = {value}", cheaper, flags=re.M
        )
        assert replaced == 1, f"{script} no longer sets {setting} on one line"
    (tmp_path / script).write_text(cheaper)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / script), run_name="__main__")
    assert "SAMPLE GENERATION" in capsys.readouterr().out
    config = json.loads((tmp_path / save_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    recipe = (tmp_path / save_dir / "recipe.yaml").read_text()  # the flagship pipeline
    assert "LearnedSpinQuantModifier" in recipe and "FAIRCalibModifier" in recipe
    model = AutoModel.from_pretrained(tmp_path / save_dir, dtype=torch.float32)
    assert torch.isfinite(model(torch.arange(3, 20)[None]).logits).all()
