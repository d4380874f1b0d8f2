"""The paper's Stage I position prior (``source: position``) and clean-text calibration rows
(``inputs: text``): hand-computed weights, ablation switches, the Dream shift, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_llmc.models import DiffusionLMSpec, diffusion_spec
from fair_calib_llmc.sampling.samplers import DreamSampler, LLaDASampler, default_sampler
from fair_calib_llmc.stage1.position import (
    PositionSettings,
    StaticPositionPrior,
    commit_schedule,
    estimate_position_prior,
    probe_confidence,
    probe_position_weights,
    probe_sampler,
    window_vector,
)
from fair_calib_llmc.stage1.sources import CalibrationRows, WeightSource
from fair_calib_llmc.stage1.states import Stage1Settings, build_calibration_dataset

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

PROMPT, ANSWER = 8, 16


def _probe():
    """One probe of 3 steps over a 3-position answer, committed in the random order 2, 0, 1,
    with the teacher's confidence in each state (nan where the position is not masked)."""
    committed = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)[:, None]
    masked = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)[:, None]
    nan = math.nan
    confidence = torch.tensor([[0.2, 0.6, 0.9], [0.5, 0.25, nan], [nan, 0.7, nan]])[:, None]
    return committed, masked, confidence.nan_to_num(0.0)


# By hand, with commit_boost 1 and T = 3 (u = 0, 1/2, 1):
#   early lambda0 = 2, 1.5, 1 -> frontier hits pos0 (step 1) 1.5, pos1 (step 2) 1, pos2 (step 0) 2
#   late  lambda0 = 1, 1.5, 2   -> pos0 1.5, pos1 2, pos2 1
# still masked: step 0 pos0, pos1 (pos2 is committed there): confidences 0.2, 0.6 -> shares
# 0.25, 0.75; step 1 pos1 alone -> share 1; step 2 nothing -> masked-stage sums 0.25, 1.75, 0
FRONTIER_EARLY = [1.5, 1.0, 2.0]
FRONTIER_LATE = [1.5, 2.0, 1.0]
MASKED = [0.25, 1.75, 0.0]


def _combine(frontier, masked, lambda1):
    return torch.tensor([f + lambda1 * m for f, m in zip(frontier, masked, strict=True)])


def test_probe_weights_equal_the_hand_computed_case():
    settings = PositionSettings(masked_weight=0.5)  # early, boost 1, commit_weight 1
    got = probe_position_weights(*_probe(), settings)
    torch.testing.assert_close(got[0], _combine(FRONTIER_EARLY, MASKED, 0.5))  # 1.625 1.875 2
    torch.testing.assert_close(
        commit_schedule(settings, 3), torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"masked_weight": 0.0}, FRONTIER_EARLY),  # the frontier-hit term only
        ({"commit_weight": 0.0}, [0.5 * m for m in MASKED]),  # the masked-stage term only
        ({"commit_schedule": "late"}, _combine(FRONTIER_LATE, MASKED, 0.5).tolist()),
        ({"commit_schedule": "flat"}, _combine([1, 1, 1], MASKED, 0.5).tolist()),
        ({"commit_weight": 2.0, "commit_boost": 0.0}, _combine([2, 2, 2], MASKED, 0.5).tolist()),
    ],
)
def test_ablation_switches(update, expected):
    settings = PositionSettings(**{"masked_weight": 0.5, **update})
    torch.testing.assert_close(
        probe_position_weights(*_probe(), settings)[0], torch.tensor(expected)
    )


def test_confidences_are_row_normalised_over_the_still_masked_positions():
    committed, masked, confidence = _probe()
    # scaling a step's confidences changes nothing; a committed position's does not count
    confidence[0] *= 7.0
    confidence[0, 0, 2] = 100.0
    settings = PositionSettings(commit_weight=0.0)
    torch.testing.assert_close(
        probe_position_weights(committed, masked, confidence, settings)[0], torch.tensor(MASKED)
    )


def test_the_three_confidences():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.cat([probs.log(), torch.tensor([-math.inf])])  # a mask column: never picked
    assert probe_confidence(logits, "probability").item() == pytest.approx(0.5)
    assert probe_confidence(logits, "margin").item() == pytest.approx(0.2)
    entropy = -(probs * probs.log()).sum().item()
    assert probe_confidence(logits, "neg_entropy").item() == pytest.approx(
        1 - entropy / math.log(4)
    )
    certain = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    assert probe_confidence(certain, "neg_entropy").item() == pytest.approx(1.0)


