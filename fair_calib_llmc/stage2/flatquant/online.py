"""A learned transform that cannot be fused, saved as an ordinary compressed-tensors transform.

A transform on a linear layer's input whose writer cannot absorb it (the down-projection input
sits behind the elementwise ``act(gate) * up``) runs online, ``x -> x P``. FlatQuant's per-site
blocks ``P`` (``b x b``, block-diagonal over the width, compressed-tensors' ``head_dim``) each
get a transform group of their own: compressed-tensors' factories share one weight between
all modules of equal size inside a group, so one group would hold one matrix.

The saved type is ``random-hadamard`` with the stored weight ``sqrt(b) P``, because that is
the one type that means "this stored matrix, over sqrt(b)" everywhere it loads:

* compressed-tensors (``HadamardTransform.forward``) divides the stored weight by
  ``sqrt(size)`` for ``hadamard`` and ``random-hadamard``, and loads it from the checkpoint;
* vLLM (``compressed_tensors/transform/module.py``, ``HadamardTransform``) divides every
  stored transform by ``sqrt(size)`` after loading, then runs ``hadacore_transform`` for type
  ``hadamard`` (which recomputes a Sylvester matrix and ignores the stored values) and a dense
  GEMM for every other type;
* so ``hadamard`` would lose the learned values in vLLM, and ``random-matrix`` (not divided in
  compressed-tensors, divided in vLLM) would mean two different functions.
"""

from __future__ import annotations

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.transform import TransformArgs, TransformFactory, TransformScheme
from compressed_tensors.transform.utils.hadamard import (
    deterministic_hadamard_matrix,
    random_hadamard_matrix,
)
from torch import nn

__all__ = [
    "SAVED_TYPE",
    "hadamard_start",
    "attach_online_transform",
    "record_transform_groups",
]

#: the transform type a learned online transform is saved as (see the module docstring)
SAVED_TYPE = "random-hadamard"


def hadamard_start(size: int, transform_type: str, seed: int = 0) -> torch.Tensor:
    """An orthonormal ``size x size`` Hadamard in float64, of the recipe's ``transform_type``
    (``hadamard``: Sylvester, a power of two; ``random-hadamard``: seeded, known sizes)."""
    if transform_type == "hadamard":
        matrix = deterministic_hadamard_matrix(size, torch.float64)
    else:
        generator = torch.Generator().manual_seed(seed)
        matrix = random_hadamard_matrix(size, torch.float64, gen=generator)
    return matrix / size**0.5


@torch.no_grad()
def attach_online_transform(
    model: nn.Module, names: list[str], p: torch.Tensor, group: str, precision: torch.dtype
) -> TransformScheme:
    """Attach ``x -> x blockdiag(p)`` to the inputs of the linear layers ``names`` (one
    weight shared by all of them), as the transform group ``group``, for any invertible
    ``p``. Nothing is fused here: compressed-tensors' weight-side inverse is the transpose,
    right only for a rotation, so the caller has already written ``W p^-T`` into the weights
    (in float64). Returns the scheme to record in the model's ``transform_config``; a reload
    rebuilds the transform and loads ``p``."""
    modules = [model.get_submodule(name) for name in names]
    size = p.shape[0]
    widths = {module.in_features for module in modules}
    if len(widths) != 1:
        raise ValueError(f"{names} have different input widths {sorted(widths)}")
    scheme = TransformScheme(
        type=SAVED_TYPE,
        precision=precision,
        head_dim=size if size != widths.pop() else None,
        apply=[TransformArgs(targets=list(names), location="input")],
    )
    factory = TransformFactory.from_scheme(scheme, name=group)
    stored = p.detach().to(modules[0].weight.device, torch.float64) * size**0.5
    factory.weights[(size,)] = nn.Parameter(stored.to(precision), requires_grad=False)
    factory.apply_to_model(model, use_tqdm=False)
    return scheme


def record_transform_groups(model: nn.Module, groups: dict[str, TransformScheme]) -> None:
    """Add attached transform groups to the model's ``transform_config`` (which the
    rotation modifier's ``apply_transform_config`` put there, and the checkpoint's
    ``quantization_config`` holds), after the groups already in it."""
    config = getattr(model, TRANSFORM_CONFIG_NAME)
    merged = {**config.config_groups, **groups}
    setattr(model, TRANSFORM_CONFIG_NAME, config.model_copy(update={"config_groups": merged}))
