"""``fair-calib-llmc diagnose --model DIR``: where 4-bit quantization hurts this dLLM, before
a method is picked.

Round-to-nearest, data-free variants of the full-precision model (in memory, nothing saved):
weights only (W4A16), input activations only (W16A4: e.g. int4 dynamic per-token), both (W4A4),
each without and with rotations (SpinQuant R1 + R2 fused, R4 online, random Hadamard), plus a
per-layer scan that quantizes one decoder layer at a time W4A4. Each variant replays the FP
teacher's rollouts (frontier flip rate, mismatch, KL) over several seeds. RTN with no
calibration data measures the format's sensitivity, not a calibration method's; a scheme whose
activations have a scale only data can set (NVFP4's global scale) gets it from 16 calibration
texts (the shipped calibration split, or the user's ``--dataset``).

Written to ``--out`` (default ``outputs/diagnose-<model dir name>``): ``results.json``,
``results.md`` (variants table + per-layer table), ``flips_per_step.png`` and
``flips_per_position.png`` (one panel per precision, without and with rotations, averaged over
seeds) and
``layer_sensitivity.png`` (flip rate with one layer W4A4, mean and range over seeds). The
output directory is checked before any work, with ``quantize``'s rules: a non-empty one needs
``--overwrite``, and none inside the model directory is accepted.

Library use: :func:`diagnose_model`. CLI: :func:`run` (the arguments are defined in
``fair_calib_llmc_cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from loguru import logger
from torch import nn

from fair_calib_llmc.evaluation.compare import (
    settings_from_args,
)
from fair_calib_llmc.evaluation.decisions import (
    DecisionSettings,
    EvaluationContext,
    load_checkpoint,
)
from fair_calib_llmc.evaluation.plots import flip_curves, plot_layer_sensitivity
from fair_calib_llmc.evaluation.report import markdown_table, summarise, write_results
from fair_calib_llmc.formats.schemes import check_scheme_name
from fair_calib_llmc.io.corpus import shipped_texts
from fair_calib_llmc.io.data import load_texts
from fair_calib_llmc.io.loading import default_device, resolve_dtype
from fair_calib_llmc.io.output_dir import check_results_dir
from fair_calib_llmc.io.output_lock import output_lock
from fair_calib_llmc.models.configs import LM_HEADS
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.sampling.samplers import progress
from fair_calib_llmc.stage2.learned_rotations import ExactSpinQuantModifier

__all__ = ["diagnose_model", "variant_schemes", "layer_linears", "refuse_quantized", "run"]

ROTATIONS = dict(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")


#: texts that calibrate static activation scales (NVFP4's global scale), one state each
CALIBRATION_TEXTS = 16


def variant_schemes(scheme: str = "W4A4_G128_PACKED") -> dict[str, QuantizationScheme]:
    """W4A16 / W16A4 / W4A4 from one W4A4 preset: its weights, its input activations, both."""
    preset = PRESET_SCHEMES[check_scheme_name(scheme)]
    weights = QuantizationArgs.model_validate(preset["weights"])
    activations = QuantizationArgs.model_validate(preset["input_activations"])
    linear = ["Linear"]
    return {
        "W4A16": QuantizationScheme(targets=linear, weights=weights),
        "W16A4": QuantizationScheme(targets=linear, input_activations=activations),
        "W4A4": QuantizationScheme(targets=linear, weights=weights, input_activations=activations),
    }


def layer_linears(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(layer name, [its Linear module names])]`` of the decoder stack
    (:func:`~fair_calib_llmc.models.layers.named_decoder_layers`: LLaDA's ``blocks``, Dream's
    ``layers``)."""
    layers = [
        (
            name,
            [
                f"{name}.{sub}"
                for sub, child in layer.named_modules()
                if isinstance(child, nn.Linear)
            ],
        )
        for name, layer in named_decoder_layers(model)
    ]
    if not all(linears for _, linears in layers):
        raise ValueError(f"{type(model).__name__} has decoder layers without Linears")
    return layers


def needs_calibration(scheme: QuantizationScheme) -> bool:
    """Whether ``scheme``'s activations have a scale that data must set (static scales, or
    NVFP4's global scale over dynamic block scales): RTN alone would leave it at its start."""
    activations = scheme.input_activations
    return activations is not None and activations.dynamic is not True


def _quantized(
    model_dir, dtype, device, scheme: QuantizationScheme, rotate: bool, calibration=None
) -> nn.Module:
    """A fresh copy of the FP model, RTN-quantized in memory: data-free ``oneshot``, or with
    ``calibration`` texts where the activations need calibrated scales."""
    model, tokenizer, _ = load_checkpoint(model_dir, dtype=dtype, device=device)
    recipe = [ExactSpinQuantModifier(**ROTATIONS)] if rotate else []
    recipe.append(QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(LM_HEADS)))
    if not needs_calibration(scheme):
        return oneshot(model=model, recipe=recipe)
    dataset = Dataset.from_dict({"text": list(calibration)[:CALIBRATION_TEXTS]})
    return oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=len(dataset),
        max_seq_length=128,
    )


def variant_styles(names) -> dict[str, dict]:
    """The same two styles in every precision's panel (:func:`variant_panels`): solid without
    rotations, dashed with them."""
    styles = {}
    for name in names:
        styles[name] = {"color": "#dd8452"}
        styles[f"{name} + rotations"] = {"color": "#4c72b0", "linestyle": "--", "marker": "x"}
    return styles


def variant_panels(names) -> dict[str, list[str]]:
    """One plot panel per precision holding it without and with rotations: the comparison
    diagnose is for, without the other precisions' lines and bands on top."""
    return {name: [name, f"{name} + rotations"] for name in names}


