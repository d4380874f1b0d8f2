"""The learner of ``LearnedSpinQuantModifier``: its training loop, its report, and the context
managers the loop runs under.

Kept apart from the modifier's lifecycle (:mod:`.base`), as llm-compressor keeps GPTQ's
``gptq_quantize.py`` apart from its ``base.py``: the lifecycle checks the settings and the data,
hands over the model (Hadamards fused), the quantized layers to learn against and the
calibration batches, and fuses what comes back. Here:

1. the full-precision teacher runs once on every batch: its layer outputs (``layer_mse``) or
   masked-position log-probabilities (``output_kl``), kept in host memory;
2. every quantized linear's forward is swapped for its rotated, fake-quantized training forward
   (:func:`~fair_calib_llmc.stage2.learned_rotations.rotated_linear.rotated_forward`), the
   model's own parameters frozen and, with ``gradient_checkpointing``, each decoder layer
   recomputed in the backward pass;
3. :class:`~fair_calib_llmc.stage2.learned_rotations.cayley.CayleyAdam` takes ``steps`` steps,
   one batch each (cycling); under ``torchrun`` the gradients are averaged over ranks.

The report gives the objective under frontier and under uniform weights before and after
learning, how far each rotation moved, and the time taken.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from compressed_tensors import match_named_modules
from compressed_tensors.utils import get_head_dim
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from fair_calib_llmc.distributed import all_reduce_sum, rank_and_world
from fair_calib_llmc.models.family import DiffusionLMSpec
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.stage2.learned_rotations.cayley import CayleyAdam, distance_moved
from fair_calib_llmc.stage2.learned_rotations.objectives import (
    layer_mse,
    masked_log_probs,
    output_kl,
)
from fair_calib_llmc.stage2.learned_rotations.rotated_linear import (
    RotationSites,
    rotated_forward,
)
from fair_calib_llmc.stage2.learning import forwards_replaced, frozen, token_weights_of

__all__ = ["LearningSettings", "LearnedRotations", "learn_rotations", "rotation_sites"]


@dataclass(frozen=True)
class LearningSettings:
    """What the loop needs of ``LearnedSpinQuantModifier``'s fields (documented there)."""

    learn: tuple[str, ...]
    objective: str
    token_weights: str
    steps: int
    lr: float
    gradient_checkpointing: bool


@dataclass
class LearnedRotations:
    """What learning returns: the rotations (``R1``: one matrix or ``None``; ``R2``: one per
    attention block or ``None``), the modules each acts on, and the report."""

    rotations: dict
    sites: dict[nn.Module, RotationSites]
    report: dict


def rotation_sites(
    model: nn.Module, mappings, r1: torch.Tensor | None, r2: list[torch.Tensor] | None
) -> dict[nn.Module, RotationSites]:
    """Every module an R1 (one matrix) or per-layer R2 (one per attention block) acts on,
    found through SpinQuant's own mapping of the model (``SpinQuantModifier.mappings``)."""
    sites: dict[nn.Module, RotationSites] = defaultdict(RotationSites)
    if r1 is not None:
        writers = [mappings.embedding, mappings.attn_o, *mappings.mlp_out]
        readers = [mappings.attn_q, mappings.attn_k, mappings.attn_v, *mappings.mlp_in]
        for _, module in match_named_modules(model, writers):
            sites[module].q_out = r1
        for _, module in match_named_modules(model, [*readers, mappings.lm_head]):
            sites[module].q_in = r1
    if r2 is not None:
        blocks = [m for _, m in match_named_modules(model, [mappings.attn])]
        if len(blocks) != len(r2):
            raise ValueError(f"{len(r2)} R2 rotations for {len(blocks)} attention blocks")
        for block, q in zip(blocks, r2, strict=True):
            for _, module in match_named_modules(block, [mappings.attn_v]):
                sites[module].q_out = q
            for _, module in match_named_modules(block, [mappings.attn_o]):
                sites[module].q_in = q
    return dict(sites)


