"""What the samplers, metrics and calibration need to know about a dLLM family.

A diffusion LM differs from a causal LM in two ways that matter here: which token id means
"masked", and which logit column predicts which position (LLaDA: the same position; Dream:
the next one, inherited from its autoregressive parent). :func:`diffusion_spec` reads both off
a model (and its tokenizer) and rejects anything that is not a supported dLLM before any
expensive work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn

from fair_calib_llmc.models.registry import FAMILIES, family_of

__all__ = ["DiffusionLMSpec", "diffusion_spec", "align_logits", "denoiser_logits"]


@dataclass(frozen=True)
class DiffusionLMSpec:
    """Family facts of one model: its family's name (a key of
    :data:`~fair_calib_llmc.models.registry.FAMILIES`), mask token and logit alignment."""

    family: str
    mask_token_id: int
    shift_logits: bool


def diffusion_spec(
    model: nn.Module, tokenizer=None, *, mask_token_id: int | None = None
) -> DiffusionLMSpec:
    """Return the :class:`DiffusionLMSpec` of ``model`` or raise a ``ValueError`` naming the fix.

    The mask token is, in this order: ``mask_token_id`` (an explicit override, e.g. the
    lm-eval model's argument), ``config.mask_token_id``, the tokenizer's mask token. It is
    never guessed, and never written into the config: the spec carries it, so compute the
    spec once per run (where model and tokenizer are at hand) and pass it down.
    :func:`fair_calib_llmc.quantize` states it in the saved checkpoint's ``config.json``.
    """
    config = getattr(model, "config", None)
    family = family_of(config) if config is not None else None
    if family is None:
        kind = getattr(config, "model_type", None)
        known = ", ".join(
            f"{f.model_class}: model_type {f.model_type!r}" for f in FAMILIES.values()
        )
        raise ValueError(
            f"{type(model).__name__} (model_type={kind!r}) is not a diffusion language model. "
            f"fair_calib_llmc quantizes masked-diffusion LMs ({known}); causal "
            "(autoregressive) LMs decode left to right and have no write frontier. Load a "
            "checkpoint of one of these (import fair_calib_llmc first so AutoModel knows "
            "these types), or use llm-compressor's own recipes for causal models."
        )
    mask_id = mask_token_id
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None and tokenizer is not None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is not None:
            logger.info(
                f"config.mask_token_id is not set: using the tokenizer's mask token "
                f"{tokenizer.mask_token!r} (id {mask_id})"
            )
    if mask_id is None:
        public = ", ".join(f"{f.checkpoint}: {f.mask_token_id}" for f in FAMILIES.values())
        raise ValueError(
            f"{type(model).__name__} has no mask token: neither config.mask_token_id nor the "
            "tokenizer's mask_token is set. Set config.mask_token_id to the id the model was "
            f"trained with ({public}) or add a mask_token to the tokenizer."
        )
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= int(mask_id) < vocab:
        raise ValueError(
            f"mask_token_id={mask_id} is outside the embedding table (size {vocab}); "
            "set config.mask_token_id to the model's real mask token."
        )
    return DiffusionLMSpec(
        family=family.name, mask_token_id=int(mask_id), shift_logits=family.shift_logits
    )


def align_logits(logits: torch.Tensor, spec: DiffusionLMSpec) -> torch.Tensor:
    """Make ``logits[:, i]`` the prediction for position ``i`` (Dream's shift by one)."""
    if not spec.shift_logits:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


@torch.no_grad()
def denoiser_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: DiffusionLMSpec,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising call: float32 logits aligned so column ``i`` predicts position ``i``.

    The mask token is never a valid answer, so its logit is set to ``-inf``; otherwise an
    untrained or quantized model could "commit" a mask and a position would be decided twice.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = align_logits(logits.float(), spec)
    logits[..., spec.mask_token_id] = float("-inf")
    return logits
