"""The built-in default model: a small LLaDA-architecture dLLM shipped with the package.

It was trained by ``integration/train_dllm.py --preset tiny`` (deterministic, CPU, a few minutes) on
Python standard-library sources with LLaDA's objective, so it has real, non-uniform
predictions and a real write frontier, unlike a random-init model. Its calibration and
held-out text ship beside it (``assets/data``), so the main job runs offline on any machine.
"""

from __future__ import annotations

import torch

from fair_calib_llmc.io.corpus import ASSETS
from fair_calib_llmc.io.loading import load_model

__all__ = ["DEFAULT_MODEL_DIR", "load_default_model"]

DEFAULT_MODEL_DIR = ASSETS / "default-llada"


def load_default_model(dtype: str | torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer) of the built-in default model."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the built-in default model is missing from {DEFAULT_MODEL_DIR}; reinstall the "
            "package or rebuild it with `python integration/train_dllm.py --preset tiny`"
        )
    return load_model(DEFAULT_MODEL_DIR, dtype=dtype, device=device)
