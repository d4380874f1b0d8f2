"""Exact reload of every offered scheme on the built-in default model (CPU, fp32 and bf16),
including the two causes of inexact reloads that fair_calib_llmc.io.reload removes."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.offload import OffloadCache
from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
from compressed_tensors.utils.impl_backend import ImplBackend
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModel

from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import load_default_model
from fair_calib_llmc.io.reload import load_quantized, probe_logits
from fair_calib_llmc.models.configs import LM_HEAD

from .reload_exactness import (
    ReloadMismatchError,
    bake_quantized_weights,
    reload_logit_difference,
    save_and_verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

IGNORE = [LM_HEAD]


def _rtn(scheme: str, dtype: torch.dtype):
    """RTN through the real oneshot; NVFP4's static activation global scale needs data."""
    model, tokenizer = load_default_model(dtype=dtype)
    data = {}
    if scheme == "NVFP4":
        texts = shipped_texts("calibration")[:4]
        data = dict(dataset=Dataset.from_dict({"text": texts}), max_seq_length=32)
    recipe = QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=IGNORE)
    return oneshot(model=model, processor=tokenizer, recipe=recipe, **data), tokenizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["W4A4_G128_PACKED", "W4A4_CHANNEL_PACKED", "W4A4", "NVFP4"])
def test_every_scheme_reloads_exactly(scheme, dtype, tmp_path):
    model, tokenizer = _rtn(scheme, dtype)
    bake_quantized_weights(model)
    expected = probe_logits(model)
    path = save_and_verify(model, tokenizer, tmp_path / "q")  # raises on any difference
    assert torch.equal(probe_logits(model), expected)  # still usable after saving
    if scheme != "NVFP4" or dtype == torch.bfloat16:  # plain transformers is exact here too
        plain = AutoModel.from_pretrained(path, dtype=dtype).eval()
        assert torch.equal(probe_logits(plain), expected)


def test_nvfp4_in_fp32_needs_the_requantizing_loader(tmp_path):
    """compressed-tensors 0.19.0 unpacks FP4 to bf16 whatever the model dtype."""
    model, tokenizer = _rtn("NVFP4", torch.float32)
    expected = probe_logits(model)
    path = save_atomically(model, tokenizer, tmp_path / "q")
    plain = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="dtype"):
        probe_logits(plain)
    assert plain.model.transformer.blocks[0].q_proj.weight.dtype == torch.bfloat16
    fixed = load_quantized(path, dtype=torch.float32)
    assert fixed.model.transformer.blocks[0].q_proj.weight.dtype == torch.float32
    assert torch.equal(probe_logits(fixed), expected)


def test_a_reloaded_checkpoint_is_a_plain_module_that_moves(tmp_path):
    """Decompressing dispatches the model to compressed-tensors offloading, whose caches keep
    tensors where they are: without undoing it, ``.to("cuda")`` left a reloaded model on the
    CPU (H200 benchmark, 2026-12-01). ``meta`` stands in for the GPU here."""
    model, tokenizer = _rtn("W4A4_G128_PACKED", torch.float32)
    path = save_atomically(model, tokenizer, tmp_path / "q")
    reloaded = load_quantized(path, dtype=torch.float32)
    assert not any(isinstance(m._parameters, OffloadCache) for m in reloaded.modules())
    reloaded.to("meta")
    assert {p.device.type for p in reloaded.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_checkpoint_reloaded_onto_the_gpu_computes_there(tmp_path):
    model, tokenizer = _rtn("W4A4_G128_PACKED", torch.bfloat16)
    path = save_atomically(model, tokenizer, tmp_path / "q")
    reloaded = load_quantized(path, dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in reloaded.parameters()} == {"cuda"}
    logits = reloaded(torch.arange(3, 35, device="cuda")[None]).logits
    assert logits.device.type == "cuda"


def _quantize_dividing_in_fp32(x, scale, zero_point, q_min, q_max, args, dtype=None, **kw):
    """compressed-tensors' CUDA (Triton) ``_quantize`` math on CPU: the quotient in fp32."""
    global_scale = kw.get("global_scale")
    scale = scale.float() if global_scale is None else scale.float() / global_scale.float()
    scaled = x.float() / scale
    if zero_point is not None:
        scaled = scaled + zero_point.float()
    codes = round_to_quantized_type_args(tensor=scaled, args=args, min=q_min, max=q_max)
    return codes if dtype is None else codes.to(dtype)


@pytest.fixture
def save_quantizes_like_cuda(monkeypatch):
    backends = [(_quantize_dividing_in_fp32, lambda *a, **k: True, -1)]
    monkeypatch.setitem(ImplBackend._backends, "_quantize", backends)


def test_bf16_rtn_reload_differs_as_on_cuda_unless_baked(save_quantizes_like_cuda, tmp_path):
    model, tokenizer = _rtn("W4A4_G128_PACKED", torch.bfloat16)
    expected = probe_logits(model)
    path = save_atomically(model, tokenizer, tmp_path / "raw")
    assert reload_logit_difference(expected, path, model) > 1.0  # the H100 run saw 6.23

    model, tokenizer = _rtn("W4A4_G128_PACKED", torch.bfloat16)
    assert bake_quantized_weights(model) == 4 * 7  # every quantized linear of 4 blocks
    expected = probe_logits(model)
    path = save_atomically(model, tokenizer, tmp_path / "baked")
    assert reload_logit_difference(expected, path, model) == 0.0


def test_a_mismatch_fails_loudly(save_quantizes_like_cuda, monkeypatch, tmp_path):
    from . import reload_exactness

    model, tokenizer = _rtn("W4A4_G128_PACKED", torch.bfloat16)
    monkeypatch.setattr(reload_exactness, "bake_quantized_weights", lambda model: 0)
    with pytest.raises(ReloadMismatchError, match="reloads with logits up to"):
        save_and_verify(model, tokenizer, tmp_path / "q")


def test_baking_is_idempotent_and_a_no_op_in_fp32():
    model, _ = _rtn("W4A4_G128_PACKED", torch.float32)
    before = probe_logits(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight")}
    bake_quantized_weights(model)
    assert torch.equal(probe_logits(model), before)  # fake-quant of a grid point is itself
    model_bf16, _ = _rtn("W4A4_G128_PACKED", torch.bfloat16)
    bake_quantized_weights(model_bf16)
    once = {n: p.clone() for n, p in model_bf16.named_parameters()}
    bake_quantized_weights(model_bf16)
    assert all(torch.equal(p, once[n]) for n, p in model_bf16.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
