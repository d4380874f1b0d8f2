"""``FAIRCalibModifier``: FAIR-Calib Stage II inside llm-compressor's sequential pipeline.

FAIR-Calib is GPTQ fitted to what a dLLM decides on. Compared with ``GPTQModifier`` it

* accumulates a **frontier-weighted Hessian** ``H = sum_t w_t x_t x_t^T`` (``w_t`` = the
  per-token ``loss_mask`` built by Stage I, :mod:`fair_calib_llmc.calibration`), by scaling
  each token's input by ``sqrt(w_t)`` before llm-compressor's own ``accumulate_hessian``;
* searches **weight clipping** per output channel to minimise the weighted layer-output error
  ``(W - Q) H (W - Q)^T`` before GPTQ runs with the chosen ranges (int weights);
* **propagates with W4A4 on**: llm-compressor disables quantization while it feeds a layer's
  outputs to the next one; FAIR-Calib re-enables it on each calibrated layer, so later layers
  calibrate on the activations the quantized model really produces.

Stage I (teacher rollouts and the position prior) runs before ``oneshot`` because it needs
the sampler; its coefficients live here so one recipe describes the whole method, and
:func:`fair_calib_llmc.pipeline.quantize` reads them from the recipe. No diffusion rollouts
happen in Stage II.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import enable_quantization
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
from compressed_tensors.utils import getattr_chain
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization.calibration import observe, update_qparams
from llmcompressor.observers import ACTIVATION_OBS
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.prior import PriorSettings
from fair_calib_llmc.schemes import check_scheme_name

__all__ = ["FAIRCalibModifier", "check_finite_weights"]


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise a ValueError naming the parameters that hold NaN or Inf."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"the model has NaN/Inf weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "fix or re-download the checkpoint before quantizing"
        )


class FAIRCalibModifier(GPTQModifier):
    """Frontier-Aware Instability-Reweighted Calibration (W4A4) for diffusion LMs.

    Sample yaml::

        fair_stage:
          fair_modifiers:
            FAIRCalibModifier:
              scheme: W4A4_G128_PACKED
              targets: [Linear]
              ignore: ["re:^model\\.transformer\\.ff_out$", "lm_head"]
              prior: {frontier_weight: 4.0, stability_lag: 2}
              sampler: {steps: 32, gen_length: 32, block_length: 32}

    :param prior: Stage I coefficients (:class:`~fair_calib_llmc.prior.PriorSettings`)
    :param sampler: Stage I sampler settings for the model family's own sampler; ``None``
        picks :func:`default_sampler_settings`
    :param prompt_length: tokens of calibration text used as the rollout prompt
    :param states_per_prompt: masked-stage states kept per rollout (evenly spaced steps)
    :param clip_search: search per-channel weight clipping on the weighted layer output
    :param clip_ratios: candidate clipping ratios of the min/max range (1.0 = no clipping)
    :param quantized_propagation: feed later layers the outputs of the W4A4 (not FP) layers
    :param require_token_weights: refuse to calibrate without Stage I weights (loss masks)
    """

    prior: PriorSettings = Field(default_factory=PriorSettings)
    sampler: dict | None = None
    prompt_length: int = Field(32, gt=0)
    states_per_prompt: int = Field(4, gt=0)
    clip_search: bool = True
    clip_ratios: list[float] = Field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    quantized_propagation: bool = True
    require_token_weights: bool = True

    _sqrt_weights: dict = PrivateAttr(default_factory=dict)

    @field_validator("scheme", mode="before")
    @classmethod
    def _known_scheme(cls, value):
        if isinstance(value, str):
            return check_scheme_name(value)
        return value

    @field_validator("clip_ratios")
    @classmethod
    def _valid_ratios(cls, value):
        if not value or any(not 0 < r <= 1 for r in value):
            raise ValueError("clip_ratios must be a non-empty list of ratios in (0, 1]")
        return sorted(set(value), reverse=True)

    # --- lifecycle ------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        diffusion_spec(state.model)  # a causal or mask-less model fails here, before any work
        check_finite_weights(state.model)
        return super().on_initialize(state, **kwargs)

    def calibrate_module(self, module, args, _output):
        inp = args[0]
        weights = self._token_weights(inp.device)
        if weights is None and self.require_token_weights:
            # checked here: the sequential pipeline fills state.loss_masks after
            # CALIBRATION_START, right before the first calibration batch
            raise ValueError(
                "FAIRCalibModifier got no per-token frontier weights. Build masked-stage "
                "calibration data with fair_calib_llmc.build_calibration_dataset and call "
                "oneshot(..., use_loss_mask=True), or use fair_calib_llmc.quantize which does "
                "both; set require_token_weights: false to calibrate unweighted."
            )
        if weights is not None:
            if weights.shape != inp.shape[:-1]:
                raise ValueError(
                    f"loss_mask shape {tuple(weights.shape)} does not match the layer input "
                    f"{tuple(inp.shape[:-1])}; keep loss_mask aligned with input_ids"
                )
            inp = inp * weights.to(inp.dtype).unsqueeze(-1)
        super().calibrate_module(module, (inp, *args[1:]), _output)

    def _token_weights(self, device: torch.device) -> torch.Tensor | None:
        """``sqrt(loss_mask)`` of the current batch on ``device``, computed once per batch
        (every hooked linear of a layer sees the same batch)."""
        state = active_session().state
        masks = getattr(state, "loss_masks", None)
        index = getattr(state, "current_batch_idx", -1)
        if not masks or index is None or index < 0:
            return None
        key = (index, device)
        if key not in self._sqrt_weights:
            self._sqrt_weights.clear()
            self._sqrt_weights[key] = masks[index].to(device, torch.float32).sqrt()
        return self._sqrt_weights[key]

    def _check_finite_hessians(self, modules) -> None:
        """NaN/Inf activations poison the Hessian: one check per layer, not per batch."""
        for module in modules:
            if module in self._hessians and not torch.isfinite(self._hessians[module]).all():
                raise FloatingPointError(
                    f"NaN/Inf activations entered {self._module_names.get(module, module)}; "
                    "check the checkpoint and the calibration inputs (fp16 overflow?)"
                )

    def on_sequential_epoch_end(self, state: State, event: Event, modules, **kwargs):
        modules = [m for m in modules if is_module_quantized(m)]
        self._check_finite_hessians(modules)
        observe(modules, base_name="weight")
        if self.clip_search:
            for module in modules:
                if module in self._hessians:
                    self._search_clipping(module)
        self.sync_obs_act_stats(modules)
        update_qparams(modules, ACTIVATION_OBS)
        self.compress_modules()
        if self.quantized_propagation:
            for module in modules:
                enable_quantization(module)

    # --- weighted clipping search ----------------------------------------------------------
    @torch.no_grad()
    def _search_clipping(self, module: torch.nn.Module) -> None:
        """Shrink the weight observer's min/max per output channel to the ratio with the
        lowest weighted output error ``diag((W - Q) H (W - Q)^T)``."""
        args = getattr_chain(module, "quantization_scheme.weights", None)
        observer = getattr(module, "weight_observer", None)
        if args is None or observer is None or args.type != "int":
            return  # fp4 scales depend on fused global scales; leave them to the observer
        lo, hi = observer.min_vals, observer.max_vals
        weight = module.weight.float()
        hessian = self._hessians[module].to(weight.device) / self._num_samples[module].clamp(min=1)
        best_err = torch.full((weight.shape[0],), float("inf"), device=weight.device)
        best = torch.ones_like(best_err)
        for ratio in self.clip_ratios:
            scale, zero_point = calculate_qparams(lo * ratio, hi * ratio, args)
            error = weight - fake_quantize(weight, scale, zero_point, args)
            err = ((error @ hessian) * error).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, ratio), best)
        shape = (-1,) + (1,) * (lo.dim() - 1)
        observer.min_vals = lo * best.view(shape).to(lo.dtype)
        observer.max_vals = hi * best.view(shape).to(hi.dtype)
        logger.debug(
            f"{self._module_names.get(module)}: clip ratio mean {best.mean():.3f} "
            f"min {best.min():.2f}"
        )


ModifierFactory.register("FAIRCalibModifier", FAIRCalibModifier)