def learn_rotations(
    model: nn.Module,
    mappings,
    quantized: dict[nn.Module, tuple],
    dataloader,
    spec: DiffusionLMSpec,
    settings: LearningSettings,
) -> LearnedRotations:
    """Learn the rotations ``settings.learn`` names (see the module docstring); the model's
    weights are left as they are (the caller fuses the result).

    :param mappings: SpinQuant's mapping of the model (where R1 and R2 act)
    :param quantized: each quantized linear's (activation args, weight args) to learn
        against (:func:`~fair_calib_llmc.stage2.learning.learnable_linears`)
    """
    device = next(model.parameters()).device
    r1 = _identity(model.config.hidden_size, device) if "R1" in settings.learn else None
    r2 = None
    if "R2" in settings.learn:
        blocks = list(match_named_modules(model, [mappings.attn]))
        r2 = [_identity(get_head_dim(model.config), device) for _ in blocks]
    sites = rotation_sites(model, mappings, r1, r2)
    params = [q for q in [r1, *(r2 or [])] if q is not None]

    began = time.monotonic()
    batches = [_batch(b, device) for b in dataloader]
    with torch.no_grad():  # kept in host memory: every layer of every batch (GBs at 8B)
        targets = [_moved(_teacher(model, b, settings, spec), "cpu") for b in batches]
    layers = [m for _, m in named_decoder_layers(model)] if settings.gradient_checkpointing else []
    with _training_forwards(quantized, sites), frozen(model), _checkpointed(layers):
        before = _objectives_by_weighting(model, batches, targets, settings, spec)
        optimise_began = time.monotonic()
        _optimise(model, params, batches, targets, settings, spec)
        optimise_seconds = time.monotonic() - optimise_began
        after = _objectives_by_weighting(model, batches, targets, settings, spec)
    report = {
        "objective": settings.objective,
        "token_weights": settings.token_weights,
        "before": before,
        "after": after,
        # RMS entry of what learning added: R1 / R2 start at I on top of the fused Hadamards
        "rotation_moved": {
            name: sum(distance_moved(q) for q in qs) / len(qs)
            for name, qs in (("R1", [r1] if r1 is not None else []), ("R2", r2 or []))
            if qs
        },
        "seconds": time.monotonic() - began,  # teacher targets, learning, both reports
        # the optimiser's steps alone: what grows with `steps` (cost at other settings)
        "steps": settings.steps,
        "optimise_seconds": optimise_seconds,
    }
    logger.info(
        f"learned {'+'.join(settings.learn)} ({settings.objective}, {settings.token_weights} "
        f"weights, {settings.steps} steps): objective under frontier weights "
        f"{before['frontier']:.5g} -> {after['frontier']:.5g}, under uniform weights "
        f"{before['uniform']:.5g} -> {after['uniform']:.5g}"
    )
    return LearnedRotations({"R1": r1, "R2": r2}, sites, report)


def _optimise(model, params: list[torch.Tensor], batches, targets, settings, spec) -> None:
    """``steps`` Cayley-Adam steps, one calibration batch each (cycling), with a progress bar;
    under torchrun the gradients are averaged so every rank fuses the same rotations."""
    optimiser = CayleyAdam(params, lr=settings.lr, total_steps=settings.steps)
    _, world = rank_and_world()
    bar = tqdm(range(settings.steps), desc="learning rotations", unit="step")
    for step in bar:
        index = step % len(batches)
        with torch.enable_grad():
            loss = _objective(model, batches[index], targets[index], settings, spec)
            loss.backward()
        if world > 1:
            grads = [q.grad for q in params if q.grad is not None]
            all_reduce_sum(grads)
            for g in grads:
                g.div_(world)
        optimiser.step()
        optimiser.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4g}")


def _identity(size: int, device) -> torch.Tensor:
    return torch.eye(size, dtype=torch.float32, device=device).requires_grad_(True)


def _batch(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in ("input_ids", "loss_mask") if k in batch}


def _teacher(model: nn.Module, batch: dict, settings, spec) -> list[torch.Tensor] | torch.Tensor:
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    if settings.objective == "layer_mse":
        return [h.detach() for h in out.hidden_states[1:]]
    return masked_log_probs(out.logits, batch["input_ids"], spec)


def _objective(
    model: nn.Module, batch: dict, target, settings, spec, token_weights: str | None = None
) -> torch.Tensor:
    weights = token_weights_of(batch, token_weights or settings.token_weights)
    target = _moved(target, batch["input_ids"].device)
    if settings.objective == "layer_mse":
        out = model(input_ids=batch["input_ids"], output_hidden_states=True)
        return layer_mse(out.hidden_states[1:], target, weights)
    out = model(input_ids=batch["input_ids"])
    return output_kl(out.logits, target, batch["input_ids"], weights, spec)


@torch.no_grad()
def _objectives_by_weighting(model, batches, targets, settings, spec) -> dict[str, float]:
    """The objective over all batches under frontier and under uniform weights: where the two
    disagree is where the frontier prior can matter."""
    return {
        weighting: float(
            torch.stack(
                [
                    _objective(model, b, t, settings, spec, weighting)
                    for b, t in zip(batches, targets, strict=True)
                ]
            ).mean()
        )
        for weighting in ("frontier", "uniform")
    }


def _moved(target, device):
    """A teacher target (one tensor, or one per layer) on ``device``."""
    if isinstance(target, list):
        return [t.to(device) for t in target]
    return target.to(device)


def _training_forwards(quantized: dict, sites: dict) -> forwards_replaced:
    """Every quantized linear's forward swapped for its rotated, fake-quantized training
    forward (:func:`rotated_forward`)."""
    return forwards_replaced(
        {
            module: rotated_forward(module, sites.get(module, RotationSites()), acts, weights)
            for module, (acts, weights) in quantized.items()
        }
    )


def _checkpointed(layers: list[nn.Module]) -> forwards_replaced:
    """Gradient checkpointing of ``layers`` while learning: each layer's forward runs under
    ``torch.utils.checkpoint`` (recomputed in the backward pass, activations not kept), so
    the memory of the backward pass is one layer's instead of the whole model's."""

    def checkpointed(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    return forwards_replaced({layer: checkpointed(layer.forward) for layer in layers})
