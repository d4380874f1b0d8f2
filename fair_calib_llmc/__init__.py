"""fair-calib-llmc: FAIR-Calib W4A4 quantization of diffusion LMs inside llm-compressor.

Importing the package registers, with no further call:
* the native LLaDA / Dream model classes with transformers' Auto classes;
* ``FAIRCalibModifier`` with llm-compressor's ``ModifierFactory`` (so recipes can name it);
* the W4A4 schemes with compressed-tensors' presets;
* LLaDA / Dream layer mappings with ``SpinQuantModifier``;
* the ``dllm`` model with lm-evaluation-harness, when it is installed (``[eval]`` extra).
"""

from fair_calib_llmc import evaluation, rotations, schemes  # noqa: F401  (registration on import)
from fair_calib_llmc.calibration import build_calibration_dataset, load_texts
from fair_calib_llmc.models import (
    DiffusionLMSpec,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    diffusion_spec,
)
from fair_calib_llmc.modifier import FAIRCalibModifier
from fair_calib_llmc.pipeline import check_recipe_shape, load_recipe, quantize
from fair_calib_llmc.prior import PriorSettings
from fair_calib_llmc.sampling import DreamSampler, LLaDASampler

__all__ = [
    "DiffusionLMSpec",
    "DreamConfig",
    "DreamModel",
    "DreamSampler",
    "FAIRCalibModifier",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDASampler",
    "PriorSettings",
    "build_calibration_dataset",
    "check_recipe_shape",
    "diffusion_spec",
    "load_recipe",
    "load_texts",
    "quantize",
]

__version__ = "0.1.0"
