"""fair-calib-llmc: FAIR-Calib W4A4 quantization of diffusion LMs inside llm-compressor.

Importing the package registers, with no further call:
* the native LLaDA / Dream model classes with transformers' Auto classes;
* ``FAIRCalibModifier`` with llm-compressor's ``ModifierFactory`` (so recipes can name it);
* the W4A4 schemes with compressed-tensors' presets;
* LLaDA / Dream layer mappings with ``SpinQuantModifier``;
* the transformers backport that re-attaches online transforms (rotations) when a
  compressed-tensors checkpoint is loaded (:mod:`fair_calib_llmc.transform_loading`);
* the ``dllm`` model with lm-evaluation-harness, when it is installed (``[eval]`` extra).
"""

from fair_calib_llmc import (  # noqa: F401  (registration on import)
    evaluation,
    learned_rotations,
    rotations,
    schemes,
    transform_loading,
)
from fair_calib_llmc.calibration import Stage1Settings, build_calibration_dataset
from fair_calib_llmc.checkpoint import save_atomically
from fair_calib_llmc.data import load_texts
from fair_calib_llmc.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.learned_rotations import ExactSpinQuantModifier, LearnedSpinQuantModifier
from fair_calib_llmc.models import (
    DiffusionLMSpec,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    diffusion_spec,
)
from fair_calib_llmc.modifier import FAIRCalibModifier
from fair_calib_llmc.pipeline import quantize
from fair_calib_llmc.prior import PriorSettings
from fair_calib_llmc.recipe import check_recipe_shape, load_recipe, shipped_recipes
from fair_calib_llmc.sampling import DreamSampler, LLaDASampler, SamplerBase

transform_loading.install()

__all__ = [
    "DEFAULT_MODEL_DIR",
    "DiffusionLMSpec",
    "DreamConfig",
    "DreamModel",
    "DreamSampler",
    "ExactSpinQuantModifier",
    "FAIRCalibModifier",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDASampler",
    "LearnedSpinQuantModifier",
    "PriorSettings",
    "SamplerBase",
    "Stage1Settings",
    "build_calibration_dataset",
    "check_recipe_shape",
    "diffusion_spec",
    "load_recipe",
    "load_texts",
    "quantize",
    "save_atomically",
    "shipped_recipes",
]

__version__ = "0.1.0"
