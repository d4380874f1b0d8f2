"""Block-by-block learning of one decoder layer's transforms (FlatQuant's training loop).

Each layer learns alone, earlier layers already calibrated and frozen:

    min  sum_t w_t || layer_q(x_in,t) - layer_fp(x_fp,t) ||^2 / sum_t w_t

* ``layer_fp(x_fp)``: the full-precision layer on the full-precision stream (the target);
* ``layer_q``: the layer with its transforms and the deployed 4-bit fake quantization of
  every linear's input and weight (:func:`~.transforms.transformed_forward`);
* ``x_in``: the full-precision stream (FlatQuant's choice, ``inputs: fp``) or the stream of
  the already quantized layers before it (``inputs: quantized``);
* ``w_t``: the per-token weight (Stage I's ``loss_mask``) or 1.

The calibration batches are split once: the last ``holdout`` share is never trained on and
reports the objective out of sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from fair_calib_llmc.stage2.flatquant.clipping import project_clip_factors
from fair_calib_llmc.stage2.flatquant.transforms import LayerTransforms
from fair_calib_llmc.stage2.learned_rotations.cayley import cosine_decay

__all__ = [
    "LayerData",
    "capture_first_layer_inputs",
    "layer_output",
    "weighted_mse",
    "split_batches",
    "learn_layer",
]


@dataclass
class LayerData:
    """One layer's calibration data, one entry per batch."""

    inputs: list[torch.Tensor]  # what the learning layer reads
    targets: list[torch.Tensor]  # the full-precision layer's output
    kwargs: list[dict]  # attention mask, position embeddings (the same for every layer)
    weights: list[torch.Tensor]  # (batch, tokens) token weights


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, layer: nn.Module, batches: list[dict]
) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden state and keyword arguments ``layer`` receives for each batch (the model
    runs up to it and stops)."""
    hidden, kwargs = [], []

    def record(_module, args, kw):
        hidden.append(args[0].detach())
        kwargs.append(kw)
        raise _Captured

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            except _Captured:
                continue
    finally:
        handle.remove()
    return hidden, kwargs


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t mean_d (out - target)^2 / sum_t w_t`` in float32."""
    per_token = (out.float() - target.float()).pow(2).mean(-1)
    weights = weights.to(per_token.device, torch.float32)
    return (per_token * weights).sum() / weights.sum().clamp(min=1e-12)


def split_batches(count: int, holdout: float) -> tuple[list[int], list[int]]:
    """Training and held-out batch indices: the last ``round(holdout * count)`` batches (at
    least one when ``holdout > 0`` and there are two or more) are held out."""
    held = round(holdout * count)
    if holdout > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    else:
        held = 0
    return list(range(count - held)), list(range(count - held, count))


@torch.no_grad()
def objective(layer: nn.Module, data: LayerData, indices: list[int]) -> float | None:
    """The mean weighted objective over ``indices`` (None when there are none)."""
    if not indices:
        return None
    losses = [
        weighted_mse(
            layer_output(layer, data.inputs[i], data.kwargs[i]), data.targets[i], data.weights[i]
        )
        for i in indices
    ]
    return float(torch.stack(losses).mean())


def learn_layer(
    layer: nn.Module,
    transforms: LayerTransforms,
    clips: list[torch.Tensor],
    data: LayerData,
    train: list[int],
    held: list[int],
    *,
    epochs: int,
    lr: float,
    clip_lr: float,
) -> dict:
    """Learn ``transforms`` (and the clipping factors ``clips``) of ``layer``, whose linears
    already compute their transformed forward; returns the layer's report. Learned
    activation clipping is dropped at the end (it cannot be written): the report's
    ``written`` objective is the layer as written, without it."""
    before = {"train": objective(layer, data, train), "heldout": objective(layer, data, held)}
    began = time.monotonic()
    steps = epochs * len(train)
    groups = [{"params": list(transforms.parameters()), "lr": lr}]
    if clips:
        groups.append({"params": clips, "lr": clip_lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: cosine_decay(step, max(steps, 1))
    )
    with torch.enable_grad():
        for _ in range(epochs):
            for i in train:
                out = layer_output(layer, data.inputs[i], data.kwargs[i])
                loss = weighted_mse(out, data.targets[i], data.weights[i])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                if clips:
                    project_clip_factors(clips)
    after = {"train": objective(layer, data, train), "heldout": objective(layer, data, held)}
    report = {"before": before, "after": after}
    if transforms.clip_logits is not None:
        report["activation_clip"] = {
            site: float(torch.sigmoid(logit.detach()))
            for site, logit in transforms.clip_logits.items()
        }
        transforms.clip_logits = None
        report["written"] = {
            "train": objective(layer, data, train),
            "heldout": objective(layer, data, held),
        }
    return {
        **report,
        "steps": steps,
        "seconds": time.monotonic() - began,
    }
