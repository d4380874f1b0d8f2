"""``FAIRCalibModifier``: FAIR-Calib Stage II inside llm-compressor's sequential pipeline.

At W4A4 most frontier decision flips come from the 4-bit activations, not from weight rounding
(docs/results.md, the activation floor). Plain GPTQ cannot see them: it fits the weights to the
layer's full-precision activations of the model it is quantizing. FAIR-Calib Stage II fits
every linear layer to what the deployed model computes instead
(:mod:`fair_calib_llmc.stage2.reconstruction`):

    min_Q  sum_t w_t || Q quant(x_q,t) - W x_fp,t ||^2

* ``x_q``: the layer's input in the quantized model, propagated through the already quantized
  layers with their 4-bit activations on (the pipeline's own stream, with an
  activation-quantization hook on calibrated layers), *and* through the already quantized
  linears of its own decoder layer (``deployed_inputs``, below);
* ``quant(.)``: the layer's own 4-bit input quantization (and any online rotation before it),
  NVFP4's included, with the activation global scale it is deployed with;
* ``x_fp``: the input the full-precision model produces, from a second stream this modifier
  carries alongside the pipeline's (the full-precision layer run on its own FP hidden state);
* ``w_t``: the per-token Stage I frontier weight (``loss_mask``).

The solution is GPTQ on the least-squares target ``W*`` with the weighted Hessian of the
quantized inputs, so llm-compressor's own GPTQ (``GPTQModifier.on_sequential_epoch_end`` and
``compress_modules``, including its distributed path) does the quantization unchanged.

**Within a decoder layer** ``o_proj`` reads what q/k/v compute, gate/up read what ``o_proj``
adds, ``down`` reads what gate/up compute: statistics gathered in the pipeline's one pass over
the layer would describe inputs built with the layer's earlier linears still unquantized. So
the pipeline's pass only caches the layer's inputs (both streams) and records which linears
share an input (a *group*: q/k/v, then o, then gate/up, then down, found from the forward
itself, not from names). At the layer's epoch end each group in turn is calibrated on a re-run
of the layer over the cached inputs, GPTQ'd through upstream's own
``on_sequential_epoch_end``, and switched to its 4-bit activations, so the next group's
re-run computes what the deployed layer computes. The full-precision stream is re-run with
the layer's full-precision weights swapped in, its activations unquantized.

**NVFP4 activations** (``tensor_group``, dynamic ``local``) have a per-tensor global scale that
llm-compressor calibrates: a ``static_minmax`` observer over every calibration input of the
linear, turned into ``input_global_scale`` at the epoch end. It is known only after all of the
group's inputs have been seen, so for such groups one re-run feeds the observers (on the
deployed inputs), the global scale is set from them (what upstream will store), and the
statistics re-run then sees the 4-bit activations the deployed layer sees.

Stage I (teacher rollouts, frontier prior) needs the sampler and runs before ``oneshot``;
its settings live in ``stage1`` so one recipe describes the whole method.
:func:`fair_calib_llmc.quantize` reads them; plain ``oneshot`` users build the weighted
states with :func:`fair_calib_llmc.build_calibration_dataset` and are told so at start.
"""

from __future__ import annotations

import torch
from compressed_tensors.offload.dist_utils import is_source_process
from compressed_tensors.quantization import DynamicType
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


def quantized_input(module: torch.nn.Module, x: torch.Tensor, *, calibrated: bool) -> torch.Tensor:
    """The input as the deployed layer sees it: fake-quantized by its input scheme.

    Dynamic activations are quantized exactly as at inference. NVFP4's (dynamic ``local``)
    need the calibrated global scale: ``calibrated`` says it has been set on ``module``.
    Static activation scales (no shipped scheme uses them) are left to upstream: the input is
    used unquantized.
    """
    args = getattr_chain(module, "quantization_scheme.input_activations", None)
    if args is None:
        return x
    if args.dynamic is True or (args.dynamic == DynamicType.LOCAL and calibrated):
        return forward_quantize(module, x, "input", args)
    return x


