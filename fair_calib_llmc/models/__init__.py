"""Native LLaDA and Dream models, registered with transformers' Auto classes on import.

After ``import fair_calib_llmc``, ``AutoConfig``/``AutoModel``/``AutoModelForCausalLM``
``.from_pretrained`` load LLaDA (``model_type: llada``) and Dream (``model_type: Dream``)
checkpoint directories without ``trust_remote_code``. Both are also registered with
``AutoModelForCausalLM`` because that is what ``llmcompressor.oneshot(model="path")`` uses.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fair_calib_llmc.models.dream import DREAM_MASK_TOKEN_ID, DreamConfig, DreamModel
from fair_calib_llmc.models.family import (
    DiffusionLMSpec,
    align_logits,
    denoiser_logits,
    diffusion_spec,
)
from fair_calib_llmc.models.llada import LLADA_MASK_TOKEN_ID, LM_HEAD, LLaDAConfig, LLaDAModelLM

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
    "LLADA_MASK_TOKEN_ID",
    "DREAM_MASK_TOKEN_ID",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Register both families with the Auto classes (idempotent)."""
    for config_cls, model_cls in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto in (AutoModel, AutoModelForCausalLM):
            auto.register(config_cls, model_cls, exist_ok=True)


register_auto_classes()
