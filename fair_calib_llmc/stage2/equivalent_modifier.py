"""``EquivalentRescaleModifier``: the tie-noise control, for every recipe.

Two quantized models that compute the same full-precision function flip different decisions
once quantized, because rounding decisions (and ties) fall differently. The control row of a
recipe is that recipe with this modifier listed first: an equivalent model, the same pipeline.
It needs no rotation of the residual stream and no RMSNorm weights fused into the next linears
(either would change how weights quantize by itself), so it composes with rotated and
unrotated pipelines alike (``ExactSpinQuantModifier``, ``FlatQuantModifier``, GPTQ, RTN). It
folds seeded per-channel scales ``s = 1 + eps z`` into every decoder layer's MLP up projection
rows and down projection input columns, and into the value projection rows and the output
projection columns (every query head's copy under grouped-query attention), the maths in
:mod:`fair_calib_llmc.stage2.equivalent`.
Which modules those are comes from the SpinQuant mappings (``attn_v``, ``attn_o``, ``mlp_out``)
and :data:`~fair_calib_llmc.stage2.rotations.MLP_UP_REGISTRY` (which ``mlp_in`` is the up one,
the registry's ``FamilySpec.mlp_up``).

The rescale runs once, at ``on_calibration_start``, as ``ExactSpinQuantModifier`` fuses its
rotations: the sequential and the data-free pipeline both send that event before any weight is
observed, to the modifiers in recipe order, and llm-compressor's default independent pipeline
runs each modifier's own pipeline in turn (this one's is data-free); quantization modifiers only
attach their schemes at ``on_initialize`` and observe weights later (RTN and GPTQ alike). It
must come before any online transform on these layers (a block Hadamard on the down
projection's input does not commute with the scales): put it first in the recipe; it refuses
otherwise.
"""

from __future__ import annotations

import torch
from compressed_tensors.transform import TransformBase, TransformLocation
from compressed_tensors.utils import get_head_dim, match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.transform.spinquant.mappings import SPINQUANT_MAPPING_REGISTRY
from loguru import logger
from pydantic import PrivateAttr, field_validator
from torch import nn

from fair_calib_llmc.distributed import shared_weights_written_once
from fair_calib_llmc.models.layers import named_decoder_layers
from fair_calib_llmc.stage2.equivalent import channel_scales, rescale_pair
from fair_calib_llmc.stage2.rotations import MLP_UP_REGISTRY

__all__ = ["EquivalentRescaleModifier", "RescalePair", "rescale_pairs"]

#: (writer name, reader name, head_dim: set for value -> output, None for up -> down)
RescalePair = tuple[str, str, int | None]


def rescale_pairs(model: nn.Module) -> list[RescalePair]:
    """Every decoder layer's (value, output) and (up, down) projection pair, in layer order."""
    architecture = type(model).__name__
    mapping = SPINQUANT_MAPPING_REGISTRY.get(architecture)
    up = MLP_UP_REGISTRY.get(architecture)
    if mapping is None or up is None:
        raise ValueError(
            f"EquivalentRescaleModifier has no layer mapping for {architecture} (it knows "
            f"{sorted(MLP_UP_REGISTRY)}); add its family, with its SpinQuant mapping and its up "
            "projection, to fair_calib_llmc.models.registry"
        )
    head_dim = get_head_dim(model.config)
    roles = {"v": [mapping.attn_v], "o": [mapping.attn_o], "up": [up], "down": mapping.mlp_out}
    found = {role: list(match_named_modules(model, t)) for role, t in roles.items()}
    pairs = []
    for layer, _ in named_decoder_layers(model):
        here = {
            role: [name for name, _ in named if name.startswith(f"{layer}.")]
            for role, named in found.items()
        }
        if any(len(names) != 1 for names in here.values()):
            raise ValueError(
                f"{layer}: EquivalentRescaleModifier needs one value, output, up and down "
                f"projection per decoder layer, found {here}"
            )
        pairs += [(here["v"][0], here["o"][0], head_dim), (here["up"][0], here["down"][0], None)]
    return pairs


class EquivalentRescaleModifier(Modifier):
    """Fold seeded channel scales into value/output and up/down pairs (see module docstring).

    Sample yaml (first in the recipe, the quantization stage after it unchanged)::

        equivalent_stage:
          equivalent_modifiers:
            EquivalentRescaleModifier:
              eps: 0.01
              seed: 0

    :param eps: the scales' relative spread, ``s = 1 + eps z`` (``z`` standard Gaussian);
        the full-precision function does not depend on it, the rounding decisions do. How
        many codes an eps re-rolls: ``integration/equivalent_reroll.py`` (docs/results.md);
        much smaller eps fall below bf16's resolution, where bf16 weights keep their codes
    :param seed: the seed of ``z`` (one generator, drawn pair by pair in layer order)
    """

    eps: float = 1e-2
    seed: int = 0

    _pairs: list[RescalePair] = PrivateAttr(default_factory=list)
    _done: bool = PrivateAttr(default=False)

    @field_validator("eps")
    @classmethod
    def _positive_eps(cls, eps: float) -> float:
        if not eps > 0:
            raise ValueError(
                f"eps must be > 0 (got {eps}): the scales are 1 + eps*z; set a small positive "
                "eps such as 0.01, or drop EquivalentRescaleModifier from the recipe"
            )
        return eps

    def on_initialize(self, state: State, **kwargs) -> bool:
        self._pairs = rescale_pairs(state.model)  # an unknown layout fails before any work
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self._done:  # exactly once, whatever sends the event again
            return
        model = state.model
        self._check_no_online_transform(model)
        generator = torch.Generator().manual_seed(self.seed)
        with shared_weights_written_once():  # under torchrun: written once, not once per rank
            for writer, reader, head_dim in self._pairs:
                writer_module = model.get_submodule(writer)
                scales = channel_scales(writer_module.out_features, self.eps, generator)
                rescale_pair(writer_module, model.get_submodule(reader), scales, head_dim)
        self._done = True
        logger.info(
            f"EquivalentRescaleModifier: folded channel scales 1 + {self.eps:g} z (seed "
            f"{self.seed}) into {len(self._pairs)} module pairs"
        )

    def _check_no_online_transform(self, model: nn.Module) -> None:
        """The scales commute with nothing applied online between a writer's output and its
        reader's input (a rotation listed earlier in the recipe, e.g. a block Hadamard on
        every linear's input): such a layer fails here, before any scale is folded."""
        for writer, reader, _ in self._pairs:
            for name, location in (
                (writer, TransformLocation.OUTPUT),
                (reader, TransformLocation.INPUT),
            ):
                transforms = model.get_submodule(name).children()
                if any(
                    isinstance(t, TransformBase) and t.args.location == location for t in transforms
                ):
                    raise ValueError(
                        f"{name} already carries an online {location.value} transform, which "
                        "the channel scales do not commute with; list EquivalentRescaleModifier "
                        "first in the recipe, before the rotation modifiers"
                    )


ModifierFactory.register("EquivalentRescaleModifier", EquivalentRescaleModifier)
