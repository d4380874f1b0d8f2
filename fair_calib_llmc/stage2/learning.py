"""What every Stage II learner needs before it learns: calibration data with the weights it
asks for, the quantized layers to learn against (and their schemes' limits), and the two
context managers of its training loop (swapped forwards, frozen model parameters).

Shared by :class:`~fair_calib_llmc.stage2.learned_rotations.base.LearnedSpinQuantModifier` (and
its learner, :mod:`fair_calib_llmc.stage2.learned_rotations.learner`) and
:class:`~fair_calib_llmc.stage2.flatquant.base.FlatQuantModifier`.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from torch import nn

from fair_calib_llmc.stage2.learned_rotations.ste import LEARNABLE_STRATEGIES

__all__ = [
    "check_learning_data",
    "token_weights_of",
    "learnable_linears",
    "forwards_replaced",
    "frozen",
]


def check_learning_data(state, learner: str, token_weights: str) -> None:
    """Refuse, before any work, a run without calibration data, or one that asks for Stage I's
    frontier weights (``token_weights: frontier``) on data without a ``loss_mask`` column."""
    calib = getattr(state.data, "calib", None)
    first = next(iter(calib), None) if calib is not None else None
    if first is None:
        raise ValueError(
            f"{learner} learns on calibration data but got none; pass dataset= to oneshot "
            "(rows from fair_calib_llmc.build_calibration_dataset) or use "
            "fair_calib_llmc.quantize"
        )
    if token_weights == "frontier" and "loss_mask" not in first:
        raise ValueError(
            f"{learner}(token_weights: frontier) got no Stage I weights (no loss_mask column); "
            "build the data with fair_calib_llmc.build_calibration_dataset, or set "
            "token_weights: uniform"
        )


def token_weights_of(batch: dict, token_weights: str) -> torch.Tensor:
    """``(batch, tokens)`` weights of a calibration batch: its ``loss_mask`` for
    ``frontier``, ones for ``uniform`` (or where the batch has no ``loss_mask``)."""
    if token_weights == "uniform" or "loss_mask" not in batch:
        return torch.ones_like(batch["input_ids"], dtype=torch.float32)
    return batch["loss_mask"].float()


def learnable_linears(
    model: nn.Module, learner: str, *, weights_in_loop: bool, symmetric_weights: bool
) -> dict[nn.Module, tuple[QuantizationArgs | None, QuantizationArgs | None]]:
    """Each quantized linear layer's ``(activation args, weight args)`` to learn against
    (weight args ``None`` unless ``weights_in_loop``), from the schemes the quantization
    modifier after ``learner`` attached; schemes learning cannot follow fail here, in one
    line each, before any learning (``symmetric_weights``: learned clipping needs them)."""
    layers = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, nn.Linear) or scheme is None:
            continue
        acts, weights = scheme.input_activations, scheme.weights
        for kind, args in (("activation", acts), ("weight", weights)):
            if args is not None and args.strategy not in LEARNABLE_STRATEGIES:
                raise ValueError(
                    f"{name}: {kind} strategy {args.strategy} cannot be learned against "
                    f"(learning supports {[s.value for s in LEARNABLE_STRATEGIES]}, e.g. "
                    "W4A4_G128_PACKED)"
                )
        if acts is not None and not acts.dynamic:
            raise ValueError(
                f"{name}: static activation scales are calibrated after learning; learn "
                "against a scheme with dynamic activations (e.g. W4A4_G128_PACKED)"
            )
        if symmetric_weights and weights is not None and not weights.symmetric:
            raise ValueError(
                f"{name}: learned weight clipping clamps a symmetric range; the weight "
                "scheme is asymmetric: use a symmetric scheme (e.g. W4A4_G128_PACKED) or "
                "set learn_weight_clipping: false"
            )
        layers[module] = (acts, weights if weights_in_loop else None)
    if not layers:
        raise ValueError(
            f"{learner} found no quantized layers to learn against: put a quantization stage "
            "(FAIRCalibModifier, GPTQModifier, QuantizationModifier) after it in the same recipe"
        )
    return layers


class forwards_replaced:
    """Give each module in ``forwards`` the forward mapped to it, and put the original ones
    back (an instance attribute where there was one, e.g. compressed-tensors' wrapped
    forward; the class's otherwise)."""

    def __init__(self, forwards: dict[nn.Module, object]):
        self.forwards = forwards
        self.saved: dict[nn.Module, object] = {}

    def __enter__(self):
        for module, forward in self.forwards.items():
            self.saved[module] = module.__dict__.get("forward")
            module.forward = forward
        return self

    def __exit__(self, *exc):
        for module, forward in self.saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        return False


class frozen:
    """No gradients for the model's own parameters while the rotations learn."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False
