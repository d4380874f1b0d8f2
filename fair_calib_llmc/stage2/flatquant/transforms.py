"""Plain maths of the FlatQuant-class per-layer affine transforms.

FlatQuant (Sun et al., 2024) gives every decoder layer its own invertible affine transforms
of the linear layers' inputs, learned so the layer's 4-bit output matches the full-precision
one. A linear layer that reads an input transformed as ``x~ = (x / s) M`` computes the same
function with the weight ``W~ = W diag(s) M^-T`` (compressed-tensors' ``x W^T`` convention):

* ``s``: a per-channel smoothing scale, where the input is a norm's output: ``1 / s`` fuses
  into the norm's weight, so it costs nothing at inference;
* ``M = blockdiag(P, P, ...)``: one learned ``b x b`` invertible block ``P`` repeated along
  the width, the structure a compressed-tensors online transform holds (``head_dim: b``).
  FlatQuant's own Kronecker product ``P1 (x) P2`` has no compact compressed-tensors form; a
  block on top of the fused whole-width Hadamard rotation (R1) mixes locally what the
  Hadamard has already spread globally, at ``b`` multiply-adds per input element;
* ``T``: one ``head_dim x head_dim`` matrix per key/value head, fused into the value
  projection's output rows and the attention output's input columns (every query head that
  reads that value head): free at inference, it reshapes the ``o`` projection's input.

Where ``M`` and ``s`` act (the sites of one layer):

* ``attn``: the q / k / v input (after the attention norm, smoothing on);
* ``mlp``: the gate / up input (after the MLP norm, smoothing on);
* ``down``: the down-projection input, behind the elementwise product (no norm before it:
  no smoothing). No fused rotation reaches it, so its block starts at a Hadamard block (the
  blocked R4 of QuaRot) rather than at the identity.

While learning, every linear of the layer computes :func:`transformed_forward`, the fused
layer's forward with the deployed fake quantization; :func:`fused_weights` writes the same
weights once, in float64, when the layer is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from torch import nn

from fair_calib_llmc.stage2.flatquant.clipping import clip_weight
from fair_calib_llmc.stage2.learned_rotations.rotated_linear import rotate
from fair_calib_llmc.stage2.learned_rotations.ste import ste_quantize

#: the sites of one layer whose inputs carry a learned block
SITES = ("attn", "mlp", "down")

__all__ = [
    "SITES",
    "LayerTransforms",
    "SiteRole",
    "per_head",
    "transformed_forward",
    "fused_weights",
]


def per_head(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks[0], blocks[1], ...)`` over the last dimension, one block per
    head (``blocks``: ``(heads, d, d)``), in ``blocks``' precision, returned in ``x``'s."""
    heads, d, _ = blocks.shape
    grouped = x.to(blocks.dtype).unflatten(-1, (heads, d))
    return torch.einsum("...hd,hde->...he", grouped, blocks).flatten(-2).to(x.dtype)


class LayerTransforms(nn.Module):
    """The learnable transforms of one decoder layer. ``attn`` / ``mlp`` / ``vo`` start at the
    identity (the fused R1 / R2 Hadamards already flatten those inputs) and ``down`` at
    ``down_start``, so step 0 is the Hadamard-rotated model, quantized.

    :param hidden: the residual width (the q / k / v and gate / up input)
    :param intermediate: the down projection's input width
    :param head_dim: the attention head size
    :param kv_heads: key / value heads (one ``T`` each)
    :param block: ``b``, the repeated block of ``attn`` / ``mlp`` (divides ``hidden``)
    :param down_block: the repeated block of ``down`` (divides ``intermediate``)
    :param down_start: the ``down`` block's start (default: the identity)
    :param smooth: the sites (``attn``, ``mlp``) whose per-channel smoothing scales are
        learned (fused into the norm before them)
    :param learn_vo: learn the per-head value / output transforms
    :param activation_clipping: learn one clipping ratio per site's activation quantizer
        (FlatQuant's), applied while learning only (see :func:`transformed_forward`)
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        head_dim: int,
        kv_heads: int,
        block: int,
        down_block: int,
        down_start: torch.Tensor | None = None,
        smooth: tuple[str, ...] = ("attn", "mlp"),
        learn_vo: bool = True,
        activation_clipping: bool = False,
    ):
        super().__init__()
        self.attn = nn.Parameter(torch.eye(block))
        self.mlp = nn.Parameter(torch.eye(block))
        start = down_start if down_start is not None else torch.eye(down_block)
        self.down = nn.Parameter(start.detach().to(torch.float32).clone())
        self.attn_log_scale = nn.Parameter(torch.zeros(hidden)) if "attn" in smooth else None
        self.mlp_log_scale = nn.Parameter(torch.zeros(hidden)) if "mlp" in smooth else None
        self.vo = nn.Parameter(torch.eye(head_dim).repeat(kv_heads, 1, 1)) if learn_vo else None
        # sigmoid(4) = 0.98: FlatQuant's start, next to no clipping
        self.clip_logits = (
            nn.ParameterDict({site: nn.Parameter(torch.tensor(4.0)) for site in SITES})
            if activation_clipping
            else None
        )

    def site(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(P, s)`` of site ``attn``, ``mlp`` or ``down`` (``s`` None: no smoothing)."""
        scale = getattr(self, f"{name}_log_scale", None)
        return getattr(self, name), (scale.exp() if scale is not None else None)

    def activation_clip(self, name: str | None) -> torch.Tensor | None:
        """The learned clipping ratio of site ``name``'s activations (None: not learned)."""
        if self.clip_logits is None or name is None:
            return None
        return torch.sigmoid(self.clip_logits[name])


