"""Rotation modifiers for LLaDA and Dream: exact SpinQuant rotations, and learned ones.

``ExactSpinQuantModifier`` is llm-compressor's ``SpinQuantModifier`` whose rotated
full-precision model computes what the original computes. Upstream always mean-centres the
embedding rows before it rotates, which keeps the function only under LayerNorm (which
subtracts the mean anyway); LLaDA and Dream use RMSNorm, where centring changes every hidden
state (and the logits with it). Here the embeddings are centred only when a fused norm is a
LayerNorm.

``LearnedSpinQuantModifier`` learns R1 (the residual stream) and a per-layer R2 (each head's
values) on top of the Hadamard start, the SpinQuant class of method, with the Stage I
calibration states and their frontier weights: llm-compressor 0.14 rejects
``SpinQuantModifier(learnable=True)``. Learning runs at ``on_calibration_start``, after the
Hadamards are fused and before the quantization modifier after it calibrates:

1. the full-precision teacher (the Hadamard-rotated model, exact by the above) runs once on
   every calibration batch: its layer outputs (``layer_mse``) or masked-position output
   distributions (``output_kl``);
2. every quantized linear layer computes its rotated, fake-quantized forward with the scheme
   the next modifier will deploy (:mod:`~fair_calib_llmc.stage2.learned_rotations.rotated_linear`),
   and :class:`~fair_calib_llmc.stage2.learned_rotations.cayley.CayleyAdam` moves the rotations on
   the orthogonal group, ``steps`` times (steps 1 and 2 are the learner,
   :mod:`~fair_calib_llmc.stage2.learned_rotations.learner`);
3. the rotations are fused into the weights (embedding, every reader and writer, the LM head).

This module is the lifecycle: fields, the settings refused before any work, the events.

R4 (the down-projection input, behind ``act(gate) * up``) stays the fixed online Hadamard: no
weight can absorb a rotation there. The checkpoint holds ordinary weights plus that online R4,
as a plain rotated recipe's: no new inference op, nothing of this package needed to load it.
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.transform.spinquant import SpinQuantModifier
from pydantic import Field, PrivateAttr, model_validator
from torch import nn

from fair_calib_llmc.distributed import shared_weights_written_once
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.stage2.learned_rotations.learner import LearningSettings, learn_rotations
from fair_calib_llmc.stage2.learned_rotations.rotated_linear import fuse_rotation
from fair_calib_llmc.stage2.learning import check_learning_data, learnable_linears

__all__ = ["ExactSpinQuantModifier", "LearnedSpinQuantModifier"]

LEARNABLE_ROTATIONS = ("R1", "R2")


class ExactSpinQuantModifier(SpinQuantModifier):
    """``SpinQuantModifier`` that keeps an RMSNorm model's function (see the module docstring).

    Sample yaml::

        rotate_stage:
          rotate_modifiers:
            ExactSpinQuantModifier:
              rotations: [R1, R2, R4]
              transform_type: random-hadamard

    :param r4_transform_type: the online R4's own type (default: ``transform_type``). R1 and
        R2 are fused into the weights, so their type costs nothing at inference; R4 runs
        online, and engines fuse only ``hadamard`` (vLLM's Walsh-Hadamard kernel; any other
        type is a dense product), so ``r4_transform_type: hadamard`` with a power-of-two
        ``r4_block_size`` gives the fused R4 while R1 stays a ``random-hadamard``
    :param r4_block_size: R4's block (block-diagonal over the down-projection input; must
        divide its width). Default: upstream's (``transform_block_size``, else the whole
        width)
    """

    r4_transform_type: Literal["hadamard", "random-hadamard"] | None = None
    r4_block_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_r4_options(self):
        if (self.r4_transform_type or self.r4_block_size) and "R4" not in self.rotations:
            raise ValueError(
                "r4_transform_type / r4_block_size set but R4 is not in rotations; add R4 to "
                "rotations or drop them"
            )
        return self

    def on_initialize(self, state: State, **kwargs) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        if "R4" in self.rotations and self.mappings is not None:
            self._check_r4_block(state.model)
        return initialized

    def _create_r4_scheme(self):
        """Upstream's R4 scheme with this modifier's own R4 type and block, if set."""
        scheme = super()._create_r4_scheme()
        update = {}
        if self.r4_transform_type is not None:
            update["type"] = self.r4_transform_type
        if self.r4_block_size is not None:
            update["head_dim"] = self.r4_block_size
        return scheme.model_copy(update=update) if update else scheme

    def _r4_block(self) -> int | None:
        return self.r4_block_size or self.transform_block_size

    def _check_r4_block(self, model: nn.Module) -> None:
        """A block that does not divide every down projection's width, or a ``hadamard``
        block that is not a power of two, fails here, before any rotation is fused."""
        block = self._r4_block()
        if block is None:
            return
        kind = self.r4_transform_type or self.transform_type
        if kind == "hadamard" and block & (block - 1):
            raise ValueError(
                f"an R4 block of {block} with type hadamard is not a power of two (the "
                "Sylvester construction); use a power of two such as 128, or "
                "r4_transform_type: random-hadamard"
            )
        for name, module in self._down_projections(model):
            if module.in_features % block:
                raise ValueError(
                    f"r4_block_size {block} does not divide {name}'s input width "
                    f"{module.in_features}; use a divisor of it (e.g. 128)"
                )

    def _down_projections(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The layers R4 rotates the input of: SpinQuant's ``mlp_out``."""
        return list(match_named_modules(model, self.mappings.mlp_out))

    def _center_embeddings(self, model: nn.Module) -> None:
        norms = [
            module
            for mapping in self.norm_mappings
            for _, module in match_named_modules(model, [mapping.norm])
        ]
        if any(isinstance(norm, nn.LayerNorm) for norm in norms):
            super()._center_embeddings(model)

    @torch.no_grad()
    def on_calibration_start(self, state: State, event: Event, **kwargs):
        with shared_weights_written_once():  # under torchrun: fused once, not once per rank
            super().on_calibration_start(state, event, **kwargs)