def test_the_vector_is_averaged_normalised_and_windowed():
    mean = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(window_vector(mean, None), torch.tensor([1.0, 2, 3, 6]) / 3)
    torch.testing.assert_close(window_vector(mean, 2), torch.tensor([0.0, 0.0, 2 / 3, 4 / 3]))


LLADA = DiffusionLMSpec("llada", mask_token_id=5, shift_logits=False)
DREAM = DiffusionLMSpec("dream", mask_token_id=5, shift_logits=True)


@pytest.mark.parametrize("spec", [LLADA, DREAM], ids=["llada", "dream"])
def test_rows_carry_the_vector_on_the_answer_and_dream_shifts_it(spec):
    prior = StaticPositionPrior(
        torch.tensor([0.0, 0.5, 1.5]), probes=1, settings=PositionSettings(window=2)
    )
    assert isinstance(prior, WeightSource)
    rows = CalibrationRows(torch.arange(10).view(2, 5), prompt_length=2, spec=spec)
    expected = [0.0, 0.0, 0.0, 0.5, 1.5]  # position 2 + i carries answer index i
    if spec.shift_logits:
        expected = [0.0, 0.0, 0.5, 1.5, 0.0]  # logit column i - 1 decides position i
    torch.testing.assert_close(prior.row_weights(rows), torch.tensor([expected, expected]))


def test_probes_decode_in_a_random_order():
    llada = LLaDASampler(steps=4, gen_length=8, block_length=8, temperature=0.5)
    assert probe_sampler(llada) == llada.model_copy(update={"remasking": "random"})
    assert probe_sampler(DreamSampler(steps=4, gen_length=8)).alg == "origin"


def _settings(spec, **prior) -> Stage1Settings:
    return Stage1Settings(
        sampler=default_sampler(spec, gen_length=ANSWER),
        prompt_length=PROMPT,
        inputs="text",
        prior={"source": "position", **prior},
    )


def test_flat_frontier_hits_only_give_every_position_the_same_weight(llada, tokenizer):
    """Every probe commits each position exactly once: a flat lambda0 alone is uniform, an
    early one is not (a random order puts positions at different steps)."""
    spec = diffusion_spec(llada, tokenizer)
    sampler = default_sampler(spec, gen_length=ANSWER)
    prompts = [torch.arange(3, 3 + PROMPT) + i for i in range(3)]
    flat = PositionSettings(commit_schedule="flat", masked_weight=0.0, probe_batch_size=2)
    prior = estimate_position_prior(llada, sampler, prompts, flat, spec)
    assert prior.probes == 3
    torch.testing.assert_close(prior.per_position, torch.ones(ANSWER))
    early = estimate_position_prior(llada, sampler, prompts, PositionSettings(), spec)
    assert early.per_position.std() > 0.05
    assert early.per_position.mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_clean_text_rows_have_no_mask_and_weights_on_the_trailing_window(
    family, llada, dream, tokenizer, calibration_texts
):
    model = {"llada": llada, "dream": dream}[family]
    spec = diffusion_spec(model, tokenizer)
    window = 12
    settings = _settings(spec, min_weight=0.05, position={"window": window})
    dataset, prior, stats = build_calibration_dataset(
        model, tokenizer, calibration_texts, settings, max_prompts=3
    )
    ids = torch.tensor(dataset["input_ids"])
    weights = torch.tensor(dataset["loss_mask"])
    assert ids.shape == (3, PROMPT + ANSWER)
    assert not (ids == spec.mask_token_id).any()
    for row, text in zip(ids, calibration_texts, strict=False):  # the text itself, cut
        assert row.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][: len(row)]
    assert isinstance(prior, StaticPositionPrior) and prior.probes == 3
    assert stats.frontier_token_share == 0.0  # clean text has no frontier
    # the window: the last 12 answer positions (Dream: one column to the left)
    first = PROMPT + ANSWER - window - int(spec.shift_logits)
    columns = torch.arange(first, first + window)
    outside = torch.ones(PROMPT + ANSWER, dtype=torch.bool)
    outside[columns] = False
    assert torch.all(weights[:, outside] == 0.05)  # the floor
    vector = prior.per_position[ANSWER - window :]
    ratios = weights[:, columns] / vector
    assert float((ratios.max() - ratios.min()) / ratios.mean()) < 1e-5  # one global scale
    assert weights[:, columns].min() > 0.05


