"""fair-calib-llmc: FAIR-Calib W4A4 quantization of diffusion LMs inside llm-compressor.

Importing the package registers the native LLaDA / Dream model classes with transformers.
"""

from fair_calib_llmc.models import (  # noqa: F401  (registers Auto classes)
    DiffusionLMSpec,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    diffusion_spec,
)

__version__ = "0.1.0"
