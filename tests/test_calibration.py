"""Stage I calibration states: each token's weight sits on the hidden state that makes the
decision (Dream: logit column i - 1 predicts position i)."""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.sampling.samplers import default_sampler
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
        # the static position prior: a weight readable from the answer position alone
        prior=PriorSettings(source="position"),
    )
    dataset, prior, _ = build_calibration_dataset(
        model, tokenizer, calibration_texts, settings, max_prompts=4
    )
    weights = torch.tensor(dataset["loss_mask"])
    # answer position i weighs per_position[i] (the prompt nothing, so the floor)
    same_column = torch.cat([torch.zeros(PROMPT), prior.per_position])
    shifted = torch.cat([same_column[1:], torch.zeros(1)])  # position i -> column i - 1
    right, wrong = (shifted, same_column) if spec.shift_logits else (same_column, shifted)

    def spread_where_weighed(frame: torch.Tensor) -> float:
        keep = frame > 0
        return _spread(weights[:, keep] / frame[keep])

    # normalisation is one global scale (no weighed column reaches the floor here)
    assert spread_where_weighed(right) < 1e-5
    assert spread_where_weighed(wrong) > 1e-2  # the check can tell the two apart


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
