"""``FlatQuantModifier``: FlatQuant-class per-layer affine transforms, learned block by block.

The paper's Stage II (FAIR-Calib) is FlatQuant trained on a position-reweighted block-output
MSE; FlatQuant itself (uniform weights) is its strongest baseline. Both are this modifier:
``token_weights: frontier`` reads Stage I's per-token ``loss_mask``, ``uniform`` ignores it.

It extends :class:`~fair_calib_llmc.stage2.learned_rotations.base.ExactSpinQuantModifier`:
the recipe's Hadamard rotations (R1, R2, fused) are applied first by upstream's code, then
every decoder layer in turn (:mod:`~fair_calib_llmc.stage2.flatquant.learner`). The
down-projection input gets no fixed R4: its learned block starts at a Hadamard block, so each
linear has one online transform (what vLLM applies):

1. the full-precision layer runs on the full-precision stream (the target);
2. the layer's linears compute their transformed, fake-quantized forward with the scheme the
   quantization modifier after this one deploys (:mod:`~.transforms`), and AdamW with a
   cosine schedule learns the layer's transforms (and, optionally, weight clipping);
3. the layer is written out: transformed weights in float64, smoothing scales into the
   norms, the value / output transform into v and o, and each site's block as an ordinary
   compressed-tensors online transform (:func:`attach_online_transform`) recorded in the
   model's ``transform_config``. Learned weight clipping clamps the written weights, so the
   next quantizer's scales hold it.

Activation clipping (FlatQuant's per-quantizer clipping ratio) cannot be exported: dynamic
activation scales have no field that could carry it in a compressed-tensors checkpoint.
``activation_clipping: true`` learns with it as a diagnostic (the written model quantizes
unclipped, and the report gives the objective both ways); no shipped recipe sets it.
The quantization modifier after this one (GPTQ or RTN) then quantizes the transformed
weights, with the online transforms in front of its activations.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from compressed_tensors.transform.apply import _register_tied_transform_weights
from compressed_tensors.utils import update_offload_parameter
from llmcompressor.core import Event, State
from llmcompressor.modifiers.factory import ModifierFactory
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator
from torch import nn
from tqdm.auto import tqdm

from fair_calib_llmc.distributed import rank_and_world, shared_weights_written_once
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.stage2.flatquant.clipping import clip_weight, initial_clip_factors
from fair_calib_llmc.stage2.flatquant.learner import (
    LayerData,
    capture_first_layer_inputs,
    layer_output,
    learn_layer,
    split_batches,
)
from fair_calib_llmc.stage2.flatquant.online import (
    attach_online_transform,
    hadamard_start,
    record_transform_groups,
)
from fair_calib_llmc.stage2.flatquant.sites import LayerSites, layer_sites
from fair_calib_llmc.stage2.flatquant.transforms import (
    LayerTransforms,
    fused_weights,
    transformed_forward,
)
from fair_calib_llmc.stage2.learned_rotations.base import ExactSpinQuantModifier
from fair_calib_llmc.stage2.learning import (
    check_learning_data,
    forwards_replaced,
    frozen,
    learnable_linears,
    token_weights_of,
)

__all__ = ["FlatQuantModifier"]

#: transform group name prefix: one group per layer and site (engines share one tensor per
#: group, and vLLM wants q / k / v, and gate / up, in one apply entry of one group)
GROUP_PREFIX = "flatquant_"


class FlatQuantModifier(ExactSpinQuantModifier):
    """FlatQuant-class learned affine transforms on top of exact Hadamard rotations.

    Sample yaml (a quantization modifier must follow; its scheme is the one learned against)::

        flat_stage:
          flat_modifiers:
            FlatQuantModifier:
              rotations: [R1, R2]
              transform_type: random-hadamard
              block_size: 128
              token_weights: frontier
              epochs: 15

    :param block_size: ``b``, the learned block of the q / k / v and gate / up inputs
        (repeated along the width; must divide the hidden size). Inference cost: ``b``
        multiply-adds per input element of each transformed linear
    :param down_block_size: the learned block of the down-projection input (default
        ``block_size``; must divide the intermediate size)
    :param smooth: learn per-channel smoothing scales, fused into the norms
    :param learn_vo: learn the per-head value / output transforms (fused, free)
    :param learn_weight_clipping: learn one clipping factor per output channel, exported by
        clamping the transformed weights (needs a symmetric weight scheme)
    :param activation_clipping: learn a clipping ratio per site's activations while learning
        only (a diagnostic: it is not exported, see the module docstring)
    :param token_weights: ``frontier`` weighs each token by Stage I's ``loss_mask`` (the
        paper's Stage II), ``uniform`` weighs all alike (FlatQuant)
    :param inputs: what a layer learns on: ``fp`` the full-precision stream (FlatQuant),
        ``quantized`` the stream of the already quantized layers before it
    :param epochs: passes over the training batches per layer
    :param lr: AdamW learning rate of the transforms (cosine decay to 0)
    :param clip_lr: learning rate of the clipping factors
    :param holdout: share of the calibration batches held out of learning, on which the
        report gives the objective out of sample
    """

    block_size: int = Field(128, gt=0)
    down_block_size: int | None = Field(None, gt=0)
    smooth: bool = True
    learn_vo: bool = True
    learn_weight_clipping: bool = False
    activation_clipping: bool = False
    token_weights: Literal["frontier", "uniform"] = "uniform"
    inputs: Literal["fp", "quantized"] = "fp"
    epochs: int = Field(15, ge=0)
    lr: float = Field(5e-3, gt=0)
    clip_lr: float = Field(5e-2, gt=0)
    holdout: float = Field(0.1, ge=0.0, lt=1.0)

    _report: dict = PrivateAttr(default_factory=dict)
    #: the run's spec, handed over by fair_calib_llmc.quantize (else read off the model)
    _diffusion_spec: DiffusionLMSpec | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _no_fixed_r4(self):
        if "R4" in self.rotations:
            raise ValueError(
                "FlatQuantModifier learns the down-projection input transform itself (from a "
                "Hadamard block); drop R4 from rotations"
            )
        return self

    # --- lifecycle ------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        if self._diffusion_spec is None:  # oneshot called directly: the config states it
            self._diffusion_spec = diffusion_spec(state.model)
        check_learning_data(state, "FlatQuantModifier", self.token_weights)
        if rank_and_world()[1] > 1:  # each rank would learn other transforms from its share
            raise ValueError(
                "FlatQuantModifier learns in one process only (its per-layer learning does not "
                "average gradients across torchrun ranks); run this recipe without torchrun"
            )
        self._check_blocks(state.model)
        return super().on_initialize(state, **kwargs)

    def _check_blocks(self, model: nn.Module) -> None:
        """Blocks that do not divide their widths fail here, before any work."""
        config = model.config
        for field, block, width in (
            ("block_size", self.block_size, config.hidden_size),
            ("down_block_size", self._down_block(), config.intermediate_size),
        ):
            if width % block:
                raise ValueError(
                    f"FlatQuantModifier.{field} {block} does not divide the width {width}; "
                    "use a divisor of it (e.g. 128 or 64)"
                )

    def _down_block(self) -> int:
        return self.down_block_size or self.block_size

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)  # Hadamards fused, R4 on
        self._learn(state.model, state.data.calib)

    # --- learning ---------------------------------------------------------------------------
    def _learn(self, model: nn.Module, dataloader) -> None:
        began = time.monotonic()
        device = next(model.parameters()).device
        quantized = learnable_linears(
            model,
            "FlatQuantModifier",
            weights_in_loop=True,
            symmetric_weights=self.learn_weight_clipping,
        )
        batches = [self._batch(b, device) for b in dataloader]
        named = named_decoder_layers(model)
        hidden, kwargs = capture_first_layer_inputs(model, named[0][1], batches)
        weights = [token_weights_of(b, self.token_weights) for b in batches]
        train, held = split_batches(len(batches), self.holdout)
        stream = list(hidden)  # the quantized stream (inputs: quantized)
        down_start = hadamard_start(self._down_block(), self.transform_type).float()
        layers = []
        for index, (name, layer) in enumerate(tqdm(named, desc="FlatQuant layers")):
            sites = layer_sites(model, name, self.mappings, self.norm_mappings)
            with torch.no_grad():
                targets = [layer_output(layer, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]
            data = LayerData(
                inputs=hidden if self.inputs == "fp" else stream,
                targets=targets,
                kwargs=kwargs,
                weights=weights,
            )
            transforms = self._transforms(model, sites, down_start).to(device)
            clips = {}
            if self.learn_weight_clipping:
                clips = {
                    model.get_submodule(n): initial_clip_factors(model.get_submodule(n).weight)
                    for n in sites.roles
                }
            forwards = {
                module: transformed_forward(
                    module, sites.roles[n], transforms, *quantized[module], clips.get(module)
                )
                for n in sites.roles
                for module in [model.get_submodule(n)]
            }
            with forwards_replaced(forwards), frozen(model):
                report = learn_layer(
                    layer,
                    transforms,
                    list(clips.values()),
                    data,
                    train,
                    held,
                    epochs=self.epochs,
                    lr=self.lr,
                    clip_lr=self.clip_lr,
                )
                if self.inputs == "quantized":
                    with torch.no_grad():
                        pairs = zip(stream, kwargs, strict=True)
                        stream = [layer_output(layer, h, kw) for h, kw in pairs]
            with torch.no_grad(), shared_weights_written_once():
                self._write_layer(model, index, sites, transforms, quantized, clips)
            hidden = targets  # the written layer computes what the FP layer computed
            layers.append({"layer": name, **report})
        # the readers of one site share its block: save_pretrained stores it once
        _register_tied_transform_weights(model)
        self._report = {
            "token_weights": self.token_weights,
            "inputs": self.inputs,
            "layers": layers,
            "train_batches": len(train),
            "heldout_batches": len(held),
            "seconds": time.monotonic() - began,
        }
        for key in ("train", "heldout"):
            if layers[0]["before"][key] is not None:
                self._report[key] = {
                    when: sum(layer[when][key] for layer in layers) / len(layers)
                    for when in ("before", "after")
                }
        logger.info(
            f"FlatQuant ({self.token_weights} weights, {self.inputs} inputs, {self.epochs} "
            f"epochs): mean layer objective {self._report.get('train')}, held out "
            f"{self._report.get('heldout')}"
        )

    def _transforms(
        self, model: nn.Module, sites: LayerSites, down_start: torch.Tensor
    ) -> LayerTransforms:
        config = model.config
        return LayerTransforms(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            head_dim=sites.head_dim,
            kv_heads=sites.kv_heads,
            block=self.block_size,
            down_block=self._down_block(),
            down_start=down_start,
            smooth=tuple(site for site in sites.norms if self.smooth),
            learn_vo=self.learn_vo,
            activation_clipping=self.activation_clipping,
        )

    def _write_layer(
        self,
        model: nn.Module,
        index: int,
        sites: LayerSites,
        transforms: LayerTransforms,
        quantized: dict,
        clips: dict,
    ) -> None:
        """Fuse what fuses, attach what runs online (see the module docstring)."""
        for name, role in sites.roles.items():
            module = model.get_submodule(name)
            weight, bias = fused_weights(module, role, transforms)
            if module in clips:
                weight_args = quantized[module][1]
                weight = clip_weight(weight.float(), clips[module].detach(), weight_args)
                weight = weight.to(module.weight.dtype)
            update_offload_parameter(module, "weight", weight)
            if bias is not None:
                update_offload_parameter(module, "bias", bias)
        for site, norm_name in sites.norms.items():
            _, scale = transforms.site(site)
            if scale is not None:
                norm = model.get_submodule(norm_name)
                written = norm.weight.double() / scale.double()
                update_offload_parameter(norm, "weight", written.to(norm.weight.dtype))
        groups = {}
        for site, readers in sites.readers.items():
            p, _ = transforms.site(site)
            group = f"{GROUP_PREFIX}{index}_{site}"
            groups[group] = attach_online_transform(model, readers, p, group, self.precision)
        record_transform_groups(model, groups)

    @staticmethod
    def _batch(batch: dict, device) -> dict:
        keep = ("input_ids", "attention_mask", "loss_mask")
        return {k: batch[k].to(device) for k in keep if k in batch}

    @property
    def learning_report(self) -> dict:
        """Per layer: the objective before and after learning on the training and held-out
        batches, steps and seconds; the layer means (empty before learning)."""
        return dict(self._report)


ModifierFactory.register("FlatQuantModifier", FlatQuantModifier)
