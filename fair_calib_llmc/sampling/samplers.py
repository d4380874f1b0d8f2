"""Diffusion samplers for LLaDA and Dream, with frontier traces and forced replay.

Both samplers start from a fully masked answer, predict every masked position at each step and
commit (unmask) a few; a commit is never revisited. Every run returns a
:class:`DiffusionTrace`, which records per step which positions were masked, which were
committed (the write frontier), the model's top-1 prediction and its top-1/top-2 probability
margin at every masked position. Given ``force=trace``, a sampler replays another run's commits
(same positions, same tokens, same order), so two models can be compared decision by decision
on identical states: that is how :mod:`fair_calib_llmc.evaluation.metrics` measures frontier flips.

The update rules follow the public reference code: LLaDA's ``generate`` (low-confidence or
random remasking inside semi-autoregressive blocks, Gumbel-max sampling) and Dream's
``diffusion_generate`` (``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from fair_calib_llmc.models.family import DiffusionLMSpec, denoiser_logits, diffusion_spec
from fair_calib_llmc.models.registry import DREAM, LLADA, family, register_sampler

__all__ = [
    "DiffusionTrace",
    "SamplerBase",
    "LLaDASampler",
    "DreamSampler",
    "sampler_for",
    "default_sampler",
    "sampler_settings",
    "StepHook",
    "progress",
    "teacher_traces",
]

#: Called once per step with (step index, state before the step, aligned float32 logits).
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class DiffusionTrace:
    """One sampler run. Step-indexed tensors have shape ``(steps, batch, length)``.

    ``length`` covers prompt and answer; answer positions start at ``prompt_length``.
    """

    prompt_length: int
    sequences: torch.Tensor  # (B, L) final tokens
    masked: torch.Tensor  # (T, B, L) bool: masked before the step
    committed: torch.Tensor  # (T, B, L) bool: committed at the step (the write frontier)
    prediction: torch.Tensor  # (T, B, L) long: top-1 prediction (meaningful where masked)
    margin: torch.Tensor  # (T, B, L) float: top-1 minus top-2 probability; NaN where unmasked

    @property
    def steps(self) -> int:
        return self.masked.shape[0]

    @property
    def generated(self) -> torch.Tensor:
        """The answer tokens ``(B, gen_length)``."""
        return self.sequences[:, self.prompt_length :]

    def commit_step(self) -> torch.Tensor:
        """``(B, L)`` step at which each position was committed; -1 for prompt positions."""
        steps = torch.arange(self.steps, device=self.committed.device)[:, None, None]
        when = torch.where(self.committed, steps, torch.full_like(steps, -1)).amax(dim=0)
        return when

    def states(self, mask_token_id: int) -> torch.Tensor:
        """``(T, B, L)`` model inputs at every step, rebuilt from the final tokens."""
        return torch.where(self.masked, mask_token_id, self.sequences.unsqueeze(0))

    def validate(self) -> None:
        """Raise ``AssertionError`` unless every answer position was committed exactly once."""
        counts = self.committed.sum(dim=0)
        answer = counts[:, self.prompt_length :]
        assert bool((answer == 1).all()), "an answer position was committed 0 or >1 times"
        assert bool((counts[:, : self.prompt_length] == 0).all()), "a prompt position committed"
        for t in range(self.steps):
            assert bool((~self.committed[t] | self.masked[t]).all()), "committed an unmasked pos"
            if t + 1 < self.steps:
                expected = self.masked[t] & ~self.committed[t]
                assert torch.equal(self.masked[t + 1], expected), "mask bookkeeping broken"

    def to(self, device: torch.device | str) -> DiffusionTrace:
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return DiffusionTrace(**moved)


class SamplerBase(BaseModel):
    """Shared loop: state, prediction, commit, record. Subclasses choose what to commit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(gt=0, description="denoising steps in total")
    gen_length: int = Field(gt=0, description="answer length in tokens")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (argmax)")
    show_progress: bool = False

    # --- what a family defines --------------------------------------------------------------
    def _schedule(self, prompt_length: int):  # yields (step, window_end)
        raise NotImplementedError

    def _choose(
        self,
        step: int,
        logits: torch.Tensor,
        probs: torch.Tensor,
        masked: torch.Tensor,
        window_end: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (committed bool (B, L), tokens long (B, L)) for one step.

        ``probs`` is ``logits.softmax(-1)``, already computed for the trace's margins.
        """
        raise NotImplementedError

    # --- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        *,
        tokenizer=None,
        seed: int = 0,
        force: DiffusionTrace | None = None,
        on_step: StepHook | None = None,
        spec: DiffusionLMSpec | None = None,
    ) -> DiffusionTrace:
        """Generate ``gen_length`` tokens after each prompt row; return the trace.

        :param prompt_ids: ``(B, P)`` or ``(P,)`` prompt tokens (equal lengths, no padding).
        :param force: replay this trace's commits (positions and tokens) instead of choosing.
        :param on_step: hook called before each commit with the state and aligned logits.
        :param spec: the model's :class:`DiffusionLMSpec` when the caller has it already
            (read from ``model`` and ``tokenizer`` otherwise).
        """
        spec = spec or diffusion_spec(model, tokenizer)
        prompt_ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids.unsqueeze(0)
        device = next(model.parameters()).device
        prompt_ids = prompt_ids.to(device)
        if (prompt_ids == spec.mask_token_id).any():
            raise ValueError("the prompt contains the mask token; remove it from the prompt")
        batch, prompt_length = prompt_ids.shape
        if force is not None:
            self._check_force(force, batch, prompt_length)
            force = force.to(device)
        x = torch.full((batch, prompt_length + self.gen_length), spec.mask_token_id, device=device)
        x[:, :prompt_length] = prompt_ids
        generator = torch.Generator(device=device).manual_seed(seed)

        masked_l, committed_l, pred_l, margin_l = [], [], [], []
        schedule = list(self._schedule(prompt_length))
        for step, window_end in tqdm(
            schedule, desc=f"{type(self).__name__}", disable=not self.show_progress
        ):
            masked = x == spec.mask_token_id
            logits = denoiser_logits(model, x, spec)
            if on_step is not None:
                on_step(step, x.clone(), logits)
            probs = logits.softmax(dim=-1)
            top2 = probs.topk(2, dim=-1)
            prediction = top2.indices[..., 0]
            margin = (top2.values[..., 0] - top2.values[..., 1]).masked_fill(~masked, math.nan)
            if force is None:
                commit, tokens = self._choose(step, logits, probs, masked, window_end, generator)
            else:
                commit, tokens = force.committed[step], force.sequences
            commit = commit & masked
            x = torch.where(commit, tokens, x)

            masked_l.append(masked)
            committed_l.append(commit)
            pred_l.append(prediction)
            margin_l.append(margin)
        if (x == spec.mask_token_id).any():  # pragma: no cover - schedules commit everything
            raise RuntimeError("sampler finished with masked positions left; this is a bug")
        return DiffusionTrace(
            prompt_length=prompt_length,
            sequences=x,
            masked=torch.stack(masked_l),
            committed=torch.stack(committed_l),
            prediction=torch.stack(pred_l),
            margin=torch.stack(margin_l),
        )

    def _check_force(self, force: DiffusionTrace, batch: int, prompt_length: int) -> None:
        expected = (self.steps, batch, prompt_length + self.gen_length)
        if tuple(force.committed.shape) != expected or force.prompt_length != prompt_length:
            raise ValueError(
                f"cannot replay a trace of shape {tuple(force.committed.shape)} (prompt "
                f"{force.prompt_length}) with steps/batch/length {expected} (prompt "
                f"{prompt_length}); replay with the sampler settings and prompts that made it"
            )


def _select_top(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``counts[b]`` highest-confidence positions of each row."""
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    for row, k in enumerate(counts.tolist()):
        if k > 0:
            commit[row, confidence[row].topk(int(k)).indices] = True
    return commit


@register_sampler
class LLaDASampler(SamplerBase):
    """LLaDA's sampler: semi-autoregressive blocks, ``steps // n_blocks`` steps per block,
    committing the most confident (``low_confidence`` remasking) or random masked positions of
    the current block, with an even split of the block's tokens over its steps."""

    family: Literal[LLADA.name] = LLADA.name
    block_length: int = Field(32, gt=0)
    remasking: Literal["low_confidence", "random"] = "low_confidence"

    @model_validator(mode="after")
    def _check_blocks(self) -> LLaDASampler:
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length "
                f"({self.block_length}); pick a block_length that divides gen_length, "
                f"e.g. block_length={math.gcd(self.gen_length, self.block_length)}"
            )
        n_blocks = self.gen_length // self.block_length
        if self.steps < n_blocks:
            raise ValueError(
                f"steps ({self.steps}) is smaller than the number of blocks "
                f"(gen_length/block_length = {n_blocks}); every block needs at least one step: "
                f"set steps >= {n_blocks} or raise block_length"
            )
        if self.steps % n_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks ({n_blocks}) "
                f"so every block gets the same number of steps; use steps="
                f"{(self.steps // n_blocks) * n_blocks or n_blocks}"
            )
        return self

    @property
    def steps_per_block(self) -> int:
        return self.steps // (self.gen_length // self.block_length)

    def _schedule(self, prompt_length: int):
        n_blocks = self.gen_length // self.block_length
        for block in range(n_blocks):
            end = prompt_length + (block + 1) * self.block_length
            for i in range(self.steps_per_block):
                yield block * self.steps_per_block + i, end

    def _choose(self, step, logits, probs, masked, window_end, generator):
        # A block is fully masked when it opens, so its per-step counts are fixed.
        block_masked = torch.full((masked.shape[0],), self.block_length, device=masked.device)
        counts = _even_split(block_masked, self.steps_per_block)[:, step % self.steps_per_block]
        tokens = _gumbel_argmax(logits, self.temperature, generator)
        if self.remasking == "low_confidence":
            confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        else:
            confidence = torch.rand(masked.shape, generator=generator, device=masked.device)
        confidence[:, window_end:] = -math.inf
        confidence = confidence.masked_fill(~masked, -math.inf)
        return _select_top(confidence, counts), tokens


