"""What ``import fair_calib_llmc`` registers with other libraries, and when.

Every registration runs the moment its library is imported, by whoever imports it and in
whatever order: the LLaDA / Dream configurations with ``AutoConfig``, the model classes with
``AutoModel`` (or transformers' modeling code), the online-transform backport with
transformers' compressed-tensors quantizer, the W4A4 schemes with compressed-tensors, ``dllm``
with lm-evaluation-harness (a "module:Class" placeholder), and the modifiers and SpinQuant
mappings with llm-compressor. So ``import fair_calib_llmc`` itself imports none of them: a
consumer who only loads a checkpoint never pays for llm-compressor (seconds, and device
warnings), and nobody pays at import for transformers' modeling code.

The hook is a ``sys.meta_path`` finder that wraps the loader of a few named modules and runs a
function after the module has executed (:class:`AfterImport`); those functions wait until the
hooked imports around them are done (:class:`_Pending`), because transformers' modeling code,
Auto classes and quantizers, compressed-tensors and our model modules import each other. While
llm-compressor imports, its "No accelerator available!" warning is dropped: three of its
modules ask for the main device at import time (a dtype default), which says "Compressing
model on CPU" on every CPU import although nothing is being compressed; the warning still
appears when llm-compressor really picks a device.
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


class _Pending:
    """Hooks of modules that finished inside another hooked module's import.

    transformers' modeling code, its Auto classes and its quantizers import each other in
    whatever order the caller's first import starts; a hook run the moment its module finishes
    could find another of them half executed (and fail on its missing names). So hooks wait
    until the outermost hooked import is done, then run in the order their modules finished.
    """

    depth = 0
    draining = False
    hooks: list[tuple[Callable, object]] = []

    @classmethod
    def run(cls) -> None:
        if cls.depth or cls.draining:
            return
        cls.draining = True
        try:
            while cls.hooks:
                after, module = cls.hooks.pop(0)
                after(module)
        finally:
            cls.draining = False


class _HookedLoader(importlib.abc.Loader):
    """A module's own loader, with ``after(module)`` run once the module has executed (and
    every hooked import around it, :class:`_Pending`)."""

    def __init__(self, loader, after: Callable, immediate: bool = False) -> None:
        self._loader, self._after, self._immediate = loader, after, immediate

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _Pending.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            _Pending.depth -= 1
        if self._immediate:  # a hook that imports nothing: needed before the importer goes on
            self._after(module)
            return
        _Pending.hooks.append((self._after, module))
        _Pending.run()

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader that the other finders return for a module
    named in ``hooks`` (module name -> function of the imported module)."""

    def __init__(self) -> None:
        self.hooks: dict[str, tuple[Callable, bool]] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.hooks:
            return None
        after, immediate = self.hooks[fullname]
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, after, immediate)
                return spec
        return None


def _finder() -> AfterImport:
    for finder in sys.meta_path:
        if isinstance(finder, AfterImport):
            return finder
    finder = AfterImport()
    sys.meta_path.insert(0, finder)
    return finder


def after_import(name: str, hook: Callable, immediate: bool = False) -> None:
    """Run ``hook(module)`` once module ``name`` is imported: now if it already is. Hooks wait
    for the hooked imports around their module (:class:`_Pending`), except ``immediate`` ones,
    which must import nothing."""
    module = sys.modules.get(name)
    if module is not None:
        _Pending.hooks.append((hook, module))
        _Pending.run()
        return
    _finder().hooks[name] = (hook, immediate)


def _quiet_device_warning(_logger_module) -> None:
    """After llm-compressor configured its logger: mute the import-time device warning."""
    logger.disable(_DEVICE_WARNING_MODULE)


#: the modules that register themselves with llm-compressor when imported (the rotation and
#: FlatQuant modifiers subclass one another: flatquant imports learned_rotations)
_REGISTERING = (
    "fair_calib_llmc.stage2.modifier",
    "fair_calib_llmc.stage2.rotations",
    "fair_calib_llmc.stage2.learned_rotations",
    "fair_calib_llmc.stage2.flatquant",
    "fair_calib_llmc.stage2.equivalent_modifier",
)


