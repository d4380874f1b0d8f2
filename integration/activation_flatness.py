"""How much outlier structure the linear inputs have left for a learned transform to remove.

    python integration/activation_flatness.py --out activation-flatness [--model DIR]
        [--corpus stdlib|shipped] [--seeds 0 1 2] [--calibration-prompts 64]
        [--scheme W4A4_G128_PACKED]

FlatQuant-class transforms earn their keep by flattening activations: outlier channels and
heavy-tailed tokens make a per-token 4-bit step coarse for every other entry. This measures,
on the decoder's linear inputs grouped as the rotation registry groups them (q/k/v, o,
gate/up, down), over Stage I's calibration rows of both kinds (teacher-forced text, and the
masked-stage states the model sees while decoding):

* the relative error ``||Q(x) - x||^2 / ||x||^2`` of the scheme's activation quantization
  (compressed-tensors' fake quantization of its ``input_activations``), for the input as it is,
  after a full-width random Hadamard rotation (the recipes' R1 on the residual-stream inputs;
  the o input's R2 is per head, so there it is the widest rotation's effect), and for iid
  Gaussian vectors of the same shape: where the rotated inputs are no heavier-tailed than
  that, no outliers are left to remove (a linear map of Gaussian data stays Gaussian; what a
  learned transform can still do is trade activation error against weight error);
* the per-token kurtosis (3 for a Gaussian) as it is and after the rotation, and the largest
  channel's peak over the median channel's.

Mean and half-range over seeds; with the same texts and the default greedy sampler only the
Gaussian draws vary with the seed. Nothing is learned or tuned here.
"""

from __future__ import annotations

import argparse
import json

import torch
from compressed_tensors import match_named_modules
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from seed_runs import add_seed_run_arguments, results_dir, seed_table  # integration/

import fair_calib_llmc.formats.schemes  # noqa: F401 - registers the project's presets
from fair_calib_llmc.io.corpus import chunk_text, shipped_texts, stdlib_split
from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.models.registry import FAMILIES
from fair_calib_llmc.stage1.states import Stage1Settings, build_calibration_dataset
from fair_calib_llmc.stage2.flatquant.online import hadamard_start
from fair_calib_llmc.stage2.learned_rotations.ste import ste_quantize
from fair_calib_llmc.stage2.rotations import spinquant_mapping

INPUTS = {"text": "text", "masked states": "states"}
COLUMNS = {
    "error": "int4 error as is",
    "error_rotated": "after Hadamard",
    "error_gaussian": "Gaussian, same shape",
    "kurtosis": "kurtosis as is",
    "kurtosis_rotated": "after Hadamard",
    "channel_peak": "peak channel / median",
}


def quantization_error(x: torch.Tensor, args) -> float:
    """``||Q(x) - x||^2 / ||x||^2`` with compressed-tensors' fake quantization under ``args``,
    ``x`` as rows of tokens (given to it as one batch: its per-token scales reduce over the
    last dimension of a (batch, tokens, width) activation only)."""
    with torch.no_grad():
        x = x.unsqueeze(0)
        return float((ste_quantize(None, x, args) - x).pow(2).sum() / x.pow(2).sum())


def kurtosis(x: torch.Tensor) -> float:
    """Mean over tokens (rows) of each token's kurtosis over its entries."""
    centred = x - x.mean(-1, keepdim=True)
    return float((centred.pow(4).mean(-1) / centred.pow(2).mean(-1).pow(2)).mean())


def flatness(x: torch.Tensor, args, generator: torch.Generator) -> dict:
    """The module docstring's statistics of one linear's input rows ``x`` (tokens x width)."""
    rotation = hadamard_start(x.shape[-1], "random-hadamard").to(x.dtype)  # the recipes' R1
    rotated = x @ rotation
    gaussian = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    peaks = x.abs().amax(0)
    return {
        "error": quantization_error(x, args),
        "error_rotated": quantization_error(rotated, args),
        "error_gaussian": quantization_error(gaussian, args),
        "kurtosis": kurtosis(x),
        "kurtosis_rotated": kurtosis(rotated),
        "channel_peak": float(peaks.max() / peaks.median()),
    }


def input_groups(model, tokenizer) -> dict[str, list[str]]:
    """The linears of ``model`` by the input they read, from its family's rotation mapping
    (q/k/v share one input: q_proj's stands for the three)."""
    mapping = spinquant_mapping(FAMILIES[diffusion_spec(model, tokenizer).family])
    return {
        "q/k/v": [mapping.attn_q],
        "o": [mapping.attn_o],
        "gate/up": list(mapping.mlp_in),
        "down": list(mapping.mlp_out),
    }


def linear_inputs(model, input_ids: torch.Tensor, groups: dict) -> dict[str, list[torch.Tensor]]:
    """Each group's linear inputs (one tensor of rows per linear) over one forward pass;
    linears of a group that read the same tensor are counted once."""
    captured: dict[str, list[torch.Tensor]] = {group: [] for group in groups}
    seen: set[tuple] = set()  # storages stay alive through the captured views: keys are unique
    hooks = []
    for group, targets in groups.items():
        for _, module in match_named_modules(model, targets):

            def capture(_, inputs, group=group):
                key = (inputs[0].data_ptr(), inputs[0].shape)
                if key not in seen:
                    seen.add(key)
                    captured[group].append(inputs[0].detach().flatten(0, -2))

            hooks.append(module.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def measure(
    model, tokenizer, texts, inputs: str, seed: int, prompts: int, args, groups: dict
) -> dict:
    """Per group of :func:`input_groups`, the statistics averaged over the group's layers,
    for one seed."""
    settings = Stage1Settings(inputs=inputs, prior={"source": "uniform"})
    rows, _, _ = build_calibration_dataset(
        model, tokenizer, texts, settings, max_prompts=prompts, seed=seed
    )
    captured = linear_inputs(model, torch.tensor(rows["input_ids"]), groups)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for group, tensors in captured.items():
        per_layer = [flatness(x, args, generator) for x in tensors]
        out[group] = {key: sum(s[key] for s in per_layer) / len(per_layer) for key in COLUMNS}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_run_arguments(parser, calibration_prompts=64)
    parser.add_argument("--corpus", choices=["stdlib", "shipped"], default="stdlib")
    parser.add_argument("--scheme", default="W4A4_G128_PACKED")
    args = parser.parse_args(argv)
    out = results_dir(args)
    scheme = preset_name_to_scheme(args.scheme, ["Linear"])
    if scheme.input_activations is None:
        parser.error(f"--scheme {args.scheme} quantizes no activations; use a W4A4 scheme")
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    if args.corpus == "stdlib":
        texts = chunk_text(stdlib_split("calibration", recursive=True), 1200)
    else:
        texts = shipped_texts("calibration")
    groups = input_groups(model, tokenizer)
    results: dict[str, list[dict]] = {}
    for label, inputs in INPUTS.items():
        for seed in args.seeds:
            by_group = measure(
                model,
                tokenizer,
                texts,
                inputs,
                seed,
                args.calibration_prompts,
                scheme.input_activations,
                groups,
            )
            for group, stats in by_group.items():
                results.setdefault(f"{label}: {group}", []).append(stats)
    table = seed_table("input: linear group", results, COLUMNS)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}))
    (out / "results.md").write_text(
        f"Activation flatness, {args.model}, {args.scheme}, seeds {args.seeds}\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
