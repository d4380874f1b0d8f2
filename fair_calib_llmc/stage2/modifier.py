"""``FAIRCalibModifier``: FAIR-Calib Stage II inside llm-compressor's sequential pipeline.

At W4A4 most frontier decision flips come from the 4-bit activations, not from weight rounding
(docs/results.md, the activation floor). Plain GPTQ cannot see them: it fits the weights to the
layer's full-precision activations of the model it is quantizing. FAIR-Calib Stage II fits
every linear layer to what the deployed model computes instead
(:mod:`fair_calib_llmc.stage2.reconstruction`):

    min_Q  sum_t w_t || Q quant(x_q,t) - W x_fp,t ||^2

* ``x_q``: the layer's input in the quantized model, propagated through the already quantized
  layers with their 4-bit activations on (the pipeline's own stream, with an
  activation-quantization hook on calibrated layers);
* ``quant(.)``: the layer's own 4-bit input quantization (and any online rotation before it);
* ``x_fp``: the input the full-precision model produces, from a second stream this modifier
  carries alongside the pipeline's (the full-precision layer run on its own FP hidden state);
* ``w_t``: the per-token Stage I frontier weight (``loss_mask``).

The solution is GPTQ on the least-squares target ``W*`` with the weighted Hessian of the
quantized inputs, so llm-compressor's own GPTQ (``GPTQModifier.on_sequential_epoch_end`` and
``compress_modules``, including its distributed path) does the quantization unchanged.

Stage I (teacher rollouts, frontier prior) needs the sampler and runs before ``oneshot``;
its settings live in ``stage1`` so one recipe describes the whole method.
:func:`fair_calib_llmc.quantize` reads them; plain ``oneshot`` users build the weighted
states with :func:`fair_calib_llmc.build_calibration_dataset` and are told so at start.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils import getattr_chain, update_offload_parameter
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from fair_calib_llmc.distributed import all_reduce_sum
from fair_calib_llmc.formats.schemes import check_scheme_name
from fair_calib_llmc.models.configs import LM_HEADS
from fair_calib_llmc.models.family import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.stage1.states import Stage1Settings
from fair_calib_llmc.stage2.reconstruction import accumulate_cross_covariance, fp_target_weight

__all__ = ["FAIRCalibModifier", "check_finite_weights"]


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise a ValueError naming the parameters that hold NaN or Inf."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"the model has NaN/Inf weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "fix or re-download the checkpoint before quantizing"
        )


def quantized_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the deployed layer sees it: fake-quantized by its input scheme.

    Dynamic activations are quantized here exactly as at inference. Schemes whose activation
    scales come from calibration (static, or NVFP4's global scale) are not final while the
    layer is still calibrating, so their input is used unquantized.
    """
    args = getattr_chain(module, "quantization_scheme.input_activations", None)
    if args is None or not args.dynamic or args.strategy == QuantizationStrategy.TENSOR_GROUP:
        return x
    return forward_quantize(module, x, "input", args)


