"""Decision-level quality of a quantized dLLM against its full-precision teacher.

* **frontier flip rate**: the teacher samples a trace; the student replays it (teacher forcing:
  same states, same commits) and at each step we compare the student's top-1 with the teacher's
  at the positions the teacher committed. A flip there is a decision the student would have
  written differently.
* **post-commit mismatch**: both models generate freely with the same seed; the fraction of
  answer tokens that differ and the first position where they diverge.
* **KL(teacher || student)** over masked positions of the forced states, split into frontier
  (committed at that step) and non-frontier positions.
* **ELBO perplexity**: LLaDA's low-variance masked-diffusion bound on held-out text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fair_calib_llmc.models.family import DiffusionLMSpec, denoiser_logits, diffusion_spec
from fair_calib_llmc.sampling.samplers import DiffusionTrace, SamplerBase, progress, teacher_traces

__all__ = ["FrontierReport", "compare_decisions", "elbo_perplexity"]


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
    spec: DiffusionLMSpec | None = None,
) -> FrontierReport:
    """Frontier flips, KL and free-running mismatch of ``student`` against ``teacher``
    (which share a family, so one ``spec`` serves both)."""
    spec = spec or diffusion_spec(teacher)
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
def elbo_perplexity(
    model: nn.Module,
    texts: Iterable[torch.Tensor],
    *,
    mc_samples: int = 8,
    seed: int = 0,
    spec: DiffusionLMSpec | None = None,
) -> float:
    """Perplexity from LLaDA's low-variance masked-diffusion bound.

    For a sequence of length ``L``, draw ``l`` masked tokens (stratified over ``1..L``), mask a
    random ``l``-subset and score ``-(L/l) * sum log p(x_i | x_masked)`` over masked ``i``. The
    mean over draws bounds ``-log p(x)``; perplexity is ``exp(bound / L)`` pooled over tokens.
    """
    spec = spec or diffusion_spec(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    nll, n_tokens = 0.0, 0
    for text in texts:
        x = text.flatten().to(device)
        length = x.numel()
        if length == 0:
            continue
        offsets = torch.rand(mc_samples, generator=generator)
        # all draws of a text go through the model as one batch (same length, no padding)
        masks = torch.zeros(mc_samples, length, dtype=torch.bool)
        for k in range(mc_samples):
            n_masked = 1 + min(length - 1, int((k + offsets[k]) / mc_samples * length))
            masks[k, torch.randperm(length, generator=generator)[:n_masked]] = True
        masks = masks.to(device)
        noisy = torch.where(masks, spec.mask_token_id, x.expand(mc_samples, -1))
        logits = denoiser_logits(model, noisy, spec)[masks].float()  # masked positions only
        targets = x.expand(mc_samples, -1)[masks]
        log_p = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        draw = masks.nonzero()[:, 0]
        # each draw: -(L / l) * the sum of its masked tokens' log-probabilities
        per_draw = torch.zeros(mc_samples, device=device).index_add_(0, draw, -log_p)
        per_draw = per_draw * length / masks.sum(-1)
        bound = float(per_draw.sum())
        nll += bound / mc_samples
        n_tokens += length
    if n_tokens == 0:
        raise ValueError("no held-out tokens to score; pass non-empty texts")
    return math.exp(nll / n_tokens)
