"""Save/reload check of every offered scheme on the built-in default model.

For each scheme (W4A4_G128_PACKED, W4A4_CHANNEL_PACKED, W4A4, NVFP4) x method (RTN through
``QuantizationModifier``, GPTQ) x dtype, it quantizes with the real ``oneshot``, saves a
compressed checkpoint and reloads it twice:

* ``raw``: no baking, plain ``AutoModel.from_pretrained`` (what transformers users get);
* ``fixed``: :func:`tests.reload_exactness.bake_quantized_weights` before saving and
  :func:`fair_calib_llmc.io.reload.load_quantized` after (what fair_calib_llmc does).

It prints the max abs logit difference of each reload against the in-memory model and exits
non-zero if any ``fixed`` difference is not exactly 0. On CUDA, compressed-tensors quantizes on
save with a Triton kernel (fp32 division); on CPU with torch ops in the weight's dtype, which is
why bf16 RTN ``raw`` rows differ on GPU only.

    python integration/check_reload.py                      # CUDA if present, bf16
    python integration/check_reload.py --device cpu --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModel

from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import load_default_model
from fair_calib_llmc.io.loading import default_device
from fair_calib_llmc.io.reload import load_quantized, probe_logits
from fair_calib_llmc.models import LM_HEAD

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: tests/
from tests.reload_exactness import bake_quantized_weights  # noqa: E402

SCHEMES = ["W4A4_G128_PACKED", "W4A4_CHANNEL_PACKED", "W4A4", "NVFP4"]
METHODS = {"rtn": QuantizationModifier, "gptq": GPTQModifier}
IGNORE = [LM_HEAD]


def _quantized(scheme: str, method: str, dtype: torch.dtype, device: str):
    model, tokenizer = load_default_model(dtype=dtype)
    model = model.to(device)
    data = Dataset.from_dict({"text": shipped_texts("calibration")[:16]})
    recipe = METHODS[method](scheme=scheme, targets=["Linear"], ignore=IGNORE)
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=data,
        max_seq_length=64,
        num_calibration_samples=16,
    )
    return model, tokenizer


def _difference(expected: torch.Tensor, model) -> float:
    return float((probe_logits(model) - expected).abs().max())


def check(scheme: str, method: str, dtype: torch.dtype, device: str, root: Path) -> dict:
    model, tokenizer = _quantized(scheme, method, dtype, device)
    expected = probe_logits(model)
    raw_dir = save_atomically(model, tokenizer, root / f"{scheme}-{method}-raw")
    try:
        plain = AutoModel.from_pretrained(raw_dir, dtype=dtype).to(device).eval()
        raw = _difference(expected, plain)
    except RuntimeError as error:  # e.g. NVFP4 in fp32: weights decompress to bf16
        raw = f"fails: {str(error).splitlines()[0][:60]}"

    model, tokenizer = _quantized(scheme, method, dtype, device)  # fresh: saving compressed it
    baked = bake_quantized_weights(model)
    expected = probe_logits(model)
    fixed_dir = save_atomically(model, tokenizer, root / f"{scheme}-{method}-fixed")
    fixed = _difference(expected, load_quantized(fixed_dir, dtype=dtype, device=device))
    return {"raw": raw, "fixed": fixed, "baked_modules": baked}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)

    from compressed_tensors.utils.triton import HAS_TRITON

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# device {where}, triton quantize kernel: {HAS_TRITON and args.device != 'cpu'}")
    print(f"# torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| scheme | method | dtype | raw reload max abs diff | fixed reload max abs diff |")
    print("|---|---|---|---|---|")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for scheme in args.schemes:
                for method in args.methods:
                    row = check(scheme, method, dtype, args.device, Path(tmp) / dtype_name)
                    failed |= row["fixed"] != 0.0
                    raw = row["raw"] if isinstance(row["raw"], str) else f"{row['raw']:.4g}"
                    print(
                        f"| {scheme} | {method} | {dtype_name} | {raw} | {row['fixed']:.4g} |",
                        flush=True,
                    )
    print("FAILED: a fixed reload is not exact" if failed else "OK: every fixed reload is exact")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
