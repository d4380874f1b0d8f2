"""fair-calib-llmc: FAIR-Calib W4A4 quantization of diffusion LMs inside llm-compressor.

Importing the package registers, with no further call (:mod:`fair_calib_llmc.registration`):
* the native LLaDA / Dream model classes with transformers' Auto classes;
* the W4A4 schemes with compressed-tensors' presets;
* the transformers backport that re-attaches online transforms (rotations) when a
  compressed-tensors checkpoint is loaded (:mod:`fair_calib_llmc.formats.transform_loading`);
* the ``dllm`` model with lm-evaluation-harness, when it is installed (``[eval]`` extra);
* once llm-compressor is imported (by this package or by the caller, before or after):
  ``FAIRCalibModifier``, ``ExactSpinQuantModifier``, ``LearnedSpinQuantModifier``,
  ``FlatQuantModifier`` and ``EquivalentRescaleModifier`` with ``ModifierFactory`` (so
  recipes can name them) and the LLaDA / Dream layer mappings with ``SpinQuantModifier``.

Loading a checkpoint therefore does not import llm-compressor. The public names below are
imported from their modules on first use (module ``__getattr__``), so ``import
fair_calib_llmc`` costs what loading a model needs and prints nothing.
"""

from __future__ import annotations

import importlib

from fair_calib_llmc import registration

registration.install()

#: public name -> the submodule that defines it (imported when the name is first used)
_LAZY = {
    "DEFAULT_MODEL_DIR": "io.default_model",
    "DiffusionLMSpec": "models",
    "DreamConfig": "models",
    "DreamModel": "models",
    "LLaDAConfig": "models",
    "LLaDAModelLM": "models",
    "diffusion_spec": "models",
    "DreamSampler": "sampling.samplers",
    "EquivalentRescaleModifier": "stage2.equivalent_modifier",
    "ExactSpinQuantModifier": "stage2.learned_rotations",
    "FAIRCalibModifier": "stage2.modifier",
    "FlatQuantModifier": "stage2.flatquant",
    "LLaDASampler": "sampling.samplers",
    "LearnedSpinQuantModifier": "stage2.learned_rotations",
    "PriorSettings": "stage1.prior",
    "SamplerBase": "sampling.samplers",
    "Stage1Settings": "stage1.states",
    "build_calibration_dataset": "stage1.states",
    "check_recipe_shape": "recipe",
    "load_recipe": "recipe",
    "load_texts": "io.data",
    "quantize": "pipeline",
    "save_atomically": "io.checkpoint",
    "shipped_recipes": "recipe",
    "with_overrides": "recipe",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted(_LAZY)

__version__ = "0.1.0"
