"""Token weights that follow the decision: how much each hidden state moves the frontier.

The ``state`` prior puts a frontier decision's weight on the token being decided. But a
decision is made from every position's hidden state: the keys and values of the context it
attends to, the tokens committed just before it. This module measures that directly, with
one backward pass of the full-precision teacher per calibration batch:

    L = sum_i a_i * -log p(x_i | state),     s_t = mean_l || dL / dh_t^(l) ||^2

``a_i`` is the frontier weight of answer position ``i`` (nonzero only where the teacher's
rollout commits ``i`` at this step or within the lookahead, and ``i`` is still masked), ``x_i``
the token the teacher committed there, and ``h_t^(l)`` the input of decoder layer ``l`` at
position ``t``. ``s_t`` is the diagonal of the empirical Fisher of the frontier decisions
with respect to that hidden state: to second order, how much the frontier's log-likelihood
changes when quantization noise lands on token ``t``, averaged over the layers (one weight per
token serves every layer, as ``loss_mask`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fair_calib_llmc.models.family import DiffusionLMSpec, align_logits
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.stage1.prior import PositionPrior
from fair_calib_llmc.stage1.sources import CalibrationRows

__all__ = ["SensitivityWeights", "layer_sensitivity"]


@dataclass
class SensitivityWeights:
    """The ``sensitivity`` weight source (:mod:`fair_calib_llmc.stage1.sources`): a token
    weighs ``1 + frontier_weight * s_t / max_t s_t`` in its state, ``s_t`` its sensitivity
    (module docstring) to the state's frontier decisions, which ``frontier`` weighs
    (:meth:`PositionPrior.decision_weights`). The gradients already sit on the deciding
    columns, so no shift is applied.

    :param frontier: the frontier prior of the states' rollouts
    :param model: the full-precision teacher that takes the backward passes
    """

    frontier: PositionPrior
    model: nn.Module

    def row_weights(self, rows: CalibrationRows) -> torch.Tensor:
        if not rows.states:
            raise ValueError(
                "the sensitivity prior weighs masked-stage states, not clean text; set "
                "stage1.prior.source: position (or uniform), or stage1.inputs: states"
            )
        decided = torch.cat([trace.sequences.cpu() for trace, _ in rows.states])
        decisions = torch.cat(
            [self.frontier.decision_weights(trace, step) for trace, step in rows.states]
        )
        sensitivity = layer_sensitivity(
            self.model, rows.input_ids, decided, decisions, rows.spec
        ).mean(0)  # one weight per token serves every layer
        peak = sensitivity.amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return 1 + self.frontier.settings.frontier_weight * sensitivity / peak


def layer_sensitivity(
    model: nn.Module,
    states: torch.Tensor,
    targets: torch.Tensor,
    position_weights: torch.Tensor,
    spec: DiffusionLMSpec,
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """``(layers, N, L)`` squared gradient norm of the weighted frontier loss with respect to
    every decoder layer's input hidden state of ``states`` (``(N, L)`` token ids; see the
    module docstring). Its mean over layers is the per-token sensitivity ``s_t``.

    :param targets: ``(N, L)`` the token the teacher decided at each position
    :param position_weights: ``(N, L)`` the frontier weight ``a_i`` of each position's decision
        (0 where nothing is decided)
    """
    if not states.shape == targets.shape == position_weights.shape:
        raise ValueError(
            f"states {tuple(states.shape)}, targets {tuple(targets.shape)} and position "
            f"weights {tuple(position_weights.shape)} must have the same (N, L) shape"
        )
    layers = [layer for _, layer in named_decoder_layers(model)]
    device = next(model.parameters()).device
    inputs: list[torch.Tensor] = []

    def keep_input(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden)

    handles = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers]
    out = []
    try:
        for start in range(0, len(states), batch_size):
            rows = slice(start, start + batch_size)
            ids = states[rows].to(device)
            weight = position_weights[rows].to(device, torch.float32)
            inputs.clear()
            with torch.enable_grad():
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = align_logits(model(inputs_embeds=embeds).logits.float(), spec)
                logits[..., spec.mask_token_id] = float("-inf")  # never an answer (sampling)
                log_p = logits.log_softmax(-1)
                chosen = log_p.gather(-1, targets[rows].to(device).unsqueeze(-1)).squeeze(-1)
                loss = -(weight * chosen).sum()
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            out.append(
                torch.stack(
                    [
                        torch.zeros(ids.shape) if g is None else g.float().pow(2).sum(-1).cpu()
                        for g in grads
                    ]
                )
            )
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
    return torch.cat(out, dim=1)