class FAIRCalibModifier(GPTQModifier):
    """Frontier-Aware Instability-Reweighted Calibration (W4A4) for diffusion LMs.

    Sample yaml (after a rotation stage, see ``recipes/fair_calib_w4a4.yaml``)::

        fair_stage:
          fair_modifiers:
            FAIRCalibModifier:
              scheme: W4A4_G128_PACKED
              targets: [Linear]
              stage1: {prior: {frontier_weight: 4.0}, states_per_prompt: 4}

    :param stage1: Stage I settings (rollout sampler, prompts, prior), read by
        :func:`fair_calib_llmc.quantize` before ``oneshot``
    :param fp_targets: fit to the full-precision model's layer inputs (its own stream); off,
        the target is the full-precision weight on the quantized model's input
    :param target_strength: how far to move towards the least-squares target ``W*``
        (0 = GPTQ on the weighted Hessian of the quantized inputs). The full step (1.0)
        over-fits a few hundred calibration states; 0.25 is GPTAQ's own default, chosen on a
        development seed kept apart from the benchmark's (docs/results.md, development sweep)
    :param use_token_weights: weight tokens by the Stage I ``loss_mask``; off = uniform weights
        (the ablation that isolates what the frontier prior adds)
    :param require_token_weights: with ``use_token_weights``, refuse to run without weights
    """

    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    fp_targets: bool = True
    target_strength: float = Field(0.25, ge=0.0, le=1.0)
    use_token_weights: bool = True
    require_token_weights: bool = True

    _cross: dict = PrivateAttr(default_factory=dict)
    _fp_inputs: dict = PrivateAttr(default_factory=dict)
    _fp_hidden: dict = PrivateAttr(default_factory=dict)
    _previous_layer: dict = PrivateAttr(default_factory=dict)
    _capturing_fp: bool = PrivateAttr(default=False)
    _linear_hooks: set = PrivateAttr(default_factory=set)
    _propagation_hooks: list = PrivateAttr(default_factory=list)
    _sqrt_weights: dict = PrivateAttr(default_factory=dict)
    #: the run's spec, handed over by fair_calib_llmc.quantize (else read off the model)
    _diffusion_spec: DiffusionLMSpec | None = PrivateAttr(default=None)

    #: validated even when a recipe leaves it out, so the heads are always added
    ignore: list[str] = Field(default_factory=list, validate_default=True)

    @field_validator("ignore", mode="after")
    @classmethod
    def _lm_heads_stay_unquantized(cls, value: list[str]) -> list[str]:
        """Both families' LM heads join ``ignore``, as the recipe loader adds them for every
        quantizer: recipes do not spell a family's head, and this modifier keeps it in full
        precision under plain ``oneshot`` too."""
        return [*value, *(head for head in LM_HEADS if head not in value)]

    @field_validator("scheme", mode="before")
    @classmethod
    def _known_scheme(cls, value):
        if isinstance(value, str):
            return check_scheme_name(value)
        return value

    # --- lifecycle ------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        if self._diffusion_spec is None:  # oneshot called directly: the config states it
            # a causal or mask-less model fails here, before any work
            self._diffusion_spec = diffusion_spec(state.model)
        check_finite_weights(state.model)
        if self.fp_targets:
            named = named_decoder_layers(state.model, kwargs.get("sequential_targets"))
            layers = [layer for _, layer in named]
            self._previous_layer = dict(zip(layers[1:], layers[:-1], strict=True))
            self._previous_layer[layers[0]] = None
        logger.info(
            "FAIR-Calib Stage II: weighted fit to "
            f"{'full-precision' if self.fp_targets else 'own-input'} targets, token weights "
            f"{'from loss_mask' if self.use_token_weights else 'uniform'} (Stage I states come "
            "from fair_calib_llmc.quantize or build_calibration_dataset)"
        )
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        for layer in self._previous_layer:
            self.register_hook(
                layer, self._run_full_precision_layer, "forward_pre", with_kwargs=True
            )

    def register_hook(self, target, hook, hook_type, **kwargs):
        """Upstream's registration; remembers which handles are the GPTQ statistics hooks, the
        only ones left on while the full-precision stream runs."""
        handle = super().register_hook(target, hook, hook_type, **kwargs)
        if hook == self.calibrate_module:
            self._linear_hooks.add(handle)
        return handle

    def on_sequential_epoch_end(self, state: State, event: Event, modules, **kwargs):
        modules = [m for m in modules if is_module_quantized(m) and m in self._hessians]
        self._check_finite_hessians(modules)
        if self.target_strength > 0:
            # W* needs the statistics of all ranks' states; GPTQ's own reduction to the owner
            # rank then scales Hessian and count alike, which GPTQ's H / n does not see
            all_reduce_sum(
                [
                    t
                    for m in modules
                    if m in self._cross
                    for t in (self._cross[m], self._hessians[m], self._num_samples[m])
                ]
            )
        for module in modules:
            cross = self._cross.pop(module, None)
            if cross is not None and self.target_strength > 0:
                update_offload_parameter(
                    module,
                    "weight",
                    fp_target_weight(
                        module.weight,
                        cross,
                        self._hessians[module],
                        dampening_frac=self.dampening_frac or 0.0,
                        strength=self.target_strength,
                    ),
                )
        super().on_sequential_epoch_end(state, event, modules, **kwargs)
        for module in modules:  # later layers see this layer's 4-bit activations
            self._propagation_hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args: (quantized_input(m, args[0]), *args[1:])
                )
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        for handle in self._propagation_hooks:
            handle.remove()
        self._propagation_hooks.clear()
        self._fp_hidden.clear()
        self._fp_inputs.clear()
        self._sqrt_weights.clear()

    # --- the full-precision stream ----------------------------------------------------------
    def _run_full_precision_layer(self, layer, args, kwargs):
        """Before the pipeline runs ``layer`` on the quantized stream, run it on the FP one.

        The FP hidden state of this batch is the previous layer's FP output, consumed here
        (the first layer's input is the embedding, identical in both streams). Only this
        modifier's linear hooks stay on, in capture mode, so observers and other modifiers
        never see the FP stream.
        """
        batch = active_session().state.current_batch_idx
        previous = self._previous_layer.get(layer)
        hidden = args[0] if previous is None else self._fp_hidden.pop((previous, batch))
        self._capturing_fp = True
        try:
            with HooksMixin.disable_hooks(keep=self._linear_hooks):
                output = layer.forward(hidden, *args[1:], **kwargs)
        finally:
            self._capturing_fp = False
        output = output[0] if isinstance(output, tuple) else output
        self._fp_hidden[(layer, batch)] = output.detach()

    # --- statistics --------------------------------------------------------------------------
    def calibrate_module(self, module, args, _output):
        inp = args[0]
        if self._capturing_fp:
            self._fp_inputs[module] = inp
            return
        weights = self._token_weights(inp)
        quantized = quantized_input(module, inp)
        target = self._fp_inputs.pop(module, None) if self.fp_targets else inp
        if target is None:
            raise RuntimeError(
                f"no full-precision input was captured for {self._module_names.get(module)}; "
                "FAIR-Calib needs the sequential pipeline with the model's decoder layers as "
                "sequential targets"
            )
        if weights is not None:
            quantized = quantized * weights.to(quantized.dtype).unsqueeze(-1)
            target = target * weights.to(target.dtype).unsqueeze(-1)
        super().calibrate_module(module, (quantized, *args[1:]), _output)
        if module not in self._cross:
            width = module.weight.shape[1]
            self._cross[module] = torch.zeros(
                width, width, device=self._hessians[module].device, dtype=torch.float32
            )
        accumulate_cross_covariance(target, quantized, self._cross[module])

    def _token_weights(self, inp: torch.Tensor) -> torch.Tensor | None:
        """``sqrt(loss_mask)`` of the current batch on ``inp``'s device, computed once per
        batch (every hooked linear of a layer sees the same batch)."""
        if not self.use_token_weights:
            return None
        state = active_session().state
        masks = getattr(state, "loss_masks", None)
        index = getattr(state, "current_batch_idx", -1)
        if not masks or index is None or index < 0:
            if self.require_token_weights:
                # checked here: the sequential pipeline fills state.loss_masks after
                # CALIBRATION_START, right before the first calibration batch
                raise ValueError(
                    "FAIRCalibModifier got no per-token frontier weights. Build masked-stage "
                    "calibration data with fair_calib_llmc.build_calibration_dataset and call "
                    "oneshot(..., use_loss_mask=True), or use fair_calib_llmc.quantize which "
                    "does both; set use_token_weights: false to calibrate unweighted."
                )
            return None
        key = (index, inp.device)
        if key not in self._sqrt_weights:
            self._sqrt_weights.clear()
            self._sqrt_weights[key] = masks[index].to(inp.device, torch.float32).sqrt()
        weights = self._sqrt_weights[key]
        if weights.shape != inp.shape[:-1]:
            raise ValueError(
                f"loss_mask shape {tuple(weights.shape)} does not match the layer input "
                f"{tuple(inp.shape[:-1])}; keep loss_mask aligned with input_ids"
            )
        return weights

    def _check_finite_hessians(self, modules) -> None:
        """NaN/Inf activations poison the Hessian: one check per layer, not per batch."""
        for module in modules:
            if not torch.isfinite(self._hessians[module]).all():
                raise FloatingPointError(
                    f"NaN/Inf activations entered {self._module_names.get(module, module)}; "
                    "check the checkpoint and the calibration inputs (fp16 overflow?)"
                )


ModifierFactory.register("FAIRCalibModifier", FAIRCalibModifier)
