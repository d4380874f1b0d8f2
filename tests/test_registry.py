"""The family registry: both families complete, and no module outside it branches on a family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fair_calib_llmc
from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.models.registry import (
    FAMILIES,
    LM_HEADS,
    family,
    family_of,
    family_of_architecture,
    register_sampler,
)

from .helpers import dream_config, llada_config

pytestmark = pytest.mark.unit

PACKAGE = Path(fair_calib_llmc.__file__).parent
#: where a family may be spelled: the registry, and the model definitions themselves
ALLOWED = {
    "models/registry.py",
    "models/configs.py",
    "models/llada.py",
    "models/dream.py",
    "models/__init__.py",
}


def test_the_registry_holds_both_families_in_full(tokenizer):
    assert list(FAMILIES) == ["llada", "dream"]
    configs = {"llada": llada_config(tokenizer), "dream": dream_config(tokenizer)}
    for name, spec in FAMILIES.items():
        assert family(name) is spec
        config = configs[name]
        assert type(config) is spec.config_cls() and config.model_type == spec.model_type
        model = spec.model_cls()(config)
        assert type(model).__name__ == spec.model_class
        assert family_of(model) is spec and family_of(config) is spec
        assert family_of_architecture(spec.model_class) is spec
        # the decoder layer is what the model declares and what its stack holds
        assert set(model._no_split_modules) == {spec.decoder_layer}
        layers = [m for m in model.modules() if type(m).__name__ == spec.decoder_layer]
        assert len(layers) == config.num_hidden_layers
        # the sampler registered itself, with the family's own answer-length and order fields
        sampler = spec.sampler
        assert sampler.model_fields["family"].default == name
        fields = set(sampler.model_fields)
        assert set(spec.answer_length_fields) <= fields and set(spec.random_order) <= fields
        # every mapping names modules the model has: one head, one up projection per layer
        names = dict(model.named_modules())
        assert spec.lm_head in LM_HEADS
        head = spec.lm_head.removeprefix("re:").strip("^$").replace("\\.", ".")
        assert isinstance(names[head], torch.nn.Linear)
        assert spec.mlp_up in spec.rotation["mlp_in"]
        up = spec.mlp_up.removeprefix("re:.*").rstrip("$")
        assert sum(n.endswith(up) for n in names) == config.num_hidden_layers
        # the spec the package computes comes from the entry
        got = diffusion_spec(model, tokenizer)
        assert (got.family, got.shift_logits) == (name, spec.shift_logits)


def test_unknown_families_fail_with_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match=r"unknown dLLM family 'mdlm'.*\['llada', 'dream'\]"):
        family("mdlm")
    assert family_of(torch.nn.Linear(2, 2)) is None
    assert family_of_architecture("LlamaForCausalLM") is None

    class Other(FAMILIES["llada"].sampler):
        pass

    Other.model_fields["family"].default = "mdlm"  # a sampler of no registered family
    try:
        with pytest.raises(ValueError, match="unknown dLLM family 'mdlm'"):
            register_sampler(Other)
    finally:
        Other.model_fields["family"].default = "llada"


def _family_literals() -> set:
    """What spells a family: its name, model_type, class names, LM head, public mask id."""
    values = set()
    for spec in FAMILIES.values():
        values |= {spec.name, spec.model_type, spec.model_class, spec.config_class}
        values |= {spec.decoder_layer, spec.mask_token_id}
    values |= {f.lm_head for f in FAMILIES.values() if f.lm_head.startswith("re:")}
    return values


def _exported_names(tree: ast.AST) -> set[int]:
    """ids of the constants that only name public attributes (``__all__`` and ``_LAZY``)."""
    skip = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id in ("__all__", "_LAZY") for t in node.targets)
            and isinstance(node.value, (ast.Dict, ast.List, ast.Tuple))
        ):
            container = node.value
            items = container.keys if isinstance(container, ast.Dict) else container.elts
            skip |= {id(item) for item in items}
    return skip


def test_no_module_outside_the_registry_spells_a_family():
    literals = _family_literals()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        skip = _exported_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in skip:
                value = node.value
                if type(value) in (str, int) and value in literals:
                    found.append(f"{rel}:{node.lineno}: {value!r}")
    assert not found, "family facts outside models/registry.py:\n" + "\n".join(found)


def test_the_grep_would_catch_a_branch(tmp_path):
    """The check above fails on the branch it is there to forbid."""
    source = 'def f(spec):\n    return 1 if spec.family == "llada" else 2\n'
    tree = ast.parse(source)
    hits = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in _family_literals()
    ]
    assert hits == ["llada"]
