"""Decision metrics: zero against itself, positive against a perturbed copy, ELBO numerics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fair_calib_llmc.evaluation.metrics import compare_decisions, elbo_perplexity
from fair_calib_llmc.sampling.samplers import DreamSampler, LLaDASampler

pytestmark = pytest.mark.unit


def _sampler(model):
    if model.config.model_type == "llada":
        return LLaDASampler(steps=8, gen_length=16, block_length=8)
    return DreamSampler(steps=8, gen_length=16, alg="entropy")


def _prompts(model, n=3):
    gen = torch.Generator().manual_seed(5)
    return [
        torch.randint(3, model.config.vocab_size, (6 + i % 2,), generator=gen) for i in range(n)
    ]


def test_model_against_itself_has_no_flips(dllm):
    report = compare_decisions(dllm, dllm, _sampler(dllm), _prompts(dllm))
    assert report.frontier_flip_rate == 0.0
    assert report.post_commit_mismatch == 0.0
    assert report.first_divergence == 16
    assert abs(report.kl_frontier) < 1e-6 and abs(report.kl_non_frontier) < 1e-6
    assert report.frontier_decisions == 3 * 16


def test_perturbed_copy_flips(dllm):
    noisy = copy.deepcopy(dllm)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    report = compare_decisions(dllm, noisy, _sampler(dllm), _prompts(dllm))
    assert report.frontier_flip_rate > 0
    assert report.post_commit_mismatch > 0
    assert report.first_divergence < 16
    assert report.kl_frontier > 0 and report.kl_non_frontier > 0
    assert len(report.flips_per_step) == 8 and len(report.flips_per_position) == 16


def test_elbo_perplexity_of_a_uniform_model_is_the_vocabulary(llada):
    """Zero LM head -> uniform over every token but the mask: perplexity = V - 1 exactly."""
    with torch.no_grad():
        llada.model.transformer.ff_out.weight.zero_()
    texts = [torch.randint(3, 300, (20,)), torch.randint(3, 300, (7,))]
    ppl = elbo_perplexity(llada, texts, mc_samples=4)
    assert math.isclose(ppl, llada.config.vocab_size - 1, rel_tol=1e-4)


def test_batched_elbo_matches_the_bound_draw_by_draw(dllm):
    """The draws of a text run as one batch; the bound is the one written draw by draw."""
    from fair_calib_llmc.models.family import denoiser_logits, diffusion_spec

    spec = diffusion_spec(dllm)
    texts = [torch.randint(3, 300, (n,)) for n in (1, 9, 40)]
    generator = torch.Generator().manual_seed(3)
    nll = 0.0
    for x in texts:
        length, offsets, bound = len(x), torch.rand(4, generator=generator), 0.0
        for k in range(4):
            n_masked = 1 + min(length - 1, int((k + offsets[k]) / 4 * length))
            chosen = torch.randperm(length, generator=generator)[:n_masked]
            noisy = x.clone()
            noisy[chosen] = spec.mask_token_id
            log_p = denoiser_logits(dllm, noisy[None], spec)[0, chosen].log_softmax(-1)
            bound += float(-log_p.gather(-1, x[chosen, None]).sum()) * length / n_masked
        nll += bound / 4
    expected = math.exp(nll / sum(len(x) for x in texts))
    assert elbo_perplexity(dllm, texts, mc_samples=4, seed=3) == pytest.approx(expected, rel=1e-5)