class LearnedSpinQuantModifier(ExactSpinQuantModifier):
    """Learned R1 / per-layer R2 on the Stage I states (see the module docstring).

    Sample yaml (a quantization modifier must follow; its scheme is the one learned against)::

        rotate_stage:
          rotate_modifiers:
            LearnedSpinQuantModifier:
              rotations: [R1, R2, R4]
              transform_type: random-hadamard
              learn: [R1, R2]
              objective: layer_mse
              token_weights: frontier

    :param learn: the rotations to learn: R1 and / or R2 (fused into the weights)
    :param objective: ``layer_mse`` (weighted layer-output MSE, summed over layers) or
        ``output_kl`` (weighted KL of the masked positions' output distribution)
    :param token_weights: ``frontier`` (Stage I ``loss_mask``) or ``uniform`` (the ablation)
    :param steps: optimiser steps, one calibration batch each (cycling through the batches)
    :param lr: Cayley-Adam step per skew entry; decays with a cosine over ``steps``
    :param weights_in_loop: also fake-quantize the weights (W4A4 RTN in the loop); off, the
        weights stay in full precision while learning (W16A4), as SpinQuant learns when GPTQ
        quantizes the weights afterwards
    :param gradient_checkpointing: recompute each decoder layer in the backward pass instead
        of storing its activations (memory of one layer instead of all, one more forward)
    """

    learn: list[Literal["R1", "R2"]] = Field(default_factory=lambda: ["R1", "R2"])
    objective: Literal["layer_mse", "output_kl"] = "layer_mse"
    token_weights: Literal["frontier", "uniform"] = "frontier"
    steps: int = Field(100, gt=0)
    lr: float = Field(2e-3, gt=0)
    weights_in_loop: bool = False
    gradient_checkpointing: bool = True

    _learned: dict = PrivateAttr(default_factory=dict)
    _report: dict = PrivateAttr(default_factory=dict)
    #: the run's spec, handed over by fair_calib_llmc.quantize (else read off the model)
    _diffusion_spec: DiffusionLMSpec | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _check_learnable(cls, values):
        if not isinstance(values, dict):
            return values
        learn = [str(r).upper() for r in values.get("learn", ["R1", "R2"])]
        rotations = [str(r).upper() for r in values.get("rotations", ["R1", "R2"])]
        fixed = [r for r in learn if r not in LEARNABLE_ROTATIONS]
        if fixed:
            raise ValueError(
                f"learn: {fixed} cannot be learned: R3 rotates queries and keys inside "
                "attention and R4 the down-projection input behind act(gate) * up, where no "
                "weight absorbs a rotation; both stay the online Hadamard; learn R1 and/or R2"
            )
        missing = [r for r in learn if r not in rotations]
        if missing:
            raise ValueError(f"learn: {missing} must also be listed in rotations: {rotations}")
        if not learn:
            raise ValueError("learn is empty; use ExactSpinQuantModifier for fixed rotations")
        if values.get("transform_block_size") is not None and "R1" in learn:
            raise ValueError(
                "a block-diagonal R1 (transform_block_size) cannot be learned: learning moves a "
                "full residual rotation; drop transform_block_size or learn only R2"
            )
        if values.get("transform_type", "hadamard") == "random-matrix":
            raise ValueError(
                "transform_type random-matrix is not orthogonal, so it cannot start a learned "
                "rotation; use hadamard or random-hadamard"
            )
        return {**values, "learn": learn}

    # --- lifecycle ------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        if self._diffusion_spec is None:  # oneshot called directly: the config states it
            # a causal or mask-less model fails here, before any work
            self._diffusion_spec = diffusion_spec(state.model)
        check_learning_data(state, "LearnedSpinQuantModifier", self.token_weights)
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)  # Hadamards fused, fixed R4 on
        self._learn(state.model, state.data.calib)

    def _learn(self, model: nn.Module, dataloader) -> None:
        """Learn the rotations (:mod:`.learner`), then fuse them into the weights."""
        quantized = learnable_linears(
            model,
            "LearnedSpinQuantModifier",
            weights_in_loop=self.weights_in_loop,
            symmetric_weights=False,
        )
        settings = LearningSettings(
            learn=tuple(self.learn),
            objective=self.objective,
            token_weights=self.token_weights,
            steps=self.steps,
            lr=self.lr,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        learned = learn_rotations(
            model, self.mappings, quantized, dataloader, self._diffusion_spec, settings
        )
        self._learned, self._report = learned.rotations, learned.report
        with torch.no_grad(), shared_weights_written_once():  # every rank learned the same
            for module, where in learned.sites.items():
                fuse_rotation(module, where)

    @property
    def learning_report(self) -> dict:
        """What learning did: both weightings' objective before and after, how far the
        rotations moved from the Hadamard start, and its seconds, all and the steps' alone
        (empty before learning)."""
        return dict(self._report)


ModifierFactory.register("ExactSpinQuantModifier", ExactSpinQuantModifier)
ModifierFactory.register("LearnedSpinQuantModifier", LearnedSpinQuantModifier)