@dataclass(frozen=True)
class SiteRole:
    """What one linear layer of a decoder layer reads and writes.

    :param reads: the site of its input transform (``attn``, ``mlp``, ``down``) or None
    :param writes_values: the value projection (its output rows take ``T``)
    :param reads_values: the attention output projection (its input columns take ``T^-1``
        of each query head's value head; ``groups`` query heads share one)
    """

    reads: str | None = None
    writes_values: bool = False
    reads_values: bool = False
    groups: int = 1


def _weight_and_bias(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    role: SiteRole,
    transforms: LayerTransforms,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformed weight and bias of one linear layer (in ``weight``'s precision)."""
    if role.reads is not None:
        p, scale = transforms.site(role.reads)
        p = p.to(weight.dtype)
        if scale is not None:
            weight = weight * scale.to(weight.dtype)
        weight = rotate(weight, torch.linalg.inv(p).T)
    if role.writes_values and transforms.vo is not None:
        t = transforms.vo.to(weight.dtype)
        weight = per_head(weight.T, t).T
        bias = per_head(bias, t) if bias is not None else None
    if role.reads_values and transforms.vo is not None:
        t = transforms.vo.to(weight.dtype).repeat_interleave(role.groups, dim=0)
        weight = per_head(weight, torch.linalg.inv(t).mT)
    return weight, bias


def transformed_input(x: torch.Tensor, role: SiteRole, transforms: LayerTransforms):
    """``(x / s) M`` of the linear layer's site (``x`` itself where it reads none: the value
    transform reaches the output projection through the attention, not here)."""
    if role.reads is None:
        return x
    p, scale = transforms.site(role.reads)
    if scale is not None:
        x = x / scale.to(x.dtype)
    return rotate(x, p.to(x.dtype))


def transformed_forward(
    module: nn.Linear,
    role: SiteRole,
    transforms: LayerTransforms,
    act_args: QuantizationArgs | None,
    weight_args: QuantizationArgs | None,
    clip: torch.Tensor | None = None,
):
    """The forward of ``module`` as the transformed, fake-quantized layer computes it, in
    float32, with gradients to the transforms (and the clipping factors ``clip``).

    A learned activation clipping ratio ``r`` clamps each token to ``r`` times its absolute
    maximum before the dynamic quantizer, which then takes that as its range. No
    compressed-tensors field carries a ratio for dynamic activations, so the written model
    quantizes unclipped: learning with it is a diagnostic of what the ratio would buy."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        x32 = transformed_input(x.float(), role, transforms)
        bias = module.bias.float() if module.bias is not None else None
        weight, bias = _weight_and_bias(module.weight.float(), bias, role, transforms)
        ratio = transforms.activation_clip(role.reads)
        if ratio is not None and act_args is not None:
            bound = ratio * x32.detach().abs().amax(-1, keepdim=True)
            x32 = torch.maximum(torch.minimum(x32, bound), -bound)
        if act_args is not None:
            x32 = ste_quantize(module, x32, act_args)
        if weight_args is not None:
            if clip is not None:
                weight = clip_weight(weight, clip, weight_args)
            weight = ste_quantize(module, weight, weight_args)
        return F.linear(x32, weight, bias).to(x.dtype)

    return forward


@torch.no_grad()
def fused_weights(
    module: nn.Linear, role: SiteRole, transforms: LayerTransforms
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s transformed weight and bias, computed in float64, in their own dtypes."""
    bias = module.bias.double() if module.bias is not None else None
    weight, new_bias = _weight_and_bias(module.weight.double(), bias, role, transforms)
    weight = weight.to(module.weight.dtype).contiguous()
    return weight, (new_bias.to(module.bias.dtype) if new_bias is not None else None)