def _even_split(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: (B, steps) counts summing to ``n_masked``."""
    base = (n_masked // steps)[:, None].repeat(1, steps)
    remainder = n_masked % steps
    base += torch.arange(steps, device=n_masked.device)[None] < remainder[:, None]
    return base


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """LLaDA's ``add_gumbel_noise`` + argmax (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = (-torch.log(noise)) ** temperature
    return (logits.exp() / gumbel).argmax(-1)


@register_sampler
class DreamSampler(SamplerBase):
    """Dream's ``diffusion_generate``: no blocks; at step ``i`` of ``steps`` the fraction
    ``1 - s/t`` of the remaining masked positions is committed, chosen by ``alg``:
    ``origin`` (random), ``maskgit_plus`` (top-1 probability), ``topk_margin``
    (top-1 minus top-2) or ``entropy`` (negative entropy)."""

    family: Literal[DREAM.name] = DREAM.name
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = "entropy"
    eps: float = Field(1e-3, gt=0.0, lt=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)
    alg_temp: float | None = Field(None, ge=0.0)

    def _schedule(self, prompt_length: int):
        for step in range(self.steps):
            yield step, prompt_length + self.gen_length

    def _choose(self, step, logits, probs, masked, window_end, generator):
        timesteps = torch.linspace(1, self.eps, self.steps + 1)
        t, s = timesteps[step].item(), timesteps[step + 1].item()
        last = step == self.steps - 1
        tokens, confidence = self._sample_tokens(logits, generator)
        if self.alg == "origin":
            p = 1.0 if last else 1 - s / t
            draw = torch.rand(masked.shape, generator=generator, device=masked.device)
            return masked & (draw < p), tokens
        n_masked = masked.sum(1)
        counts = n_masked if last else (n_masked.double() * (1 - s / t)).long()
        confidence = confidence.masked_fill(~masked, -math.inf)
        if not self.alg_temp:
            return _select_top(confidence, counts), tokens
        commit = torch.zeros_like(masked)
        weights = (confidence / self.alg_temp).softmax(-1)
        for row, k in enumerate(counts.tolist()):
            if k > 0:
                picked = torch.multinomial(weights[row], int(k), generator=generator)
                commit[row, picked] = True
        return commit, tokens

    def _sample_tokens(self, logits, generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1:
            logits = _top_p_filter(logits, self.top_p)
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = logits.softmax(-1)
        if self.temperature > 0:
            flat = torch.multinomial(probs.flatten(0, -2), 1, generator=generator)
            tokens = flat.view(probs.shape[:-1])
            confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        else:
            confidence, tokens = probs.max(-1)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[..., 0] - top2[..., 1]
        elif self.alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        return tokens, confidence


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def _as_batches(prompts: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Group 1-D prompts of equal length into batches (samplers take unpadded rows)."""
    if torch.is_tensor(prompts):
        return [prompts if prompts.dim() == 2 else prompts.unsqueeze(0)]
    by_length: dict[int, list[torch.Tensor]] = {}
    for p in prompts:
        by_length.setdefault(int(p.numel()), []).append(p.flatten())
    if not by_length:
        raise ValueError("no prompts given; pass at least one prompt")
    return [torch.stack(rows) for _, rows in sorted(by_length.items())]


def teacher_traces(
    teacher: nn.Module,
    sampler: SamplerBase,
    prompts,
    *,
    seed: int = 0,
    spec: DiffusionLMSpec,
) -> list[tuple[torch.Tensor, DiffusionTrace]]:
    """The teacher's own (prompt batch, trace) pairs; reuse them for every student.

    One progress bar over all denoising steps of all batches, so its ETA is meaningful even
    when every prompt fits one batch.
    """
    batches = _as_batches(prompts)
    desc = f"rollouts ({sum(len(b) for b in batches)} prompts)"
    traces = []
    with progress(total=sampler.steps * len(batches), desc=desc) as bar:
        for batch in batches:
            trace = sampler.generate(
                teacher, batch, seed=seed, spec=spec, on_step=lambda *_: bar.update()
            )
            traces.append((batch, trace))
    return traces


#: Seconds between updates of a progress bar written to a file or pipe (not a terminal).
REDIRECTED_BAR_INTERVAL = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm for the project's long loops: transient, with an ETA, and shown even where the
    command line hides library bars (``TQDM_DISABLE``).

    When stderr is not a terminal (``2> log``, CI) a bar cannot redraw in place: every
    update of a nested bar becomes a new line (docs/evaluation.md says how many). There only the
    outermost bar is shown, updated every :data:`REDIRECTED_BAR_INTERVAL` seconds.
    """
    kwargs.setdefault("leave", False)
    disable = False
    if not _stderr_is_terminal():
        kwargs.setdefault("mininterval", REDIRECTED_BAR_INTERVAL)
        disable = bool(tqdm._instances)  # only enabled bars are registered there
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def sampler_for(spec: DiffusionLMSpec, **settings) -> SamplerBase:
    """The family's own sampler with ``settings`` (unknown keys raise a ValidationError)."""
    return family(spec.family).sampler(**settings)


def sampler_settings(spec: DiffusionLMSpec, gen_length: int = 32, **overrides) -> dict:
    """The settings of :func:`default_sampler`: one token per step and (LLaDA) the whole
    answer as one block (the family's ``answer_length_fields``), then ``overrides``."""
    fields = ("steps", "gen_length", *family(spec.family).answer_length_fields)
    return {**dict.fromkeys(fields, gen_length), **overrides}


def default_sampler(spec: DiffusionLMSpec, gen_length: int = 32, **overrides) -> SamplerBase:
    """One token per step, the whole answer as one block: the finest-grained frontier
    (``overrides``: any other sampler field, e.g. ``steps`` or ``temperature``). The one
    sampler factory of Stage I, ``evaluate`` / ``diagnose`` and the lm-eval model."""
    return sampler_for(spec, **sampler_settings(spec, gen_length, **overrides))
