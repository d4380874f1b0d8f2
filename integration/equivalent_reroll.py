"""How much an eps of ``EquivalentRescaleModifier`` re-rolls, and that the function stays.

    python integration/equivalent_reroll.py [--model DIR] [--dtype float32|bfloat16]

For each ``--eps``, the model rescaled (channel scales ``1 + eps z`` in up/down and v/o): the
largest logit difference to the original relative to its largest logit, and for each FP4 /
int4 scheme the share of the down and output projections' quantized codes that changed, RTN
from each tensor's own min / max: their weights, and their inputs on held-out text (one
sequence). (Until commit 4edc5ff it also measured the rotation control
``equivalent_perturbation``, since removed: docs/learned-transforms.md.)
"""

from __future__ import annotations

import argparse
import copy

import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from llmcompressor import oneshot

from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.io.loading import load_model, resolve_dtype
from fair_calib_llmc.stage2.equivalent_modifier import EquivalentRescaleModifier, rescale_pairs
from fair_calib_llmc.stage2.learned_rotations.ste import global_scale_of, rtn_qparams

SCHEMES = ("NVFP4", "MXFP4", "W4A4_G128_PACKED")


def codes(value: torch.Tensor, args) -> torch.Tensor:
    """RTN codes of ``value`` (rows: output channels or tokens) from its own min / max."""
    value = value.float().reshape(-1, value.shape[-1])
    global_scale = global_scale_of(value, args)
    scale, zero_point = rtn_qparams(None, value, args, global_scale)
    return quantize(value, scale, zero_point, args, global_scale=global_scale)


def run(model, ids, names):
    """The model's float32 logits and the inputs of the named layers."""
    inputs = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: inputs.__setitem__(name, args[0].detach())
        )
        for name in names
    ]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    for hook in hooks:
        hook.remove()
    return logits, inputs


def compare(tag, reference, other, ids, names) -> None:
    layers = [name for group in names.values() for name in group]
    logits, inputs = run(reference, ids, layers)
    logits2, inputs2 = run(other, ids, layers)
    rel = ((logits2 - logits).abs().max() / logits.abs().max()).item()
    cells = [tag, f"logits {rel:.1e}"]
    for scheme_name in SCHEMES:
        scheme = preset_name_to_scheme(scheme_name, ["Linear"])
        for role, group in names.items():
            weights = acts = 0.0
            for name in group:
                w1, w2 = (m.get_submodule(name).weight.data for m in (reference, other))
                weights += (codes(w1, scheme.weights) != codes(w2, scheme.weights)).float().mean()
                a1, a2 = inputs[name], inputs2[name]
                acts += (
                    (codes(a1, scheme.input_activations) != codes(a2, scheme.input_activations))
                    .float()
                    .mean()
                )
            cells.append(
                f"{scheme_name} {role} W {weights / len(group):.3f} A {acts / len(group):.3f}"
            )
    print(" | ".join(cells), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
    ids = tokenizer(shipped_texts("heldout")[0], return_tensors="pt").input_ids[:, :256]
    pairs = rescale_pairs(model)
    names = {
        "down": [reader for _, reader, head_dim in pairs if head_dim is None],
        "o": [reader for _, reader, head_dim in pairs if head_dim is not None],
    }
    for eps in args.eps:
        rescaled = copy.deepcopy(model)
        oneshot(model=rescaled, recipe=[EquivalentRescaleModifier(eps=eps)])
        compare(f"rescale eps {eps:g}", model, rescaled, ids, names)


if __name__ == "__main__":
    main()
