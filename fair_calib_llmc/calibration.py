"""Diffusion-aware calibration data: masked-stage states with per-token frontier weights.

A causal LM is calibrated on text; a dLLM never sees clean text at inference, only partially
masked answers. This module turns raw calibration text into exactly those inputs:

1. cut a prompt of ``prompt_length`` tokens from each text;
2. run the full-precision teacher with its real sampler on the prompts (Stage I rollouts);
3. estimate the :class:`~fair_calib_llmc.prior.PositionPrior` from the traces;
4. emit ``states_per_prompt`` masked-stage states per rollout (``input_ids`` with mask tokens
   where the answer is still masked at that step) with the prior's per-token weight as a float
   ``loss_mask``.

The result is an ordinary ``datasets.Dataset`` (``input_ids``, ``attention_mask``,
``loss_mask``) for ``llmcompressor.oneshot(dataset=..., use_loss_mask=True)``. The FP
hidden-state targets are the teacher's own activations on these ``input_ids``, which the
sequential pipeline computes layer by layer. For Dream, whose logit column ``i - 1``
predicts position ``i``, weights move one column left so they land on the hidden state that
makes the decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset
from loguru import logger

from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.prior import PositionPrior, PriorSettings, estimate_prior, normalise_weights
from fair_calib_llmc.sampling import SamplerBase, teacher_traces

__all__ = ["prompts_from_texts", "build_calibration_dataset"]


def prompts_from_texts(
    texts: Sequence[str], tokenizer, prompt_length: int, max_prompts: int | None = None
) -> list[torch.Tensor]:
    """The first ``prompt_length`` tokens of every text that has that many."""
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_length:
            prompts.append(torch.tensor(ids[:prompt_length]))
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ValueError(
            f"the calibration set is empty or too short: none of its {len(texts)} texts has "
            f"{prompt_length} tokens. Pass longer texts or lower prompt_length."
        )
    return prompts


def build_calibration_dataset(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    sampler: SamplerBase,
    prior_settings: PriorSettings | None = None,
    prompt_length: int = 32,
    states_per_prompt: int = 4,
    max_prompts: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, PositionPrior]:
    """Stage I: teacher rollouts -> position prior -> weighted masked-stage states."""
    spec = diffusion_spec(model, tokenizer)
    settings = prior_settings or PriorSettings()
    prompts = prompts_from_texts(texts, tokenizer, prompt_length, max_prompts)
    if states_per_prompt < 1 or states_per_prompt > sampler.steps:
        raise ValueError(
            f"states_per_prompt must be between 1 and the sampler's steps ({sampler.steps})"
        )
    logger.info(f"Stage I: {len(prompts)} teacher rollouts, {sampler!r}")
    rollouts = teacher_traces(model, sampler, prompts, seed=seed)
    prior = estimate_prior([trace for _, trace in rollouts], settings)

    picks = torch.linspace(0, sampler.steps - 1, states_per_prompt).round().long().unique()
    input_ids, weights = [], []
    for _, trace in rollouts:
        states = trace.states(spec.mask_token_id).cpu()
        for step in picks.tolist():
            raw = prior.raw_weights(trace, step)
            if spec.shift_logits:  # column i-1 decides position i
                raw = torch.cat([raw[:, 1:], torch.ones_like(raw[:, :1])], dim=1)
            input_ids.extend(states[step])
            weights.extend(raw)
    weights = normalise_weights(weights, settings.min_weight)
    max_weight = max(float(w.max()) for w in weights)
    logger.info(
        f"Stage I: {len(input_ids)} masked-stage states; weight max {max_weight:.2f}, "
        f"mean frontier hit {float(prior.frontier_hits.mean()):.3f}, "
        f"mean instability {float(prior.instability.mean()):.3f}"
    )
    dataset = Dataset.from_dict(
        {
            "input_ids": [x.tolist() for x in input_ids],
            "attention_mask": [[1] * len(x) for x in input_ids],
            "loss_mask": [w.tolist() for w in weights],
        }
    )
    return dataset, prior
