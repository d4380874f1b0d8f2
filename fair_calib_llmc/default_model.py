"""The built-in default model: a small LLaDA-architecture dLLM shipped with the package.

It was trained by ``integration/train_dllm.py --preset tiny`` (deterministic, CPU, a few minutes) on
Python standard-library sources with LLaDA's objective, so it has real, non-uniform
predictions and a real write frontier, unlike a random-init model. Its calibration and
held-out text ship beside it (``assets/data``), so the main job runs offline on any machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from fair_calib_llmc.corpus import ASSETS

__all__ = ["DEFAULT_MODEL_DIR", "load_default_model"]

DEFAULT_MODEL_DIR = ASSETS / "default-llada"


def load_default_model(path: str | Path = DEFAULT_MODEL_DIR, dtype=torch.float32):
    """Load (model, tokenizer) of the built-in default model (or another local checkpoint)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}; rebuild the default model with "
            "`python integration/train_dllm.py --preset tiny`"
        )
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
