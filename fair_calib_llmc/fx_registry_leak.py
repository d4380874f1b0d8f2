"""A workaround for torch.fx's process-wide registry of wrapped functions, which keeps every
model that llm-compressor's sequential pipeline traced alive until the process ends.

:func:`release_traced_model` drops one model's entries once ``oneshot`` is done with it;
:func:`fair_calib_llmc.pipeline.quantize` calls it. It touches a private torch.fx attribute
(``torch.fx._symbolic_trace._wrapped_fns_to_patch``, torch 2.13), kept here alone so the
dependency has one place.
"""

from __future__ import annotations

import types

import torch.fx._symbolic_trace as fx_trace

__all__ = ["release_traced_model"]


def release_traced_model(model) -> None:
    """Let the model be freed once the caller drops it.

    llm-compressor's sequential pipeline rewrites the model's ``forward`` in a copy of its
    module's globals with ``self`` set to the model and registers the rewritten helpers with
    ``torch.fx.wrap``; the traced subgraphs register them again from their own generated code.
    ``torch.fx`` keeps every registering namespace in a process-wide dict forever, so every
    model traced by ``oneshot`` stays in (GPU) memory until the process ends (a whole model
    per run; docs/results.md, cost at 8B size). The tracing is over when ``oneshot`` returns,
    so this model's entries go.
    """
    modules = {id(m) for m in model.modules()}

    def holds_model(namespace: dict) -> bool:
        if id(namespace.get("self")) in modules:  # the rewritten forward's namespace
            return True
        return any(  # generated subgraph code: globals that name the rewritten helpers
            id(value.__globals__.get("self")) in modules
            for value in namespace.values()
            if isinstance(value, types.FunctionType)
        )

    registry = fx_trace._wrapped_fns_to_patch
    for key, namespace in list(registry.items()):
        if holds_model(namespace):
            del registry[key]