class _GroupDone(Exception):
    """Raised once the last linear of the group being calibrated has run: the rest of the
    decoder layer's forward is not needed."""


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
    :param deployed_inputs: calibrate a decoder layer's linears group by group (linears that
        share an input form a group), each on the input the layer computes with its earlier
        groups already quantized; off, one group per layer (every linear sees the layer's
        earlier linears unquantized, as before issue 25)
    """

    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    fp_targets: bool = True
    target_strength: float = Field(0.25, ge=0.0, le=1.0)
    use_token_weights: bool = True
    require_token_weights: bool = True
    deployed_inputs: bool = True

    _cross: dict = PrivateAttr(default_factory=dict)
    _fp_inputs: dict = PrivateAttr(default_factory=dict)
    _fp_hidden: dict = PrivateAttr(default_factory=dict)
    _previous_layer: dict = PrivateAttr(default_factory=dict)
    #: decoder layer -> [(batch index, args, kwargs, full-precision hidden state)]
    _layer_inputs: dict = PrivateAttr(default_factory=dict)
    #: quantized linear -> its decoder layer
    _layer_of: dict = PrivateAttr(default_factory=dict)
    #: decoder layer -> its linears in call order, grouped by shared input
    _groups: dict = PrivateAttr(default_factory=dict)
    _last_input: object = PrivateAttr(default=None)
    #: the group a re-run calibrates (None: the pipeline's own pass) and its last linear
    _active: frozenset | None = PrivateAttr(default=None)
    _last_of_group: object = PrivateAttr(default=None)
    _observing: bool = PrivateAttr(default=False)
    #: linears whose activation global scale has been set from their deployed inputs
    _scaled: set = PrivateAttr(default_factory=set)
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
        named = named_decoder_layers(state.model, kwargs.get("sequential_targets"))
        layers = [layer for _, layer in named]
        self._previous_layer = dict(zip(layers[1:], layers[:-1], strict=True))
        self._previous_layer[layers[0]] = None
        logger.info(
            "FAIR-Calib Stage II: weighted fit to "
            f"{'full-precision' if self.fp_targets else 'own-input'} targets, token weights "
            f"{'from loss_mask' if self.use_token_weights else 'uniform'}, "
            f"{'group by group on deployed' if self.deployed_inputs else 'one pass per'} "
            "layer inputs (Stage I states come from fair_calib_llmc.quantize or "
            "build_calibration_dataset)"
        )
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        for layer in self._previous_layer:
            for module in layer.modules():
                if module in self._module_names:
                    self._layer_of[module] = layer
            self.register_hook(layer, self._cache_layer_input, "forward_pre", with_kwargs=True)

    def register_hook(self, target, hook, hook_type, **kwargs):
        """Upstream's registration; remembers which handles are the GPTQ statistics hooks, the
        only ones left on while a layer is re-run."""
        handle = super().register_hook(target, hook, hook_type, **kwargs)
        if hook == self.calibrate_module:
            self._linear_hooks.add(handle)
        return handle

    def on_sequential_epoch_end(self, state: State, event: Event, modules, **kwargs):
        layers = [m for m in modules if m in self._layer_inputs]
        if not layers:  # the embeddings, the head, or linears outside decoder layers
            self._quantize(state, event, modules, **kwargs)
            return
        if len(layers) > 1:  # the later layer's cached inputs saw the earlier one unquantized
            raise ValueError(
                f"FAIRCalibModifier got {len(layers)} decoder layers in one subgraph; "
                "calibrate one layer per subgraph (oneshot(..., sequential_targets_per_subgraph=1))"
            )
        layer = layers[0]
        cache = self._layer_inputs.pop(layer)
        groups = self._groups.pop(layer, [])
        self._last_input = None
        if not self.deployed_inputs and groups:
            groups = [[m for group in groups for m in group]]
        fp_weights = None
        if self.fp_targets:  # what the full-precision stream computes with, whatever GPTQ writes
            fp_weights = {
                module: module.weight.detach().clone()
                for module in layer.modules()
                if module in self._layer_of
            }
        for group in groups:
            self._observe_activation_scales(layer, cache, group)
            self._rerun(layer, cache, group, fp_weights)
            self._quantize(state, event, group, **kwargs)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        for handle in self._propagation_hooks:
            handle.remove()
        self._propagation_hooks.clear()
        self._fp_hidden.clear()
        self._fp_inputs.clear()
        self._sqrt_weights.clear()
        self._layer_inputs.clear()
        self._scaled.clear()

    def _quantize(self, state: State, event: Event, modules, **kwargs) -> None:
        """The fit of ``modules`` from their gathered statistics: ``W*``, upstream's GPTQ, then
        their 4-bit activations on for everything computed after them."""
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
        for module in modules:  # what runs after them sees their 4-bit activations
            self._scaled.add(module)  # upstream has just stored the global scale, if any
            self._propagation_hooks.append(
                module.register_forward_pre_hook(self._propagate_quantized_input)
            )

    def _propagate_quantized_input(self, module, args):
        if self._capturing_fp:  # the full-precision stream stays full precision
            return None
        return (quantized_input(module, args[0], calibrated=module in self._scaled), *args[1:])

    # --- the layer's inputs, and its re-runs ---------------------------------------------------
    def _cache_layer_input(self, layer, args, kwargs):
        """Before the pipeline runs ``layer`` on the quantized stream: keep its inputs for the
        re-runs and run the full-precision stream through it.

        The FP hidden state of this batch is the previous layer's FP output, consumed here
        (the first layer's input is the embedding, identical in both streams). No hook sees the
        FP run: statistics and observers come from the re-runs.
        """
        batch = active_session().state.current_batch_idx
        hidden = None
        if self.fp_targets:
            previous = self._previous_layer.get(layer)
            hidden = args[0] if previous is None else self._fp_hidden.pop((previous, batch))
            self._capturing_fp = True
            try:
                with HooksMixin.disable_hooks():
                    output = layer.forward(hidden, *args[1:], **kwargs)
            finally:
                self._capturing_fp = False
            output = output[0] if isinstance(output, tuple) else output
            self._fp_hidden[(layer, batch)] = output.detach()
        self._layer_inputs.setdefault(layer, []).append((batch, args, kwargs, hidden))

    def _record_call(self, module, inp) -> None:
        """The layer's linears in call order, a new group wherever the input changes (linears
        that read one tensor cannot depend on each other)."""
        groups = self._groups.setdefault(self._layer_of[module], [])
        if any(module in group for group in groups):
            return
        if groups and inp is self._last_input:
            groups[-1].append(module)
        else:
            groups.append([module])
        self._last_input = inp

    def _observe_activation_scales(self, layer, cache, group) -> None:
        """Calibrated activation scales (NVFP4's global scale) from the deployed inputs: the
        observers are cleared of the pipeline's pass, fed one re-run, and the global scale is
        set from them (upstream computes the same value from them at the group's GPTQ)."""
        observed = [m for m in group if getattr(m, "input_observer", None) is not None]
        if not observed:
            return
        for module in observed:
            module.input_observer.delete_statistics(check_fused=False)
        self._rerun(layer, cache, observed, None, observe=True)
        self.sync_obs_act_stats(observed)
        for module in observed:
            global_scale = module.input_observer.get_global_scale()
            if global_scale is None:
                continue
            if is_source_process():
                update_offload_parameter(module, "input_global_scale", global_scale)
            else:
                module.input_global_scale.data = global_scale
            self._scaled.add(module)

    def _rerun(self, layer, cache, group, fp_weights, *, observe: bool = False) -> None:
        """Run ``layer`` over its cached inputs with only ``group``'s statistics hooks on:
        first the FP stream (FP weights, no activation quantization), then the quantized one."""
        state = active_session().state
        index = state.current_batch_idx
        # group is in call order: its last linear ends the re-run
        self._active, self._last_of_group, self._observing = frozenset(group), group[-1], observe
        try:
            with HooksMixin.disable_hooks(keep=self._linear_hooks):
                for batch, args, kwargs, hidden in cache:
                    state.current_batch_idx = batch
                    if fp_weights is not None:
                        self._capturing_fp = True
                        try:
                            self._run_to_group_end(layer, (hidden, *args[1:]), kwargs, fp_weights)
                        finally:
                            self._capturing_fp = False
                    self._run_to_group_end(layer, args, kwargs)
        finally:
            self._active, self._last_of_group, self._observing = None, None, False
            state.current_batch_idx = index

    @staticmethod
    def _run_to_group_end(layer, args, kwargs, weights=None) -> None:
        """Run ``layer`` until its group is done, with ``weights`` (module -> weight) swapped in.

        The swap sets ``.data`` on the onloaded parameters and puts them back, so nothing
        reaches the offloaded copies (``torch.func.functional_call`` was seen to leave the
        swapped tensor aliased to the module's weight, so GPTQ's write changed it too).
        """
        saved = {module: module.weight.data for module in weights or {}}
        try:
            for module, weight in (weights or {}).items():
                module.weight.data = weight
            layer(*args, **kwargs)
        except _GroupDone:
            pass
        finally:
            for module, weight in saved.items():
                module.weight.data = weight

    # --- statistics --------------------------------------------------------------------------
    def calibrate_module(self, module, args, _output):
        inp = args[0]
        if self._active is None and module in self._layer_of:
            self._record_call(module, inp)  # the pipeline's pass: the re-runs gather statistics
            return
        if self._active is not None and module not in self._active:
            return
        if self._observing:
            module.input_observer(inp)
        elif self._capturing_fp:
            self._fp_inputs[module] = inp
        else:
            self._accumulate(module, inp, args, _output)
        if module is self._last_of_group:
            raise _GroupDone

    def _accumulate(self, module, inp, args, _output) -> None:
        weights = self._token_weights(inp)
        quantized = quantized_input(module, inp, calibrated=module in self._scaled)
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
