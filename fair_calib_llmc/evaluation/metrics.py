"""Decision-level quality of a quantized dLLM against its full-precision teacher.

* **frontier flip rate**: the teacher samples a trace; the student replays it (teacher forcing:
  same states, same commits) and at each step we compare the student's top-1 with the teacher's
  at the positions the teacher committed. A flip there is a decision the student would have
  written differently.
* **post-commit mismatch**: both models generate freely with the same seed; the fraction of
  answer tokens that differ and the first position where they diverge.
* **KL(teacher || student)** over masked positions of the forced states, split into frontier
  (committed at that step) and non-frontier positions.
* **ELBO perplexity**: LLaDA's low-variance masked-diffusion bound on held-out text, from
  :func:`masked_diffusion_loglikelihood`, the likelihood the lm-eval model ``dllm`` uses too.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fair_calib_llmc.models.family import DiffusionLMSpec, denoiser_logits
from fair_calib_llmc.sampling.samplers import DiffusionTrace, SamplerBase, progress, teacher_traces

__all__ = [
    "FrontierReport",
    "compare_decisions",
    "elbo_perplexity",
    "masked_diffusion_loglikelihood",
]


@dataclass
class FrontierReport:
    """Student-vs-teacher decision metrics over a set of prompts."""

    frontier_flip_rate: float
    post_commit_mismatch: float
    first_divergence: float  # mean answer index of the first differing token (gen_length if none)
    kl_frontier: float
    kl_non_frontier: float
    frontier_decisions: int
    flips_per_step: list[float]  # flip rate at each sampler step
    flips_per_position: list[float]  # flip rate at each answer position

    def as_row(self) -> dict[str, float]:
        row = asdict(self)
        row.pop("flips_per_step")
        row.pop("flips_per_position")
        return row


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) that ignores classes the teacher gives 0."""
    log_t = teacher_logits.log_softmax(-1)
    log_s = student_logits.log_softmax(-1)
    p_t = log_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t))
    return terms.sum(-1)


@torch.no_grad()
def compare_decisions(
    teacher: nn.Module,
    student: nn.Module,
    sampler: SamplerBase,
    prompts,
    *,
    seed: int = 0,
    traces: list[tuple[torch.Tensor, DiffusionTrace]] | None = None,
    spec: DiffusionLMSpec,
) -> FrontierReport:
    """Frontier flips, KL and free-running mismatch of ``student`` against ``teacher``
    (which share a family, so one ``spec`` serves both)."""
    if traces is None:
        traces = teacher_traces(teacher, sampler, prompts, seed=seed, spec=spec)
    steps, gen = sampler.steps, sampler.gen_length
    flips_step = torch.zeros(steps)
    count_step = torch.zeros(steps)
    flips_pos = torch.zeros(gen)
    count_pos = torch.zeros(gen)
    kl_sum = {True: 0.0, False: 0.0}
    kl_n = {True: 0, False: 0}
    mismatches, tokens, first_div = 0, 0, []

    bar = progress(total=2 * steps * len(traces), desc="student vs teacher")
    for batch, t_trace in traces:

        def on_step(step: int, state, student_logits, t_trace=t_trace) -> None:
            bar.update()
            teacher_logits = denoiser_logits(teacher, state, spec)
            kl = _kl(teacher_logits, student_logits)
            masked = t_trace.masked[step]
            frontier = t_trace.committed[step]
            for is_frontier, where in ((True, frontier), (False, masked & ~frontier)):
                kl_sum[is_frontier] += float(kl[where].sum())
                kl_n[is_frontier] += int(where.sum())

        forced = sampler.generate(
            student, batch, seed=seed, force=t_trace, on_step=on_step, spec=spec
        )
        frontier = t_trace.committed
        flipped = (forced.prediction != t_trace.prediction) & frontier
        flips_step += flipped.sum((1, 2)).cpu().float()
        count_step += frontier.sum((1, 2)).cpu().float()
        answer = slice(t_trace.prompt_length, None)
        flips_pos += flipped[..., answer].sum((0, 1)).cpu().float()
        count_pos += frontier[..., answer].sum((0, 1)).cpu().float()

        free = sampler.generate(
            student, batch, seed=seed, spec=spec, on_step=lambda *_: bar.update()
        )
        differ = free.generated != t_trace.generated
        mismatches += int(differ.sum())
        tokens += differ.numel()
        any_diff = differ.any(dim=1)
        first = torch.where(
            any_diff, differ.float().argmax(dim=1), torch.full_like(any_diff, gen, dtype=torch.long)
        )
        first_div.extend(first.tolist())

    bar.close()
    decisions = int(count_step.sum())
    return FrontierReport(
        frontier_flip_rate=float(flips_step.sum()) / max(decisions, 1),
        post_commit_mismatch=mismatches / max(tokens, 1),
        first_divergence=sum(first_div) / max(len(first_div), 1),
        kl_frontier=kl_sum[True] / max(kl_n[True], 1),
        kl_non_frontier=kl_sum[False] / max(kl_n[False], 1),
        frontier_decisions=decisions,
        flips_per_step=(flips_step / count_step.clamp(min=1)).tolist(),
        flips_per_position=(flips_pos / count_pos.clamp(min=1)).tolist(),
    )