def _register_llmcompressor(_llmcompressor) -> None:
    """After llm-compressor imported: register ``FAIRCalibModifier``, the rotation modifiers,
    ``FlatQuantModifier``, ``EquivalentRescaleModifier`` and the SpinQuant mappings, then
    restore llm-compressor's logging as it configured it."""
    try:
        # by module, not by name: fair_calib_llmc.stage2.modifier may itself be importing
        # llmcompressor. These import SpinQuant, which asks for the device too: still muted.
        for name in _REGISTERING:
            importlib.import_module(name)
    finally:
        config = sys.modules["llmcompressor.logger"].LOGGER_CONFIG  # .logger: loguru's logger
        # what llmcompressor.logger.configure_logger set, which muting one module changed
        (logger.disable if config.disabled else logger.enable)("llmcompressor")


#: the modules after which our model classes are registered: transformers' modeling code
#: (which ``import transformers`` defers) and ``AutoModel``, imported in either order, and our
#: own model modules (hooked too, so a hook never finds one of them half imported)
_MODELING = (
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "fair_calib_llmc.models.llada",
    "fair_calib_llmc.models.dream",
)


def _register_configs(_module) -> None:
    """Once ``AutoConfig`` and our model package both exist (either may finish first: the
    package imports transformers' configuration code): register the configurations."""
    configuration_auto = sys.modules.get("transformers.models.auto.configuration_auto")
    if configuration_auto is None:
        return
    from fair_calib_llmc.models.configs import CONFIGS

    for config in CONFIGS:
        configuration_auto.AutoConfig.register(config.model_type, config, exist_ok=True)


def _register_models(_modeling_module) -> None:
    """Once transformers' modeling code or ``AutoModel`` is imported: the LLaDA / Dream model
    classes with ``AutoModel`` and ``AutoModelForCausalLM`` (what
    ``llmcompressor.oneshot(model="path")`` uses). Importing our model classes imports the
    modeling code: whoever reaches for ``AutoModel`` pays for it then, not ``import
    fair_calib_llmc``."""
    from fair_calib_llmc.models import model_classes

    modeling_auto = importlib.import_module("transformers.models.auto.modeling_auto")
    for config, model in model_classes().items():
        for auto in (modeling_auto.AutoModel, modeling_auto.AutoModelForCausalLM):
            auto.register(config, model, exist_ok=True)


def _install_transform_loading(_quantizer_module) -> None:
    """Once transformers' compressed-tensors quantizer is imported (a ``from_pretrained`` of a
    quantized checkpoint imports it before it reads ``quantization_config``): the
    online-transform backport (:mod:`fair_calib_llmc.formats.transform_loading`)."""
    importlib.import_module("fair_calib_llmc.formats.transform_loading").install()


def _register_schemes(_preset_module) -> None:
    """Once compressed-tensors' preset table exists: the W4A4 schemes in it."""
    importlib.import_module("fair_calib_llmc.formats.schemes").register_schemes()


def _register_lm_eval_model(_registry_module) -> None:
    """Once lm-eval's registry is imported: the ``dllm`` model (a "module:Class" placeholder)."""
    importlib.import_module("fair_calib_llmc.evaluation").register_lm_eval_model()


def _whole_import(_package) -> None:
    """Nothing to register: hooking a package makes its whole import one hooked import, so
    hooks of modules it imports on the way (transformers' quantizer, which compressed-tensors
    reaches from its own half-imported ``utils``) wait until the package is complete."""


def install() -> None:
    """Register everything when its library is imported, or now where it already is
    (idempotent): ``import fair_calib_llmc`` itself imports nothing heavy."""
    # our own model package too: a hook must never find it half imported
    for name in ("transformers.models.auto.configuration_auto", "fair_calib_llmc.models"):
        after_import(name, _register_configs)
    for name in _MODELING:
        after_import(name, _register_models)
    after_import("transformers.quantizers.quantizer_compressed_tensors", _install_transform_loading)
    after_import("compressed_tensors", _whole_import)
    after_import("compressed_tensors.quantization.quant_scheme", _register_schemes)
    after_import("lm_eval.api.registry", _register_lm_eval_model)
    after_import("llmcompressor.logger", _quiet_device_warning, immediate=True)
    after_import("llmcompressor", _register_llmcompressor)
    # each of them whole: one that imports llm-compressor itself (learned_rotations.base)
    # must be complete before the hook above imports the others (flatquant subclasses it)
    for name in _REGISTERING:
        after_import(name, _whole_import)
