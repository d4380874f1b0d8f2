"""SpinQuant layer mappings for LLaDA and Dream.

``SpinQuantModifier`` picks its mappings by the model's class name from llm-compressor's
registries and otherwise falls back to Llama names. LLaDA names its layers differently
(``wte``, ``attn_out``, ``ff_proj``/``up_proj``/``ff_out``, ``attn_norm``/``ff_norm``/``ln_f``,
and an LM head also called ``ff_out``), so both families are registered here on import.
Rotations R1 (residual stream) and R2 (per head, value/output) fuse into weights and therefore
survive a compressed save and plain ``from_pretrained`` exactly.

SpinQuant's ``mlp_in`` lists the up and the gate projection alike; :data:`MLP_UP_REGISTRY`
names which of them is the up projection (multiplied, not activated), where the exact-function
control folds its channel scales (:mod:`fair_calib_llmc.stage2.equivalent_modifier`).
"""

from __future__ import annotations

from llmcompressor.modifiers.transform.spinquant.mappings import (
    SPINQUANT_MAPPING_REGISTRY,
    SpinQuantMapping,
)
from llmcompressor.modifiers.transform.spinquant.norm_mappings import (
    NORM_MAPPING_REGISTRY,
    NormMapping,
)

from fair_calib_llmc.models.configs import LM_HEAD

__all__ = [
    "DREAM_SPINQUANT",
    "LLADA_SPINQUANT",
    "MLP_UP_REGISTRY",
    "register_rotation_mappings",
]

#: each family's MLP up projection, one of its ``mlp_in``: ``down(act(gate(x)) * up(x))``
LLADA_MLP_UP = "re:.*up_proj$"
DREAM_MLP_UP = "re:.*up_proj$"

LLADA_SPINQUANT = SpinQuantMapping(
    embedding=r"re:^model\.transformer\.wte$",
    attn=r"re:.*blocks\.\d+$",
    attn_q="re:.*q_proj$",
    attn_k="re:.*k_proj$",
    attn_v="re:.*v_proj$",
    attn_o="re:.*attn_out$",
    mlp_in=[LLADA_MLP_UP, "re:.*ff_proj$"],
    mlp_out=[r"re:.*blocks\.\d+\.ff_out$"],
    lm_head=LM_HEAD,
)
LLADA_NORMS = [
    NormMapping(norm="re:.*attn_norm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    NormMapping(norm="re:.*ff_norm$", linears=["re:.*up_proj$", "re:.*ff_proj$"]),
    NormMapping(norm=r"re:^model\.transformer\.ln_f$", linears=[LM_HEAD]),
]
DREAM_SPINQUANT = SpinQuantMapping(
    embedding="re:.*embed_tokens$",
    attn="re:.*self_attn$",
    attn_q="re:.*q_proj$",
    attn_k="re:.*k_proj$",
    attn_v="re:.*v_proj$",
    attn_o="re:.*o_proj$",
    mlp_in=[DREAM_MLP_UP, "re:.*gate_proj$"],
    mlp_out=["re:.*down_proj$"],
    lm_head="lm_head",
)
DREAM_NORMS = [
    NormMapping(
        norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
    ),
    NormMapping(
        norm="re:.*post_attention_layernorm$", linears=["re:.*up_proj$", "re:.*gate_proj$"]
    ),
    NormMapping(norm="model.norm", linears=["lm_head"]),
]


#: model class name -> its MLP up projection (the class names of the SpinQuant registries)
MLP_UP_REGISTRY: dict[str, str] = {"LLaDAModelLM": LLADA_MLP_UP, "DreamModel": DREAM_MLP_UP}


def register_rotation_mappings() -> None:
    """Register the LLaDA / Dream mappings with SpinQuant's registries (idempotent)."""
    SPINQUANT_MAPPING_REGISTRY.setdefault("LLaDAModelLM", LLADA_SPINQUANT)
    NORM_MAPPING_REGISTRY.setdefault("LLaDAModelLM", LLADA_NORMS)
    SPINQUANT_MAPPING_REGISTRY.setdefault("DreamModel", DREAM_SPINQUANT)
    NORM_MAPPING_REGISTRY.setdefault("DreamModel", DREAM_NORMS)


register_rotation_mappings()
