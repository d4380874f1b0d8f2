"""The decoder layers of a model, found once for every stage and for evaluation.

The layers are found the way llm-compressor's sequential pipeline finds them
(``sequential_targets`` as given to ``oneshot``; default: the model's own ``_no_split_modules``,
LLaDA's ``LLaDABlock`` and Dream's ``DreamDecoderLayer``), so Stage II's modifier, the learned
rotations, FlatQuant and ``diagnose``'s per-layer scan all see the same layers in
the same order.
"""

from __future__ import annotations

from compressed_tensors.utils import match_named_modules
from torch import nn

__all__ = ["named_decoder_layers"]


def named_decoder_layers(model: nn.Module, sequential_targets=None) -> list[tuple[str, nn.Module]]:
    """``[(name, layer)]`` of the decoder layers in order (``sequential_targets`` as given to
    ``oneshot``; default: the model's own)."""
    # imported here: fair_calib_llmc.stage2.modifier needs this module, and importing
    # llm-compressor runs the hook that imports fair_calib_llmc.stage2.modifier
    # (fair_calib_llmc.registration)
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    targets = infer_sequential_targets(model, sequential_targets)
    layers = list(match_named_modules(model, targets))
    if not layers:
        raise ValueError(f"no decoder layers ({targets}) found in {type(model).__name__}")
    return layers
