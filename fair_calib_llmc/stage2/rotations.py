"""The families' SpinQuant layer mappings, registered with llm-compressor.

``SpinQuantModifier`` picks its mappings by the model's class name from llm-compressor's
registries and otherwise falls back to Llama names. LLaDA names its layers differently
(``wte``, ``attn_out``, ``ff_proj``/``up_proj``/``ff_out``, ``attn_norm``/``ff_norm``/``ln_f``,
and an LM head also called ``ff_out``), so every family's mappings are registered here on
import. They are spelled once, as plain data, in the family registry
(:mod:`fair_calib_llmc.models.registry`: ``models/`` may not import llm-compressor); this module
builds llm-compressor's mapping objects from them. Rotations R1 (residual stream) and R2 (per
head, value/output) fuse into weights and therefore survive a compressed save and plain
``from_pretrained`` exactly.

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

from fair_calib_llmc.models.registry import DREAM, FAMILIES, LLADA, FamilySpec

__all__ = [
    "DREAM_SPINQUANT",
    "LLADA_SPINQUANT",
    "MLP_UP_REGISTRY",
    "SPINQUANT_MAPPINGS",
    "NORM_MAPPINGS",
    "register_rotation_mappings",
    "spinquant_mapping",
    "norm_mappings",
]


def spinquant_mapping(family: FamilySpec) -> SpinQuantMapping:
    """llm-compressor's ``SpinQuantMapping`` of ``family`` (its registry entry's ``rotation``)."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in family.rotation.items()}
    return SpinQuantMapping(**fields)


def norm_mappings(family: FamilySpec) -> list[NormMapping]:
    """llm-compressor's ``NormMapping`` list of ``family`` (its registry entry's ``norms``)."""
    return [NormMapping(norm=norm, linears=list(linears)) for norm, linears in family.norms]


#: model class name -> its SpinQuant mapping / norm mappings / MLP up projection (the keys of
#: llm-compressor's registries)
SPINQUANT_MAPPINGS: dict[str, SpinQuantMapping] = {
    f.model_class: spinquant_mapping(f) for f in FAMILIES.values()
}
NORM_MAPPINGS: dict[str, list[NormMapping]] = {
    f.model_class: norm_mappings(f) for f in FAMILIES.values()
}
MLP_UP_REGISTRY: dict[str, str] = {f.model_class: f.mlp_up for f in FAMILIES.values()}

#: the two families' mappings by their former names
LLADA_SPINQUANT = SPINQUANT_MAPPINGS[LLADA.model_class]
DREAM_SPINQUANT = SPINQUANT_MAPPINGS[DREAM.model_class]


def register_rotation_mappings() -> None:
    """Register every family's mappings with SpinQuant's registries (idempotent)."""
    for name, mapping in SPINQUANT_MAPPINGS.items():
        SPINQUANT_MAPPING_REGISTRY.setdefault(name, mapping)
        NORM_MAPPING_REGISTRY.setdefault(name, NORM_MAPPINGS[name])


register_rotation_mappings()
