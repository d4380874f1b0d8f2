"""Reload exactness checks used by the tests and ``integration/check_reload.py``; not part of
the package, so they live with the tests (a user's checkpoint is saved by
:func:`fair_calib_llmc.io.checkpoint.save_atomically` and loaded by
:func:`fair_calib_llmc.io.reload.load_quantized`).

:func:`bake_quantized_weights` writes the fp32 fake-quantized weights into the model once
(:mod:`fair_calib_llmc.io.reload`, cause 1); :func:`save_and_verify` does bake -> save ->
reload -> compare and fails loudly on any difference; :func:`reload_logit_difference` only
measures.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationStatus
from torch import nn

from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.io.reload import (
    _fp32_fake_quantize,
    _weight_args,
    load_quantized,
    probe_logits,
    restore_decompressed,
)

__all__ = [
    "ReloadMismatchError",
    "bake_quantized_weights",
    "reload_logit_difference",
    "save_and_verify",
]


class ReloadMismatchError(RuntimeError):
    """A reloaded checkpoint computes other logits than the model that was saved."""


@torch.no_grad()
def bake_quantized_weights(model: nn.Module) -> int:
    """Replace every statically quantized weight by its fp32 fake-quantized value (see the
    module docstring, cause 1). Call once after ``oneshot`` and before saving; idempotent, a
    no-op for fp32 models and for weights GPTQ already wrote. Returns the modules baked."""
    baked = 0
    for module in model.modules():
        args = _weight_args(module)
        status = getattr(module, "quantization_status", None)
        if args is None or args.dynamic or status is None:
            continue
        if status >= QuantizationStatus.COMPRESSED or not hasattr(module, "weight_scale"):
            continue
        weight = module.weight
        weight.data.copy_(_fp32_fake_quantize(module, weight).to(weight.dtype))
        baked += 1
    return baked


def reload_logit_difference(expected: torch.Tensor, path: str | os.PathLike, like: nn.Module):
    """Max abs difference between ``expected`` (:func:`probe_logits` of the model before it
    was saved) and the logits of ``load_quantized(path)`` in ``like``'s dtype and device."""
    parameter = like.get_input_embeddings().weight
    reloaded = load_quantized(path, dtype=parameter.dtype, device=parameter.device)
    return float((probe_logits(reloaded) - expected).abs().max())


def save_and_verify(model: nn.Module, tokenizer, output_dir: str | os.PathLike) -> Path:
    """Bake, save atomically, reload and compare; raise :class:`ReloadMismatchError` (leaving
    the checkpoint for inspection) unless the logits are identical. ``model`` stays usable."""
    bake_quantized_weights(model)
    expected = probe_logits(model)
    path = save_atomically(model, tokenizer, output_dir)
    restore_decompressed(model)
    difference = reload_logit_difference(expected, path, model)
    if difference != 0.0:
        raise ReloadMismatchError(
            f"the checkpoint at {path} reloads with logits up to {difference:.4g} away from the "
            "quantized model that was saved; report the scheme, dtype and device"
        )
    return path