@torch.no_grad()
def masked_diffusion_loglikelihood(
    model: nn.Module,
    context: Sequence[int],
    continuation: Sequence[int],
    *,
    spec: DiffusionLMSpec,
    mc_samples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """The one masked-diffusion likelihood: LLaDA's bound on ``log p(continuation | context)``
    (the ELBO perplexity scores a text as a continuation of nothing; the lm-eval model
    ``dllm`` scores every ``loglikelihood`` request with it).

    Only continuation tokens are masked. With ``T`` continuation tokens, a draw masks ``l``
    of them (a uniform random ``l``-subset) and scores ``(T / l) * sum log p(x_i | masked)``
    over the masked ``i``; the mean over draws bounds ``log p`` from below.

    The estimator kept is the lm-eval model's, which is LLaDA's own (``eval_llada.py``):
    ``l_i = k + i T / n`` (mod ``T``, in ``1..T``) for one random ``k`` over the ``n =
    mc_samples`` draws, and, when all ``2**T - 1`` masks number at most ``mc_samples``, the
    exact expectation instead (each mask weighted ``1 / (l * C(T, l))``: short answers such
    as " A" are scored without noise). Its draws are seeded by ``seed`` and the tokens
    (not by a generator shared across calls), so a score depends on neither the request
    order nor ``batch_size``, and an lm-eval number is comparable with the LLaDA authors'.
    (The ELBO perplexity had an estimator of its own, with a random offset per draw and one
    generator across texts: the same bound, other draws.) ``batch_size`` masked copies go
    through the model at once; log-probabilities are float32 log-softmaxes of the masked
    positions only, summed in float64.
    """
    n_target = len(continuation)
    if n_target == 0:
        raise ValueError("the continuation is empty; nothing to score")
    device = next(model.parameters()).device
    sequence = torch.tensor([*context, *continuation], dtype=torch.long)
    masks, weights = _likelihood_masks(n_target, mc_samples, seed, sequence.tolist())
    start_of = len(context)
    target = sequence[start_of:].to(device)

    total = 0.0
    for start in range(0, masks.shape[0], batch_size):
        is_mask = masks[start : start + batch_size]
        rows = sequence.repeat(is_mask.shape[0], 1)
        rows[:, start_of:][is_mask] = spec.mask_token_id
        logits = denoiser_logits(model, rows.to(device), spec)[:, start_of:]
        is_mask = is_mask.to(device)
        targets = target.expand(is_mask.shape[0], -1)[is_mask]
        log_p = logits[is_mask].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(is_mask.shape[0], dtype=torch.float64, device=device)
        per_row.index_add_(0, is_mask.nonzero()[:, 0], log_p.double())
        total += float((per_row.cpu() * weights[start : start + batch_size]).sum())
    return total


def _request_seed(seed: int, tokens: Iterable[int]) -> int:
    """A seed per (run seed, token sequence): a score does not depend on request order."""
    digest = hashlib.sha256(f"{seed}:{list(tokens)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _likelihood_masks(
    n_target: int, mc_samples: int, seed: int, tokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(R, T)`` over the continuation and the weight of each row's score."""
    if 2**n_target - 1 <= mc_samples:
        rows, weights = [], []
        for n_masked in range(1, n_target + 1):
            subsets = list(itertools.combinations(range(n_target), n_masked))
            for subset in subsets:
                row = torch.zeros(n_target, dtype=torch.bool)
                row[list(subset)] = True
                rows.append(row)
                weights.append(1.0 / (n_masked * len(subsets)))
        return torch.stack(rows), torch.tensor(weights, dtype=torch.float64)
    generator = torch.Generator().manual_seed(_request_seed(seed, tokens))
    # LLaDA's stratification: l_i = k + i * T / n (mod T, in 1..T) for one random k
    k = int(torch.randint(1, n_target + 1, (), generator=generator))
    counts = torch.linspace(k, k + (mc_samples - 1) * n_target / mc_samples, mc_samples)
    counts = (counts.round().long() - 1) % n_target + 1
    ranks = torch.rand(mc_samples, n_target, generator=generator).argsort(-1).argsort(-1)
    masks = ranks < counts.unsqueeze(-1)  # a uniform random subset of l_i positions
    return masks, (n_target / counts.double()) / mc_samples


@torch.no_grad()
def elbo_perplexity(
    model: nn.Module,
    texts: Iterable[torch.Tensor],
    *,
    spec: DiffusionLMSpec,
    mc_samples: int = 8,
    seed: int = 0,
) -> float:
    """Perplexity from LLaDA's low-variance masked-diffusion bound on held-out texts.

    Each text is scored by :func:`masked_diffusion_loglikelihood` (no context, ``mc_samples``
    draws, all in one batch); perplexity is ``exp(-bound / tokens)`` pooled over the texts.
    """
    nll, n_tokens = 0.0, 0
    for text in texts:
        tokens = text.flatten().tolist()
        if not tokens:
            continue
        nll -= masked_diffusion_loglikelihood(
            model, [], tokens, spec=spec, mc_samples=mc_samples, batch_size=mc_samples, seed=seed
        )
        n_tokens += len(tokens)
    if n_tokens == 0:
        raise ValueError("no held-out tokens to score; pass non-empty texts")
    return math.exp(nll / n_tokens)
