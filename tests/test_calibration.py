"""Stage I calibration states: each token's frontier weight sits on the hidden state that
makes the decision (Dream: logit column i - 1 predicts position i)."""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.sampling.samplers import DiffusionTrace, default_sampler
from fair_calib_llmc.stage1.prior import PriorSettings
from fair_calib_llmc.stage1.states import (
    Stage1Settings,
    build_calibration_dataset,
    prompts_from_texts,
)

pytestmark = pytest.mark.unit

PROMPT = 16


def _spread(ratios: torch.Tensor) -> float:
    return float((ratios.max() - ratios.min()) / ratios.mean())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_weights_sit_on_the_column_that_decides(family, llada, dream, tokenizer, calibration_texts):
    model = {"llada": llada, "dream": dream}[family]
    spec = diffusion_spec(model, tokenizer)
    settings = Stage1Settings(
        sampler=default_sampler(spec, gen_length=16),
        prompt_length=PROMPT,
        states_per_prompt=4,
        # the (position, stage) table: a weight readable from the state alone
        prior=PriorSettings(source="table"),
    )
    dataset, prior, _ = build_calibration_dataset(
        model, tokenizer, calibration_texts, settings, max_prompts=4
    )
    weights, same_column, shifted = [], [], []
    for row in dataset:
        ids = torch.tensor(row["input_ids"])
        # a token's prior weight depends on its answer position and the state's masked stage,
        # both readable from the state itself
        masked = (ids == spec.mask_token_id)[None, None]
        state = DiffusionTrace(
            prompt_length=PROMPT,
            sequences=ids[None],
            masked=masked,
            committed=torch.zeros_like(masked),
            prediction=torch.zeros_like(ids)[None, None],
            margin=torch.zeros(masked.shape),
        )
        raw = prior.raw_weights(state, 0)[0]
        weights.append(torch.tensor(row["loss_mask"]))
        same_column.append(raw)
        shifted.append(torch.cat([raw[1:], torch.ones(1)]))  # position i -> column i - 1
    weights = torch.cat(weights)
    right, wrong = (shifted, same_column) if spec.shift_logits else (same_column, shifted)
    # normalisation is one global scale (no weight reaches the floor here)
    assert _spread(weights / torch.cat(right)) < 1e-5
    assert _spread(weights / torch.cat(wrong)) > 1e-2  # the check can tell the two apart


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_non_positive_prompt_counts_are_refused(tokenizer, calibration_texts, count):
    """0 and -1 used to run one prompt: the loop stopped once it held ``count`` prompts."""
    with pytest.raises(ValueError, match="max_prompts must be a positive integer"):
        prompts_from_texts(calibration_texts, tokenizer, PROMPT, count)


def test_fewer_usable_prompts_than_asked_are_logged_with_the_reason(tokenizer, calibration_texts):
    lines = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        texts = [*calibration_texts[:3], "too short"]
        prompts = prompts_from_texts(texts, tokenizer, PROMPT, max_prompts=10)
    finally:
        logger.remove(sink)
    assert len(prompts) == 3
    assert len(lines) == 1, lines
    assert "asked for 10 prompts of 16 tokens, 3 usable: 4 texts" in lines[0]
    assert "1 of them shorter than 16 tokens" in lines[0]
