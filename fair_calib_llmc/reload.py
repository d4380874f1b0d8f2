"""Exact save/reload of quantized dLLMs: the checkpoint computes what the in-memory model did.

Two mismatches between an in-memory quantized model and its reloaded compressed-tensors
checkpoint exist with compressed-tensors 0.19.0, and this module removes both:

1. **The rounding division runs in two precisions on CUDA.** In memory, a ``FROZEN`` module
   fake-quantizes its full-precision weight on every forward with torch ops in the weight's
   dtype (``x / scale`` in bf16). ``save_pretrained(save_compressed=True)`` quantizes the same
   weight through compressed-tensors' ``_quantize`` dispatch, which on CUDA picks a Triton
   kernel that divides in fp32. In bf16 the two quotients round differently near a half-step
   (0.6% of the int4 codes of the default model), so the checkpoint holds other integers than
   the model that was evaluated. GPTQ-style modifiers write already-quantized weights (codes
   times scale), for which both divisions agree, so only RTN (``QuantizationModifier``) rows
   differed (H100 reference run: max abs logit difference 6.23 on every RTN W4A4 row; reproduced
   on CPU by emulating the fp32 division: 6.56). :func:`bake_quantized_weights` writes
   ``fake_quantize`` computed in fp32 into the weights once after calibration: both divisions
   then land on the same codes on every device, and the codes are the accurate fp32 ones.
2. **FP4 weights decompress to bf16.** compressed-tensors' NVFP4 decompressor unpacks FP4 to
   bf16 whatever the model's dtype (upstream: vllm-project/compressed-tensors #839, reverted in
   #858), so an fp32 model reloaded with plain ``from_pretrained`` fails on its first forward
   (dtype mismatch), and a cast alone is off by bf16 rounding (max abs logit difference 2.2 on
   the default model). :func:`load_quantized` decompresses eagerly and re-quantizes such weights
   in the model's dtype with compressed-tensors' own ``fake_quantize``; the bf16 values are
   within 2**-9 of the FP4 grid point, so this recovers the exact codes and the exact fp32
   product. In bf16 plain ``from_pretrained`` is already exact.

:func:`save_and_verify` does bake -> save -> reload -> compare and fails loudly on any
difference; :func:`reload_logit_difference` only measures.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from torch import nn
from transformers import AutoModel

__all__ = [
    "ReloadMismatchError",
    "bake_quantized_weights",
    "load_quantized",
    "probe_logits",
    "reload_logit_difference",
    "restore_decompressed",
    "save_and_verify",
]


class ReloadMismatchError(RuntimeError):
    """A reloaded checkpoint computes other logits than the model that was saved."""


def _weight_args(module: nn.Module):
    scheme = getattr(module, "quantization_scheme", None)
    return getattr(scheme, "weights", None)


def _fp32_fake_quantize(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    global_scale = getattr(module, "weight_global_scale", None)
    return fake_quantize(
        weight.float(),
        module.weight_scale.float(),
        getattr(module, "weight_zero_point", None),
        _weight_args(module),
        global_scale=None if global_scale is None else global_scale.float(),
    )


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


@torch.no_grad()
def restore_decompressed(model: nn.Module) -> int:
    """Decompress ``model`` now if compressed-tensors left a decompress-on-first-forward hook
    (after loading, and after ``save_pretrained(save_compressed=True)`` of an in-memory model),
    then bring weights that decompressed to another dtype back onto the quantization grid in
    the model's dtype (module docstring, cause 2). Returns the weights fixed."""
    if hasattr(model, "ct_decompress_hook"):
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        compressor = compressor or ModelCompressor.from_pretrained_model(model)
        compressor.decompress_model(model)
    dtype = model.get_input_embeddings().weight.dtype
    fixed = 0
    for module in model.modules():
        if _weight_args(module) is None or not hasattr(module, "weight"):
            continue
        weight = module.weight
        if weight.dtype == dtype:
            continue
        weight.data = _fp32_fake_quantize(module, weight.to(dtype)).to(dtype)
        module.weight_scale.data = module.weight_scale.data.to(dtype)
        fixed += 1
    return fixed


def load_quantized(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
) -> nn.Module:
    """``AutoModel.from_pretrained`` + :func:`restore_decompressed`: exact for every scheme in
    fp32 and bf16, full-precision checkpoints included."""
    model = AutoModel.from_pretrained(Path(path), dtype=dtype).eval()
    restore_decompressed(model)
    return model.to(device) if device is not None else model


@torch.no_grad()
def probe_logits(
    model: nn.Module, length: int = 32, device: torch.device | None = None
) -> torch.Tensor:
    """Float32 logits of a fixed token sequence (ids ``3 .. 3+length``, mod vocabulary), fed
    on ``device`` (default: the first parameter's, which an offloaded model may keep on the
    CPU while it computes on the GPU)."""
    device = device if device is not None else next(model.parameters()).device
    probe = torch.arange(3, 3 + length, device=device)[None] % model.config.vocab_size
    return model(probe).logits.float().cpu()


def reload_logit_difference(expected: torch.Tensor, path: str | os.PathLike, like: nn.Module):
    """Max abs difference between ``expected`` (:func:`probe_logits` of the model before it
    was saved) and the logits of ``load_quantized(path)`` in ``like``'s dtype and device."""
    parameter = like.get_input_embeddings().weight
    reloaded = load_quantized(path, dtype=parameter.dtype, device=parameter.device)
    return float((probe_logits(reloaded) - expected).abs().max())


def save_and_verify(model: nn.Module, tokenizer, output_dir: str | os.PathLike) -> Path:
    """Bake, save atomically, reload and compare; raise :class:`ReloadMismatchError` (leaving
    the checkpoint for inspection) unless the logits are identical. ``model`` stays usable."""
    from fair_calib_llmc.checkpoint import save_atomically

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
