"""Why a learned R4 lowers its own objective but not the flips: where its error goes.

    python integration/r4_diagnosis.py --out r4-diagnosis [--model DIR] [--seeds 0 1 2]

For the fixed Hadamard R4 (``learn: [R1, R2]``) and a learned R4 of each ``--blocks`` size
(``learn: [R1, R2, R4]``), the learned-rotation recipe runs with W4A4 RTN after it, and each
layer's down projection is measured in full precision (quantization disabled, transforms on):
the int4 per-token error of its rotated input ``x Q``, the int4 group-128 error of its fused
weight ``W Q``, and the error of the W4A4 layer output. Relative squared errors, averaged over
layers, on the calibration states the rotations learned on and on states of held-out text;
each seed calibrates on a different shuffle of the calibration prompts. The mean and spread
over seeds go to ``results.md`` / ``results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random

import torch
from compressed_tensors.quantization import QuantizationArgs, disable_quantization
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from seed_runs import add_seed_run_arguments, results_dir, seed_table  # integration/

from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.models import LM_HEAD
from fair_calib_llmc.stage1.states import build_calibration_dataset
from fair_calib_llmc.stage2.learned_rotations import LearnedSpinQuantModifier
from fair_calib_llmc.stage2.learned_rotations.ste import rtn_qparams

ACTS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="token", dynamic=True)
WEIGHTS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)


def quantized(module, value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    scale, zero_point = rtn_qparams(module, value, args)
    return fake_quantize(value, scale, zero_point, args)


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.pow(2).sum() / reference.pow(2).sum())


def down_projection_errors(model, tokenizer, recipe, states, heldout) -> dict[str, float]:
    """The errors (see the module docstring) on the calibration states the rotations learned
    on (``calibration ...``) and on states of held-out text (``held-out ...``)."""
    model = copy.deepcopy(model)
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=states,
        shuffle_calibration_samples=False,
        batch_size=16,
    )
    learner = recipe[0]
    model.apply(disable_quantization)
    errors = {}
    for split, data in (("calibration", states), ("held-out", heldout)):
        split_errors = _errors(model, learner._down_projections(model), data["input_ids"][:32])
        errors.update({f"{split} {k}": v for k, v in split_errors.items()})
    return errors


def _errors(model, down_projections, token_ids) -> dict[str, float]:
    inputs: dict[torch.nn.Module, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, []).append(args[0]))
        for _, module in down_projections
    ]
    with torch.no_grad():
        for ids in token_ids:
            model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    rows = []
    for module, xs in inputs.items():
        x = torch.cat([t.flatten(0, -2) for t in xs]).float()
        w = module.weight.float()
        xq, wq = quantized(module, x, ACTS), quantized(module, w, WEIGHTS)
        y = x @ w.T
        rows.append(
            {
                "activation": relative(xq - x, x),
                "weight": relative(wq - w, w),
                "output": relative(xq @ wq.T - y, y),
            }
        )
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_seed_run_arguments(parser, calibration_prompts=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 384])
    args = parser.parse_args(argv)
    out = results_dir(args)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    variants = {"fixed Hadamard R4": dict(learn=["R1", "R2"])}
    for block in args.blocks:
        variants[f"learned R4, block {block}"] = dict(learn=["R1", "R2", "R4"], r4_block_size=block)
    results = {name: [] for name in variants}
    heldout, _, _ = build_calibration_dataset(
        model, tokenizer, shipped_texts("heldout"), max_prompts=8, seed=1000
    )
    for seed in args.seeds:
        texts = shipped_texts("calibration")
        random.Random(seed).shuffle(texts)  # each seed calibrates on other prompts
        states, _, _ = build_calibration_dataset(
            model, tokenizer, texts, max_prompts=args.calibration_prompts, seed=seed
        )
        for name, fields in variants.items():
            recipe = [
                LearnedSpinQuantModifier(
                    rotations=["R1", "R2", "R4"], transform_type="random-hadamard", **fields
                ),
                QuantizationModifier(
                    scheme="W4A4_G128_PACKED",
                    targets=["Linear"],
                    ignore=[LM_HEAD],
                ),
            ]
            errors = down_projection_errors(model, tokenizer, recipe, states, heldout)
            errors["objective after learning"] = recipe[0].learning_report["after"]["frontier"]
            results[name].append(errors)
            print(seed, name, errors, flush=True)
    keys = [
        f"{split} {kind}"
        for split in ("calibration", "held-out")
        for kind in ("activation", "output")
    ] + ["calibration weight", "objective after learning"]
    lines = [seed_table("R4", results, {key: key for key in keys})]
    lines.append(
        f"\nDown projections of {args.model}, seeds {args.seeds}: relative squared error of "
        "the int4 per-token input, the W4A4 RTN output and the int4 g128 weight, on the "
        "calibration states learned on and on states of held-out text."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
