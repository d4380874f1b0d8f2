"""What ``import fair_calib_llmc`` registers with other libraries, and when.

Loading a checkpoint needs only the model classes (:mod:`fair_calib_llmc.models`), the
compressed-tensors schemes and the transformers backport for online transforms
(:mod:`fair_calib_llmc.transform_loading`): those are registered on import. Everything that
needs llm-compressor (the modifiers with ``ModifierFactory``, the SpinQuant mappings)
is registered the moment llm-compressor finishes importing, whoever imports it and whenever:
importing llm-compressor costs seconds and prints device warnings, which a consumer who only
loads a checkpoint should not pay for. lm-evaluation-harness gets its ``dllm`` model on import,
as a "module:Class" placeholder that imports no model code (:mod:`fair_calib_llmc.evaluation`).

The hook is a ``sys.meta_path`` finder that wraps the loader of a few named modules and runs a
function after the module has executed (:class:`AfterImport`). While llm-compressor imports,
it also drops its "No accelerator available!" warning: three of its modules ask for the main
device at import time (a dtype default), which says "Compressing model on CPU" on every CPU
import although nothing is being compressed; the warning still appears when llm-compressor
really picks a device.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable

from loguru import logger

__all__ = ["AfterImport", "after_import", "install"]

#: llm-compressor's module that logs the import-time device warning (and nothing else while
#: the package imports).
_DEVICE_WARNING_MODULE = "llmcompressor.utils.dev"


class _HookedLoader(importlib.abc.Loader):
    """A module's own loader, with ``after(module)`` run once the module has executed."""

    def __init__(self, loader, after: Callable) -> None:
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader that the other finders return for a module
    named in ``hooks`` (module name -> function of the imported module)."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable] = {}

    def find_spec(self, fullname, path=None, target=None):
        after = self.hooks.get(fullname)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, after)
                return spec
        return None


def _finder() -> AfterImport:
    for finder in sys.meta_path:
        if isinstance(finder, AfterImport):
            return finder
    finder = AfterImport()
    sys.meta_path.insert(0, finder)
    return finder


def after_import(name: str, hook: Callable) -> None:
    """Run ``hook(module)`` once module ``name`` is imported: now if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    _finder().hooks[name] = hook


def _quiet_device_warning(_logger_module) -> None:
    """After llm-compressor configured its logger: mute the import-time device warning."""
    logger.disable(_DEVICE_WARNING_MODULE)


def _register_llmcompressor(_llmcompressor) -> None:
    """After llm-compressor imported: register ``FAIRCalibModifier`` and the SpinQuant
    mappings, then restore llm-compressor's logging as it configured it."""
    try:
        # by module, not by name: fair_calib_llmc.modifier may itself be importing
        # llmcompressor. These import SpinQuant, which asks for the device too: still muted.
        importlib.import_module("fair_calib_llmc.modifier")
        importlib.import_module("fair_calib_llmc.rotations")
        importlib.import_module("fair_calib_llmc.learned_rotations")
    finally:
        config = sys.modules["llmcompressor.logger"].LOGGER_CONFIG  # .logger: loguru's logger
        # what llmcompressor.logger.configure_logger set, which muting one module changed
        (logger.disable if config.disabled else logger.enable)("llmcompressor")


def install() -> None:
    """Register what loading needs now and the rest on its library's import (idempotent)."""
    from fair_calib_llmc import evaluation, models, schemes, transform_loading

    models.register_auto_classes()
    schemes.register_schemes()
    transform_loading.install()
    evaluation.register_lm_eval_model()  # a "module:Class" placeholder: imports no model code
    after_import("llmcompressor.logger", _quiet_device_warning)
    after_import("llmcompressor", _register_llmcompressor)
