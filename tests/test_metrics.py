"""Decision metrics: zero against itself, positive against a perturbed copy, ELBO numerics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fair_calib_llmc.evaluation.metrics import compare_decisions, elbo_perplexity
from fair_calib_llmc.models.family import diffusion_spec
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
    report = compare_decisions(
        dllm, dllm, _sampler(dllm), _prompts(dllm), spec=diffusion_spec(dllm)
    )
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
    report = compare_decisions(
        dllm, noisy, _sampler(dllm), _prompts(dllm), spec=diffusion_spec(dllm)
    )
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
    ppl = elbo_perplexity(llada, texts, mc_samples=4, spec=diffusion_spec(llada))
    assert math.isclose(ppl, llada.config.vocab_size - 1, rel_tol=1e-4)


def test_batched_elbo_matches_the_bound_draw_by_draw(dllm):
    """The draws of a text run as one batch; the bound is the one written draw by draw:
    LLaDA's estimator (l_i = k + i L / n mod L for one random k, a uniform random l_i-subset,
    weight L / l_i), or every mask (weight 1 / (l C(L, l))) where they number at most n."""
    import hashlib
    import itertools

    from fair_calib_llmc.models.family import denoiser_logits

    spec = diffusion_spec(dllm)
    texts = [torch.randint(3, 300, (n,)) for n in (1, 2, 9, 40)]

    def log_p(x, chosen) -> float:
        noisy = x.clone()
        noisy[chosen] = spec.mask_token_id
        log_p = denoiser_logits(dllm, noisy[None], spec)[0, chosen].log_softmax(-1)
        return float(log_p.gather(-1, x[chosen, None]).sum())

    nll = 0.0
    for x in texts:
        length, bound = len(x), 0.0
        if 2**length - 1 <= 4:  # every mask, exactly
            for n_masked in range(1, length + 1):
                subsets = list(itertools.combinations(range(length), n_masked))
                for subset in subsets:
                    bound += log_p(x, list(subset)) / (n_masked * len(subsets))
        else:  # seeded by (seed, tokens): no generator shared across texts
            digest = hashlib.sha256(f"3:{x.tolist()}".encode()).digest()
            generator = torch.Generator().manual_seed(
                int.from_bytes(digest[:8], "little") & (2**63 - 1)
            )
            k = int(torch.randint(1, length + 1, (), generator=generator))
            ranks = torch.rand(4, length, generator=generator).argsort(-1).argsort(-1)
            for i in range(4):
                n_masked = (round(k + i * length / 4) - 1) % length + 1
                chosen = (ranks[i] < n_masked).nonzero()[:, 0]
                bound += log_p(x, chosen) * length / n_masked / 4
        nll -= bound
    expected = math.exp(nll / sum(len(x) for x in texts))
    ppl = elbo_perplexity(dllm, texts, mc_samples=4, seed=3, spec=spec)
    assert ppl == pytest.approx(expected, rel=1e-5)
