"""torch.fx's registry of wrapped functions lets go of a traced model (and only of it)."""

from __future__ import annotations

import pytest
import torch.fx._symbolic_trace as fx_trace
from torch import nn

from fair_calib_llmc.fx_registry_leak import release_traced_model

pytestmark = pytest.mark.unit


def test_only_the_models_entries_go():
    model, other = nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)
    helper_globals = {"self": model[0]}  # generated code whose globals name a submodule
    exec("def helper():\n    return self\n", helper_globals)
    entries = {
        ("forward", 1): {"self": model},  # the rewritten forward's namespace
        ("subgraph", 2): {"helper": helper_globals["helper"]},
        ("other", 3): {"self": other},
        ("plain", 4): {"x": 1},
    }
    registry = fx_trace._wrapped_fns_to_patch
    before = dict(registry)
    try:
        registry.update(entries)
        release_traced_model(model)
        assert [k for k in entries if k in registry] == [("other", 3), ("plain", 4)]
    finally:
        registry.clear()
        registry.update(before)
