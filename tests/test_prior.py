"""Stage I prior on hand-made traces: known frontier hits give known weights."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_llmc.sampling.samplers import DiffusionTrace
from fair_calib_llmc.stage1.prior import (
    FrontierPrior,
    PriorSettings,
    frontier_hits,
    normalise_weights,
)

pytestmark = pytest.mark.unit


def _trace() -> DiffusionTrace:
    """Prompt of 1 token, answer of 3 committed one per step in order (pos 1, 2, 3)."""
    steps, length = 3, 4
    committed = torch.zeros(steps, 1, length, dtype=torch.bool)
    for t in range(steps):
        committed[t, 0, t + 1] = True
    masked = torch.zeros_like(committed)
    for t in range(steps):
        masked[t, 0, t + 1 :] = True
    margin = torch.full((steps, 1, length), math.nan)
    # margins while masked: pos1 {0.8}, pos2 {0.2, 0.6}, pos3 {0.0, 0.5, 1.0}
    margin[0, 0, 1:] = torch.tensor([0.8, 0.2, 0.0])
    margin[1, 0, 2:] = torch.tensor([0.6, 0.5])
    margin[2, 0, 3] = 1.0
    sequences = torch.tensor([[9, 5, 6, 7]])
    prediction = sequences.expand(steps, 1, length).clone()
    prediction[0, 0, 3] = 4  # pos3 disagrees with its final token at step 0
    trace = DiffusionTrace(1, sequences, masked, committed, prediction, margin)
    trace.validate()
    return trace


SETTINGS = PriorSettings(
    lookahead=1,
    stability_lag=1,
    decay=0.5,
    frontier_weight=2.0,
    instability_weight=0.0,
    margin_mix=1.0,
    source="state",
)


def test_frontier_hits_per_step():
    trace = _trace()
    expected = [[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]]
    for step, row in enumerate(expected):
        assert frontier_hits(trace, step, SETTINGS)[0].tolist() == row


def test_state_weights_follow_the_states_own_rollout():
    """source="state": hits from this rollout's commits around the step, instability from
    the margin each position had when it was written (and agreement while still masked)."""
    settings = SETTINGS.model_copy(update={"instability_weight": 1.0})
    weights = FrontierPrior(settings).raw_weights(_trace(), step=1)[0]
    # step 1 commits pos2 (hit 1); pos1 was committed one step before, pos3 one step later
    # (hits 0.5). Decision margins: pos1 0.8 (step 0), pos2 0.6 (step 1), pos3 1.0 (step 2).
    expected = [1.0, 1 + 2 * 0.5 * 1.2, 1 + 2 * 1.0 * 1.4, 1 + 2 * 0.5 * 1.0]
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_state_instability_counts_disagreement_only_while_masked():
    from fair_calib_llmc.stage1.prior import state_instability

    # margin_mix=0: instability is 1 - agreement; pos3 disagrees at step 0 only
    assert state_instability(_trace(), 0, margin_mix=0.0)[0].tolist() == [0.0, 0.0, 1.0]
    assert state_instability(_trace(), 1, margin_mix=0.0)[0].tolist() == [0.0, 0.0, 0.0]


def test_normalise_to_mean_one_with_floor():
    out = normalise_weights([torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0])], 0.1)
    flat = torch.cat(out)
    torch.testing.assert_close(flat, torch.tensor([0.5, 1.5, 0.1, 2.0]))
    with pytest.raises(ValueError, match="calibration set is empty"):
        normalise_weights([], 0.1)
