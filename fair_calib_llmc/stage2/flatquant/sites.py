"""Where the transforms of one decoder layer act, from the family's SpinQuant mappings.

The per-family module names are spelled in the family registry
(:mod:`fair_calib_llmc.models.registry`) and registered by :mod:`fair_calib_llmc.stage2.rotations`
as the mappings llm-compressor's ``SpinQuantModifier`` reads: q / k / v / o, the MLP inputs and
output, and which norm feeds which linears. This module only groups them by decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressed_tensors import match_named_modules
from llmcompressor.modifiers.transform.spinquant.mappings import SpinQuantMapping
from llmcompressor.modifiers.transform.spinquant.norm_mappings import NormMapping
from torch import nn

from fair_calib_llmc.stage2.flatquant.transforms import SiteRole

__all__ = ["LayerSites", "layer_sites"]


@dataclass
class LayerSites:
    """The modules of one decoder layer the transforms touch, by name."""

    roles: dict[str, SiteRole] = field(default_factory=dict)
    #: site -> the linears that read it (one online transform group each)
    readers: dict[str, list[str]] = field(default_factory=dict)
    #: site -> the norm whose weight takes the smoothing scale
    norms: dict[str, str] = field(default_factory=dict)
    head_dim: int = 0
    kv_heads: int = 0


def _one(model: nn.Module, pattern: str, prefix: str) -> list[str]:
    return [n for n, _ in match_named_modules(model, [pattern]) if n.startswith(prefix)]


def layer_sites(
    model: nn.Module,
    layer_name: str,
    mapping: SpinQuantMapping,
    norms: list[NormMapping],
) -> LayerSites:
    """The sites of decoder layer ``layer_name``; raises a ValueError naming what is
    missing when the mappings do not describe the layer."""
    prefix = f"{layer_name}."
    q, k, v = (_one(model, p, prefix) for p in (mapping.attn_q, mapping.attn_k, mapping.attn_v))
    o = _one(model, mapping.attn_o, prefix)
    mlp_in = [n for p in mapping.mlp_in for n in _one(model, p, prefix)]
    down = [n for p in mapping.mlp_out for n in _one(model, p, prefix)]
    if not (len(q) == len(k) == len(v) == len(o) == len(down) == 1 and mlp_in):
        raise ValueError(
            f"{layer_name}: the rotation mappings found q {q}, k {k}, v {v}, o {o}, mlp in "
            f"{mlp_in}, down {down}; FlatQuantModifier needs exactly one of each per layer "
            "(spell the family's mappings in fair_calib_llmc.models.registry)"
        )
    config = model.config
    query = model.get_submodule(q[0])
    head_dim = query.out_features // config.num_attention_heads
    kv_heads = model.get_submodule(v[0]).out_features // head_dim
    groups = config.num_attention_heads // kv_heads
    sites = LayerSites(head_dim=head_dim, kv_heads=kv_heads)
    for name in (*q, *k):
        sites.roles[name] = SiteRole(reads="attn")
    sites.roles[v[0]] = SiteRole(reads="attn", writes_values=True)
    sites.roles[o[0]] = SiteRole(reads_values=True, groups=groups)
    for name in mlp_in:
        sites.roles[name] = SiteRole(reads="mlp")
    sites.roles[down[0]] = SiteRole(reads="down")
    sites.readers = {"attn": [*q, *k, *v], "mlp": mlp_in, "down": down}
    for norm in norms:
        found = _one(model, norm.norm, prefix)
        linears = {n for p in norm.linears for n in _one(model, p, prefix)}
        for site in ("attn", "mlp"):
            if found and linears == set(sites.readers[site]):
                sites.norms[site] = found[0]
    return sites
