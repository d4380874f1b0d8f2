"""Exact save/reload of quantized dLLMs: the checkpoint computes what the in-memory model did.

Two mismatches between an in-memory quantized model and its reloaded compressed-tensors
checkpoint exist with compressed-tensors 0.19.0, and this module removes both:

1. **The rounding division runs in two precisions on CUDA.** In memory, a ``FROZEN`` module
   fake-quantizes its full-precision weight on every forward with torch ops in the weight's
   dtype (``x / scale`` in bf16). ``save_pretrained(save_compressed=True)`` quantizes the same
   weight through compressed-tensors' ``_quantize`` dispatch, which on CUDA picks a Triton
   kernel that divides in fp32. In bf16 the two quotients round differently near a half-step
   (a fraction of a percent of the int4 codes), so the checkpoint holds other integers than
   the model that was evaluated. GPTQ-style modifiers write already-quantized weights (codes
   times scale), for which both divisions agree, so only RTN (``QuantizationModifier``) rows
   differed (on an H100, and on CPU by emulating the fp32 division; docs/formats.md).
   Writing ``fake_quantize`` computed in fp32 into the weights once after calibration
   (``bake_quantized_weights`` in ``tests/reload_exactness.py``, a test and integration
   helper) makes both divisions land on the same codes on every device, the accurate fp32
   ones.
2. **FP4 weights decompress to bf16.** compressed-tensors' NVFP4 decompressor unpacks FP4 to
   bf16 whatever the model's dtype (upstream: vllm-project/compressed-tensors #839, reverted in
   #858), so an fp32 model reloaded with plain ``from_pretrained`` fails on its first forward
   (dtype mismatch), and a cast alone is off by bf16 rounding. :func:`load_quantized`
   decompresses eagerly and re-quantizes such weights in the model's dtype with
   compressed-tensors' own ``fake_quantize``; the bf16 values are within 2**-9 of the FP4 grid
   point, so this recovers the exact codes and the exact fp32 product. In bf16 plain
   ``from_pretrained`` is already exact.

Decompressing also converts the model to compressed-tensors offloading (``decompress_model``
calls ``from_accelerate``), whose caches keep every tensor on the device it was on and move
each input there: ``.to("cuda")`` afterwards is silently a no-op and the model computes on the
CPU (seen on an H200: every benchmark row failed with CPU/CUDA device errors).
:func:`restore_decompressed` undoes that dispatch for a model that was on one device, so the
result is a plain module again.

The checks that bake, save, reload and compare (``save_and_verify``, ``reload_logit_difference``)
live with the tests and integration scripts that use them: ``tests/reload_exactness.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.offload import OffloadCache, remove_dispatch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from torch import nn
from transformers import AutoModel

__all__ = ["load_quantized", "probe_logits", "restore_decompressed"]


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


def _on_one_device(model: nn.Module) -> bool:
    """Whether ``model`` is neither offloaded by compressed-tensors nor spread over devices
    by an accelerate device map (then an offload added while decompressing can go again)."""
    if any(isinstance(m._parameters, OffloadCache) for m in model.modules()):
        return False
    device_map = getattr(model, "hf_device_map", None) or {}
    return len({str(device) for device in device_map.values()}) <= 1


@torch.no_grad()
def restore_decompressed(model: nn.Module) -> int:
    """Decompress ``model`` now if compressed-tensors left a decompress-on-first-forward hook
    (after loading, and after ``save_pretrained(save_compressed=True)`` of an in-memory model),
    then bring weights that decompressed to another dtype back onto the quantization grid in
    the model's dtype (module docstring, cause 2). Returns the weights fixed."""
    if hasattr(model, "ct_decompress_hook"):
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        compressor = compressor or ModelCompressor.from_pretrained_model(model)
        on_one_device = _on_one_device(model)
        compressor.decompress_model(model)
        if on_one_device:  # the dispatch came from decompress_model alone (module docstring)
            remove_dispatch(model, onload_tensors=True)
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
    fp32 and bf16, full-precision checkpoints included. The model moves to ``device`` before
    it is decompressed, so the decompression runs where the model will."""
    model = AutoModel.from_pretrained(Path(path), dtype=dtype).eval()
    if device is not None:
        model.to(device)
    restore_decompressed(model)
    return model


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
