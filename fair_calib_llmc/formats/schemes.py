"""W4A4 schemes for dLLMs, registered by name with compressed-tensors' presets.

Each scheme is declarative compressed-tensors data (``QuantizationArgs`` fields), so any
llm-compressor modifier (``QuantizationModifier``, ``GPTQModifier``, ``FAIRCalibModifier``)
can name it in a recipe (``scheme: W4A4_G128_PACKED``) once ``fair_calib_llmc`` is imported.
The int4 schemes save as ``pack-quantized`` (int32-packed ``weight_packed``), which the
compressed-tensors loaders in transformers and vLLM read directly. NVFP4 and MXFP4 are
compressed-tensors' own presets (``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` on save).
"""

from __future__ import annotations

from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

__all__ = ["W4A4_SCHEMES", "SUPPORTED_SCHEMES", "register_schemes", "check_scheme_name"]

_INT4_TOKEN_ACTIVATIONS = dict(
    num_bits=4, type="int", symmetric=True, strategy="token", dynamic=True
)
_INT4_G128_WEIGHTS = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)


def _int4_group_activations(group_size: int) -> dict:
    return dict(
        num_bits=4,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=group_size,
        dynamic=True,
    )


W4A4_SCHEMES: dict[str, dict] = {
    # int4 per-output-channel weights, int4 dynamic per-token activations
    "W4A4_CHANNEL_PACKED": dict(
        weights=dict(num_bits=4, type="int", symmetric=True, strategy="channel"),
        input_activations=_INT4_TOKEN_ACTIVATIONS,
        format="pack-quantized",
    ),
    # int4 group-128 weights (compressed-tensors' W4A4 preset), saved packed
    "W4A4_G128_PACKED": dict(
        weights=_INT4_G128_WEIGHTS,
        input_activations=_INT4_TOKEN_ACTIVATIONS,
        format="pack-quantized",
    ),
    # int4 group-128 weights, int4 dynamic activations with one scale per 128 inputs
    "W4A4_G128_AG128_PACKED": dict(
        weights=_INT4_G128_WEIGHTS,
        input_activations=_int4_group_activations(128),
        format="pack-quantized",
    ),
    # the same with one activation scale per 32 inputs
    "W4A4_G128_AG32_PACKED": dict(
        weights=_INT4_G128_WEIGHTS,
        input_activations=_int4_group_activations(32),
        format="pack-quantized",
    ),
}

#: Scheme names FAIR-Calib accepts (ours plus the compressed-tensors presets it was tested on).
SUPPORTED_SCHEMES = (*W4A4_SCHEMES, "W4A4", "NVFP4", "MXFP4")


def register_schemes() -> None:
    """Add :data:`W4A4_SCHEMES` to compressed-tensors' preset table (idempotent)."""
    for name, scheme in W4A4_SCHEMES.items():
        PRESET_SCHEMES.setdefault(name, scheme)


def check_scheme_name(name: str) -> str:
    """Return ``name`` upper-cased, or raise a ValueError listing the supported names."""
    upper = name.upper()
    if upper not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unknown scheme {name!r} for FAIR-Calib; use one of {list(SUPPORTED_SCHEMES)} "
            "(or give explicit config_groups)"
        )
    return upper


register_schemes()
