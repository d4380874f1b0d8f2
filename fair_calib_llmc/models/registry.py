"""The dLLM families: one :class:`FamilySpec` per family, every fact the package spells per family.

In the manner of llm-compressor's ``spinquant/mappings.py`` (one mapping per architecture,
looked up by the model's class name), each family has one entry here: its configuration and
model classes, its mask token, which logit column predicts which position, its LM head, the
sampler and the sampler settings that differ per family, the SpinQuant rotation and norm
mappings, the MLP up projection and the decoder layer. Every other module looks a family up
(:func:`family`, :func:`family_of`, :func:`family_of_architecture`) and reads the field it
needs; none branches on a family's name. A new family is one more entry (and its model code).

``models/`` imports nothing of the package above it, so this module holds plain data only:

* the rotation and norm mappings are the keyword arguments of llm-compressor's
  ``SpinQuantMapping`` / ``NormMapping``; :mod:`fair_calib_llmc.stage2.rotations` builds those
  objects from them and registers them with llm-compressor;
* the sampler classes live in :mod:`fair_calib_llmc.sampling.samplers`, which registers each
  into its family here (:func:`register_sampler`) when it is imported; :attr:`FamilySpec.sampler`
  asks for that import if it has not happened;
* the configuration and model classes are named and imported on first use, so this module
  imports nothing (the configurations import transformers' configuration code, the models its
  modeling code, which costs seconds).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "FamilySpec",
    "FAMILIES",
    "LLADA",
    "DREAM",
    "family",
    "family_of",
    "family_of_architecture",
    "register_sampler",
    "sampler_classes",
    "LLADA_MASK_TOKEN_ID",
    "DREAM_MASK_TOKEN_ID",
    "LM_HEAD",
    "LM_HEADS",
]

_MODELS = "fair_calib_llmc.models"


@dataclass(frozen=True)
class FamilySpec:
    """Everything the package knows about one dLLM family.

    :param name: the family's name, as ``stage1.sampler.family`` and the spec spell it
    :param model_type: the configuration's ``model_type`` (what ``config.json`` states)
    :param config_class: the configuration class's name in :mod:`fair_calib_llmc.models.configs`
    :param model_class: the model class's name (the hub's ``architectures``; llm-compressor's
        SpinQuant registries key on it)
    :param model_module: the module of the model class, below :mod:`fair_calib_llmc.models`
    :param decoder_layer: the decoder layer's class name: the model's ``_no_split_modules``,
        hence llm-compressor's default sequential target and what
        :func:`~fair_calib_llmc.models.layers.named_decoder_layers` finds
    :param checkpoint: the public checkpoint the errors name
    :param mask_token_id: that checkpoint's mask token; only named in errors, never guessed
        (the spec reads the mask token off the config or the tokenizer)
    :param shift_logits: whether logit column ``i - 1`` predicts position ``i`` (an
        autoregressive parent's layout) rather than column ``i``
    :param lm_head: the LM head as an llm-compressor target (a W4A4 recipe leaves it unquantized)
    :param rotation: keyword arguments of llm-compressor's ``SpinQuantMapping``
    :param norms: ``(norm, linears it feeds)`` pairs: llm-compressor's ``NormMapping``
    :param mlp_up: which of ``rotation["mlp_in"]`` is the up projection (multiplied, not
        activated): ``down(act(gate(x)) * up(x))``
    :param answer_length_fields: sampler fields the default sampler sets to the answer length
        besides ``steps`` and ``gen_length`` (one token per step, the whole answer one block)
    :param random_order: the sampler settings that make its commit order random (the static
        position prior's probes)
    """

    name: str
    model_type: str
    config_class: str
    model_class: str
    model_module: str
    decoder_layer: str
    checkpoint: str
    mask_token_id: int
    shift_logits: bool
    lm_head: str
    rotation: Mapping[str, object]
    norms: tuple[tuple[str, tuple[str, ...]], ...]
    mlp_up: str
    answer_length_fields: tuple[str, ...] = ()
    random_order: Mapping[str, object] = field(default_factory=dict)

    def config_cls(self) -> type:
        """The configuration class (imports transformers' configuration code)."""
        return getattr(importlib.import_module(f"{_MODELS}.configs"), self.config_class)

    def model_cls(self) -> type:
        """The model class (imports transformers' modeling code)."""
        module = importlib.import_module(f"{_MODELS}.{self.model_module}")
        return getattr(module, self.model_class)

    @property
    def sampler(self) -> type:
        """The family's sampler class (registered by :mod:`fair_calib_llmc.sampling.samplers`)."""
        if self.name not in _SAMPLERS:
            importlib.import_module("fair_calib_llmc.sampling.samplers")
        return _SAMPLERS[self.name]


_LLADA_MLP_UP = "re:.*up_proj$"
_LLADA_HEAD = r"re:^model\.transformer\.ff_out$"  # not the blocks' down projections, also ff_out
_QKV = ("re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$")

LLADA = FamilySpec(
    name="llada",
    model_type="llada",
    config_class="LLaDAConfig",
    model_class="LLaDAModelLM",
    model_module="llada",
    decoder_layer="LLaDABlock",
    checkpoint="LLaDA-8B",
    mask_token_id=126336,
    shift_logits=False,
    lm_head=_LLADA_HEAD,
    rotation=MappingProxyType(
        dict(
            embedding=r"re:^model\.transformer\.wte$",
            attn=r"re:.*blocks\.\d+$",
            attn_q="re:.*q_proj$",
            attn_k="re:.*k_proj$",
            attn_v="re:.*v_proj$",
            attn_o="re:.*attn_out$",
            mlp_in=(_LLADA_MLP_UP, "re:.*ff_proj$"),
            mlp_out=(r"re:.*blocks\.\d+\.ff_out$",),
            lm_head=_LLADA_HEAD,
        )
    ),
    norms=(
        ("re:.*attn_norm$", _QKV),
        ("re:.*ff_norm$", ("re:.*up_proj$", "re:.*ff_proj$")),
        (r"re:^model\.transformer\.ln_f$", (_LLADA_HEAD,)),
    ),
    mlp_up=_LLADA_MLP_UP,
    answer_length_fields=("block_length",),
    random_order=MappingProxyType({"remasking": "random"}),
)

_DREAM_MLP_UP = "re:.*up_proj$"

DREAM = FamilySpec(
    name="dream",
    model_type="Dream",
    config_class="DreamConfig",
    model_class="DreamModel",
    model_module="dream",
    decoder_layer="DreamDecoderLayer",
    checkpoint="Dream-7B",
    mask_token_id=151666,
    shift_logits=True,
    lm_head="lm_head",
    rotation=MappingProxyType(
        dict(
            embedding="re:.*embed_tokens$",
            attn="re:.*self_attn$",
            attn_q="re:.*q_proj$",
            attn_k="re:.*k_proj$",
            attn_v="re:.*v_proj$",
            attn_o="re:.*o_proj$",
            mlp_in=(_DREAM_MLP_UP, "re:.*gate_proj$"),
            mlp_out=("re:.*down_proj$",),
            lm_head="lm_head",
        )
    ),
    norms=(
        ("re:.*input_layernorm$", _QKV),
        ("re:.*post_attention_layernorm$", ("re:.*up_proj$", "re:.*gate_proj$")),
        ("model.norm", ("lm_head",)),
    ),
    mlp_up=_DREAM_MLP_UP,
    random_order=MappingProxyType({"alg": "origin"}),
)

#: family name -> its entry, in the order the package lists families
FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({f.name: f for f in (LLADA, DREAM)})

#: Mask token of the public LLaDA-8B tokenizer.
LLADA_MASK_TOKEN_ID = LLADA.mask_token_id
#: Mask token of the public Dream-v0 tokenizer.
DREAM_MASK_TOKEN_ID = DREAM.mask_token_id
#: Regex naming LLaDA's LM head only (not the blocks' down projections, also called ``ff_out``).
LM_HEAD = LLADA.lm_head
#: Every family's LM head: the modules a W4A4 recipe leaves unquantized (sorted: the order the
#: shipped recipes spell them in YAML).
LM_HEADS = tuple(sorted(f.lm_head for f in FAMILIES.values()))

#: family name -> its sampler class (filled by :func:`register_sampler`)
_SAMPLERS: dict[str, type] = {}


def family(name: str) -> FamilySpec:
    """The entry of the family called ``name``; a ``ValueError`` names the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dLLM family {name!r}; use one of {list(FAMILIES)}") from None


def family_of(model_or_config) -> FamilySpec | None:
    """The entry whose configuration class ``model_or_config`` (a model, or its config) is an
    instance of; ``None`` for anything else (a causal LM)."""
    config = getattr(model_or_config, "config", model_or_config)
    for spec in FAMILIES.values():
        if isinstance(config, spec.config_cls()):
            return spec
    return None


def family_of_architecture(name: str) -> FamilySpec | None:
    """The entry whose model class is called ``name`` (``type(model).__name__``); ``None`` if
    no family's is."""
    return next((f for f in FAMILIES.values() if f.model_class == name), None)


def register_sampler(sampler: type) -> type:
    """Class decorator: ``sampler`` is the sampler of the family its ``family`` field names."""
    name = sampler.model_fields["family"].default
    family(name)  # an unknown family fails here, at import
    _SAMPLERS[name] = sampler
    return sampler


def sampler_classes() -> tuple[type, ...]:
    """Every family's sampler class, in :data:`FAMILIES` order."""
    return tuple(f.sampler for f in FAMILIES.values())
