"""Native LLaDA and Dream models, registered with transformers' Auto classes.

After ``import fair_calib_llmc``, ``AutoConfig``/``AutoModel``/``AutoModelForCausalLM``
``.from_pretrained`` load LLaDA (``model_type: llada``) and Dream (``model_type: Dream``)
checkpoint directories without ``trust_remote_code``. Both are also registered with
``AutoModelForCausalLM`` because that is what ``llmcompressor.oneshot(model="path")`` uses.
The registration happens when transformers' Auto modules are imported
(:mod:`fair_calib_llmc.registration`); the model classes, which import transformers' modeling
code, are imported here on first use.
"""

from __future__ import annotations

import importlib

from fair_calib_llmc.models.configs import CONFIGS, DreamConfig, LLaDAConfig
from fair_calib_llmc.models.family import (
    DiffusionLMSpec,
    align_logits,
    denoiser_logits,
    diffusion_spec,
)
from fair_calib_llmc.models.registry import (
    DREAM_MASK_TOKEN_ID,
    FAMILIES,
    LLADA_MASK_TOKEN_ID,
    LM_HEAD,
    LM_HEADS,
    FamilySpec,
    family,
    family_of,
)

__all__ = [
    "LLaDAConfig",
    "LLaDAModelLM",
    "DreamConfig",
    "DreamModel",
    "DiffusionLMSpec",
    "diffusion_spec",
    "align_logits",
    "denoiser_logits",
    "LM_HEAD",
    "LM_HEADS",
    "LLADA_MASK_TOKEN_ID",
    "DREAM_MASK_TOKEN_ID",
    "CONFIGS",
    "model_classes",
    "FamilySpec",
    "FAMILIES",
    "family",
    "family_of",
]

#: public model class -> its module (imported on first use)
_MODELS = {f.model_class: f.model_module for f in FAMILIES.values()}


def model_classes() -> dict[type, type]:
    """Configuration class -> model class (imports the model code)."""
    return {f.config_cls(): __getattr__(f.model_class) for f in FAMILIES.values()}


def __getattr__(name: str):
    if name not in _MODELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODELS[name]}"), name)
    globals()[name] = value
    return value
