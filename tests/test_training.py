"""LLaDA's training objective and loop (used to build the project's own models)."""

from __future__ import annotations

import pytest
import torch

from fair_calib_llmc.models import LLaDAModelLM
from fair_calib_llmc.models.training import train_masked_diffusion

from .helpers import llada_config

pytestmark = pytest.mark.unit


def test_training_learns_a_repeated_pattern_with_warmup_and_cosine_decay(tokenizer):
    torch.manual_seed(0)
    model = LLaDAModelLM(llada_config(tokenizer, n_layers=1))
    pattern = torch.arange(3, 19)
    tokens = pattern.repeat(64)
    rates = []
    optimizer_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return optimizer_step(self, *args, **kwargs)

    torch.optim.AdamW.step = record
    try:
        losses = train_masked_diffusion(
            model, tokens, steps=40, batch_size=8, seq_len=16, lr=1e-2, warmup=10
        )
    finally:
        torch.optim.AdamW.step = optimizer_step
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert rates[0] == 0.0 and rates[10] == pytest.approx(1e-2)  # linear warm-up
    assert rates[-1] < 1e-3 and rates == sorted(rates[:11]) + sorted(rates[11:], reverse=True)