def _only(targets: list[str], scheme: QuantizationScheme) -> QuantizationScheme:
    exact = [f"re:^{re.escape(name)}$" for name in targets]
    return scheme.model_copy(update={"targets": exact})


def diagnose_model(
    model_dir: str | os.PathLike,
    texts: list[str] | None = None,
    settings: DecisionSettings = DecisionSettings(),
    *,
    scheme: str = "W4A4_G128_PACKED",
    rotations: bool = True,
    layer_scan: bool = True,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
) -> dict:
    """Run the variants and the per-layer scan; write and return the results.

    :param overwrite: write over the results files of a non-empty ``out_dir``
    """
    model_dir = Path(model_dir)
    refuse_quantized(model_dir)
    out_dir = check_results_dir(
        out_dir or Path("outputs") / f"diagnose-{model_dir.name}",
        {"the model's own directory": model_dir},
        overwrite=overwrite,
    )
    schemes = variant_schemes(scheme)  # an unknown scheme fails here, before any work
    device = device or default_device()
    # static activation scales (NVFP4's global scale) come from the shipped calibration text,
    # or from the user's own texts when given
    calibration = shipped_texts("calibration") if texts is None else texts
    texts = texts if texts is not None else shipped_texts("heldout")
    with output_lock(out_dir):  # a second run into out_dir fails now, not at the end
        start = time.monotonic()
        teacher, tokenizer, spec = load_checkpoint(model_dir, dtype=dtype, device=device)
        dtype = teacher.get_input_embeddings().weight.dtype
        context = EvaluationContext.build(teacher, tokenizer, texts, settings, spec=spec)
        rollouts = context.rollouts

        rows = []
        plan = [(name, False) for name in schemes]
        plan += [(name, True) for name in schemes] if rotations else []
        for name, rotate in progress(plan, desc="diagnose variants"):
            label = f"{name} + rotations" if rotate else name
            student = _quantized(model_dir, dtype, device, schemes[name], rotate, calibration)
            rows += context.student_rows(label, student, precision=name, rotations=rotate)
            del student

        layer_rows = []
        if layer_scan:
            for layer, linears in progress(layer_linears(teacher), desc="per-layer W4A4 scan"):
                student = _quantized(
                    model_dir, dtype, device, _only(linears, schemes["W4A4"]), False, calibration
                )
                layer_rows += context.student_rows(layer, student, elbo=False)
                del student

        calibrated = (
            f"activation scales calibrated on {min(len(calibration), CALIBRATION_TEXTS)} texts"
            if needs_calibration(schemes["W16A4"])
            else "data-free"
        )
        variants = summarise(rows)
        layers = summarise(layer_rows)
        table = markdown_table(variants)
        layer_metrics = ("frontier_flip_rate", "post_commit_mismatch", "kl_frontier")
        layer_table = markdown_table(layers, metrics=layer_metrics) if layers else ""
        markdown = (
            f"## Variants (RTN, {calibrated}; {scheme})\n\n{table}\n\n"
            + (f"## One decoder layer W4A4 at a time\n\n{layer_table}\n\n" if layer_table else "")
            + f"model `{model_dir}`; seeds {list(settings.seeds)}, "
            f"{len(rollouts[0].prompts)} prompts x {settings.gen_length} tokens per seed; "
            + _teacher_ppl(rollouts)
            + f"{dtype}, {device}; {time.monotonic() - start:.0f} s"
        )
        payload = {
            "model": str(model_dir),
            "scheme": scheme,
            "rotations": ROTATIONS if rotations else None,
            "settings": settings,
            "dtype": dtype,
            "teacher_elbo_ppl": [r.teacher_elbo_ppl for r in rollouts],
            "rows": rows,
            "layer_rows": layer_rows,
            "summary": variants,
            "layer_summary": layers,
        }
        curves = flip_curves(rows, variant_styles(schemes), variant_panels(schemes))
        files = write_results(out_dir, payload, markdown, curves, overwrite=overwrite)
        if layer_rows:
            path = out_dir / "layer_sensitivity.png"
            files[path.name] = plot_layer_sensitivity(layer_rows, rows, path)
        logger.info(f"diagnose: wrote {', '.join(files)} to {out_dir}")
        return {"rows": rows, "layer_rows": layer_rows, "markdown": markdown, "files": files}


def refuse_quantized(model_dir: Path) -> None:
    """Diagnose quantizes the full-precision model; a checkpoint that is quantized already
    (``quantization_config`` in its ``config.json``) would be quantized twice and compared
    with itself as teacher, for minutes of meaningless numbers."""
    config = model_dir / "config.json"
    if not config.is_file():
        return  # load_checkpoint says what is missing
    try:
        quantized = "quantization_config" in json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return  # load_checkpoint reports a broken config
    if quantized:
        raise ValueError(
            f"{model_dir} is already quantized (its config.json has a quantization_config); "
            "diagnose needs the full-precision model: pass the directory it was quantized "
            "from (fair-calib-llmc evaluate compares a quantized checkpoint with it)"
        )


def _teacher_ppl(rollouts) -> str:
    values = [r.teacher_elbo_ppl for r in rollouts if r.teacher_elbo_ppl is not None]
    return f"teacher ELBO ppl {sum(values) / len(values):.4g}; " if values else ""


def run(args: argparse.Namespace) -> dict:
    texts = load_texts(args.dataset) if args.dataset else None
    result = diagnose_model(
        args.model,
        texts,
        settings_from_args(args),
        scheme=args.scheme,
        rotations=not args.no_rotations,
        layer_scan=not args.no_layer_scan,
        out_dir=args.out,
        overwrite=args.overwrite,
        dtype=resolve_dtype(args.dtype),
        device=args.device,
    )
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"].values()))
    return result
