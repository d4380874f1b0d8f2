"""Samplers: trace consistency, determinism, forced replay, argument errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.sampling.samplers import DreamSampler, LLaDASampler, progress, sampler_for

pytestmark = pytest.mark.unit

SAMPLERS = [
    LLaDASampler(steps=8, gen_length=16, block_length=8),
    LLaDASampler(steps=16, gen_length=16, block_length=4, temperature=0.7),
    LLaDASampler(steps=4, gen_length=16, block_length=16, remasking="random"),
    DreamSampler(steps=8, gen_length=16, alg="entropy"),
    DreamSampler(steps=8, gen_length=16, alg="maskgit_plus", temperature=0.5, top_p=0.9),
    DreamSampler(steps=6, gen_length=16, alg="topk_margin", top_k=20),
    DreamSampler(steps=8, gen_length=16, alg="origin", temperature=1.0),
    DreamSampler(steps=8, gen_length=16, alg="entropy", alg_temp=0.5, temperature=0.3),
]


def _prompts(model, batch=2, length=6):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: repr(s)[:60])
def test_trace_is_consistent_and_deterministic(dllm, sampler):
    prompts = _prompts(dllm)
    trace = sampler.generate(dllm, prompts, seed=3)
    trace.validate()
    assert torch.equal(trace.sequences[:, :6], prompts)
    # committed tokens are the final output: rebuild the output from the commits alone
    rebuilt = torch.zeros_like(trace.sequences)
    for t in range(trace.steps):
        rebuilt = torch.where(trace.committed[t], trace.sequences, rebuilt)
    assert torch.equal(rebuilt[:, 6:], trace.generated)
    # margins exist exactly where positions are masked
    assert torch.equal(~torch.isnan(trace.margin), trace.masked)
    assert (trace.margin[trace.masked] >= 0).all()
    again = sampler.generate(dllm, prompts, seed=3)
    assert torch.equal(trace.sequences, again.sequences)
    assert torch.equal(trace.committed, again.committed)
    replay = sampler.generate(dllm, prompts, seed=123, force=trace)
    assert torch.equal(replay.sequences, trace.sequences)
    assert torch.equal(replay.committed, trace.committed)
    assert torch.equal(replay.prediction, trace.prediction)


def test_llada_commits_block_by_block(llada):
    sampler = LLaDASampler(steps=8, gen_length=16, block_length=4)
    trace = sampler.generate(llada, _prompts(llada, batch=1, length=5))
    when = trace.commit_step()[0, 5:].view(4, 4)
    assert (when[:-1].amax(dim=1) < when[1:].amin(dim=1)).all()
    # two steps per block, two tokens per step
    assert trace.committed.sum((1, 2)).tolist() == [2] * 8


def test_llada_greedy_commits_most_confident(llada):
    sampler = LLaDASampler(steps=4, gen_length=8, block_length=8)
    prompts = _prompts(llada, batch=1)
    confidences = []

    def remember(step, state, logits):
        confidences.append(logits.softmax(-1).amax(-1))

    trace = sampler.generate(llada, prompts, on_step=remember)
    for t in range(trace.steps):
        conf = confidences[t][0]
        chosen = conf[trace.committed[t, 0]].min()
        rest = trace.masked[t, 0] & ~trace.committed[t, 0]
        if rest.any():
            assert chosen >= conf[rest].max()


def test_dream_uses_shifted_logits(dream):
    """Dream's prediction for position i comes from logit column i-1."""
    sampler = DreamSampler(steps=1, gen_length=4, alg="maskgit_plus")
    prompts = _prompts(dream, batch=1)
    trace = sampler.generate(dream, prompts)
    state = trace.states(diffusion_spec(dream).mask_token_id)[0]
    with torch.no_grad():
        raw = dream(state).logits
    raw[..., dream.config.mask_token_id] = float("-inf")
    assert torch.equal(trace.prediction[0, 0, 6:], raw[0, 5:-1].argmax(-1))


def test_force_with_wrong_shape_is_rejected(llada):
    sampler = LLaDASampler(steps=8, gen_length=16, block_length=8)
    trace = sampler.generate(llada, _prompts(llada))
    other = LLaDASampler(steps=4, gen_length=16, block_length=8)
    with pytest.raises(ValueError, match="cannot replay"):
        other.generate(llada, _prompts(llada), force=trace)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=8, gen_length=20, block_length=8), "multiple of block_length"),
        (dict(steps=2, gen_length=32, block_length=8), "smaller than the number of blocks"),
        (dict(steps=6, gen_length=32, block_length=8), "multiple of the number of blocks"),
        (dict(steps=8, gen_length=16, block_length=8, typo=1), "Extra inputs"),
    ],
)
def test_bad_sampler_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        LLaDASampler(**kwargs)


def test_sampler_for_picks_family(llada, dream):
    assert isinstance(
        sampler_for(diffusion_spec(llada), steps=4, gen_length=8, block_length=8), LLaDASampler
    )
    assert isinstance(sampler_for(diffusion_spec(dream), steps=4, gen_length=8), DreamSampler)


def test_redirected_progress_shows_only_the_outermost_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with progress(total=3, desc="outer") as outer, progress(total=5, desc="inner") as inner:
        assert not outer.disable and inner.disable
        assert outer.mininterval >= 10  # a line every few seconds at most, not every update
    with progress(total=3) as alone:
        assert not alone.disable  # the outer one has closed
