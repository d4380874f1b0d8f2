"""Online transforms (rotations) survive ``from_pretrained``: a backport for transformers 5.17.

A checkpoint written by llm-compressor after ``SpinQuantModifier`` / ``QuIPModifier`` carries a
``transform_config`` inside ``quantization_config`` (compressed-tensors' own format). Rotations
that were fused into weights (SpinQuant R1, R2) need nothing at load time, but *online* ones
(SpinQuant R3/R4, QuIP's ``v``) are modules with weights (``*.R4_input.weight``) that run as
forward hooks. compressed-tensors 0.19 already knows how to rebuild them
(``ModelCompressor.from_compression_config`` reads ``transform_config`` and
``apply_transform_config`` attaches them), but transformers 5.17's ``CompressedTensorsConfig``
drops the field while parsing, so the transform weights load as UNEXPECTED keys and the
reloaded model computes something else (measured: docs/results.md, "Online rotations reload
exactly").

:func:`install` fixes exactly that, at the place newer transformers fixes it: the parsed config
keeps ``transform_config`` (and writes it back in ``to_dict``), and the compressed-tensors
quantizer attaches the transforms to the empty model *before* it applies quantization and loads
the weights, the same order llm-compressor used when it wrote the checkpoint (transforms first,
then quantization). The checkpoint format is untouched. When the running transformers already
handles ``transform_config`` itself, nothing is patched.
"""

from __future__ import annotations

import functools

import torch
from compressed_tensors.transform import TransformConfig, apply_transform_config
from compressed_tensors.transform.factory.base import TransformBase
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils.quantization_config import CompressedTensorsConfig

__all__ = ["install"]

_MARK = "_fair_calib_transform_backport"


def _transformers_handles_transforms() -> bool:
    """True where transformers itself parses ``transform_config`` (transformers#42887)."""
    try:
        parsed = CompressedTensorsConfig(transform_config={"config_groups": {}})
    except Exception:  # pragma: no cover - a transformers that rejects unknown kwargs
        return False
    return hasattr(parsed, "transform_config") and not getattr(
        CompressedTensorsConfig.__init__, _MARK, False
    )


def _declare_shared_transform_weights(model) -> None:
    """Tell ``from_pretrained`` which transform weights are one tensor.

    Transforms of equal size share one weight, which the checkpoint stores once (the other
    modules name it in their ``_tied_weights_keys``). transformers ties only what its
    ``all_tied_weights_keys`` lists, computed before the transforms existed; without this the
    shared copies load as MISSING and stay uninitialised.
    """
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        return
    for name, module in model.named_modules():
        for key, source in (getattr(module, "_tied_weights_keys", None) or {}).items():
            if isinstance(module, TransformBase):
                tied[f"{name}.{key}"] = source


def install() -> None:
    """Patch transformers' compressed-tensors config and quantizer (idempotent)."""
    already = getattr(CompressedTensorsConfig.__init__, _MARK, False)
    if already or _transformers_handles_transforms():
        return

    config_init = CompressedTensorsConfig.__init__
    config_to_dict = CompressedTensorsConfig.to_dict
    before_loading = CompressedTensorsHfQuantizer._process_model_before_weight_loading

    @functools.wraps(config_init)
    def __init__(self, *args, transform_config=None, **kwargs):
        config_init(self, *args, **kwargs)
        if not transform_config:  # absent, None or {} (what some writers put there)
            transform_config = None
        elif isinstance(transform_config, dict):
            transform_config = TransformConfig.model_validate(transform_config)
        self.transform_config = transform_config

    @functools.wraps(config_to_dict)
    def to_dict(self):
        output = config_to_dict(self)
        if getattr(self, "transform_config", None) is not None:
            output["transform_config"] = self.transform_config.model_dump()
        return output

    @functools.wraps(before_loading)
    def _process_model_before_weight_loading(self, model, **kwargs):
        transforms = getattr(self.compressor, "transform_config", None)
        if transforms is not None:
            # The model is still on the meta device. Transform weights follow their modules
            # there and are loaded from the checkpoint, but the transforms also build small
            # constants (the Hadamard scale) that nothing loads: those must be real tensors.
            with torch.device("cpu"):
                apply_transform_config(model, transforms)
            _declare_shared_transform_weights(model)
        return before_loading(self, model, **kwargs)

    setattr(__init__, _MARK, True)
    CompressedTensorsConfig.__init__ = __init__
    CompressedTensorsConfig.to_dict = to_dict
    CompressedTensorsHfQuantizer._process_model_before_weight_loading = (
        _process_model_before_weight_loading
    )