def test_states_inputs_get_the_vector_on_their_answer(llada, tokenizer, calibration_texts):
    spec = diffusion_spec(llada, tokenizer)
    settings = _settings(spec).model_copy(update={"inputs": "states", "states_per_prompt": 3})
    dataset, prior, stats = build_calibration_dataset(
        llada, tokenizer, calibration_texts, settings, max_prompts=2
    )
    ids = torch.tensor(dataset["input_ids"])
    weights = torch.tensor(dataset["loss_mask"])
    assert len(ids) == 2 * 3 and (ids == spec.mask_token_id).any()  # masked-stage states
    assert stats.frontier_token_share > 0
    ratios = weights[:, PROMPT:] / prior.per_position
    assert float((ratios.max() - ratios.min()) / ratios.mean()) < 1e-5
    assert torch.all(weights[:, :PROMPT] == settings.prior.min_weight)


@pytest.mark.parametrize(
    ("stage1", "message"),
    [
        (
            {
                "sampler": {"family": "llada", "steps": 8, "gen_length": 8, "block_length": 8},
                "inputs": "text",
                "prior": {"source": "position", "position": {"window": 9}},
            },
            r"window \(9\) exceeds the sampler's gen_length \(8\); set window <= 8",
        ),
        (
            {"inputs": "text", "prior": {"source": "position", "position": {"window": 40}}},
            r"window \(40\) exceeds the sampler's gen_length \(32\)",  # the default sampler
        ),
        (
            {"prior": {"source": "position", "position": {"masked_weight": -1}}},
            r"stage1.prior.position.masked_weight: Input should be greater than or equal to 0",
        ),
        (
            {"prior": {"source": "position", "position": {"confidence": "certainty"}}},
            r"confidence: Input should be 'probability', 'neg_entropy' or 'margin'",
        ),
        (
            {"prior": {"source": "position", "position": {"commit_weight": 0, "masked_weight": 0}}},
            r"every position weighs nothing; set one of them above 0",
        ),
        (
            {"inputs": "text"},
            r"inputs: text has no masked-stage states for prior.source: state; set "
            r"prior.source: position",
        ),
    ],
)
def test_bad_settings_fail_on_one_line_before_any_rollout(
    stage1, message, llada, tokenizer, calibration_texts, monkeypatch
):
    from fair_calib_llmc import quantize

    def no_rollout(*args, **kwargs):
        raise AssertionError("Stage I ran")

    monkeypatch.setattr("fair_calib_llmc.pipeline.build_calibration_dataset", no_rollout)
    with pytest.raises(ValueError, match=message) as err:
        quantize(llada, tokenizer, "rtn_w4a4", calibration_texts, stage1=stage1)
    assert "\n" not in str(err.value)


def test_too_short_texts_for_a_text_row_name_the_fix(llada, tokenizer):
    spec = diffusion_spec(llada, tokenizer)
    with pytest.raises(ValueError, match=r"a row is stage1.prompt_length \(8\) \+ the sampler"):
        build_calibration_dataset(llada, tokenizer, ["a few words"], _settings(spec))


def test_probe_totals_are_summed_over_ranks(llada, tokenizer):
    """``reduce`` gets the probe totals and counts: two ranks holding the same probes give
    the one-rank vector from twice the probes."""
    spec = diffusion_spec(llada, tokenizer)
    sampler = default_sampler(spec, gen_length=ANSWER)
    prompts = [torch.arange(3, 3 + PROMPT) + i for i in range(2)]

    def two_equal_ranks(tensors):
        for tensor in tensors:
            tensor.mul_(2)

    alone = estimate_position_prior(llada, sampler, prompts, PositionSettings(), spec)
    summed = estimate_position_prior(
        llada, sampler, prompts, PositionSettings(), spec, reduce=two_equal_ranks
    )
    assert (alone.probes, summed.probes) == (2, 4)
    torch.testing.assert_close(summed.per_position, alone.per_position)


def test_uniform_clean_text_needs_no_rollout(llada, tokenizer, calibration_texts, monkeypatch):
    def no_rollout(*args, **kwargs):
        raise AssertionError("a rollout ran")

    monkeypatch.setattr("fair_calib_llmc.stage1.states.teacher_traces", no_rollout)
    monkeypatch.setattr("fair_calib_llmc.stage1.states.estimate_position_prior", no_rollout)
    spec = diffusion_spec(llada, tokenizer)
    settings = _settings(spec, source="uniform")
    dataset, _, _ = build_calibration_dataset(
        llada, tokenizer, calibration_texts, settings, max_prompts=2
    )
    assert torch.tensor(dataset["loss_mask"]).eq(1.0).all()
