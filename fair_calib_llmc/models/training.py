"""LLaDA's pre-training objective, used to build the project's own reference dLLMs.

Each sequence gets a masking ratio ``t ~ U(eps, 1]``; each token is masked with probability
``t``; the loss is the cross-entropy on masked tokens weighted by ``1/t`` and averaged over all
tokens of the batch (LLaDA, eq. 3). Deterministic for a seed on a given device.
"""

from __future__ import annotations

import time

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from fair_calib_llmc.models.family import DiffusionLMSpec, align_logits, diffusion_spec

__all__ = ["masked_diffusion_loss", "train_masked_diffusion"]


def masked_diffusion_loss(
    model: nn.Module,
    x: torch.Tensor,
    generator: torch.Generator,
    eps: float = 1e-3,
    *,
    spec: DiffusionLMSpec,
) -> torch.Tensor:
    """LLaDA's ``1/t``-weighted masked cross-entropy for a batch ``x`` of shape (B, L)."""
    batch, length = x.shape
    t = (1 - eps) * torch.rand(batch, generator=generator, device=x.device) + eps
    p_mask = t[:, None].expand(batch, length)
    masked = torch.rand(batch, length, generator=generator, device=x.device) < p_mask
    noisy = torch.where(masked, spec.mask_token_id, x)
    logits = align_logits(model(input_ids=noisy).logits, spec)
    ce = nn.functional.cross_entropy(logits[masked].float(), x[masked], reduction="none")
    return (ce / p_mask[masked]).sum() / (batch * length)


def train_masked_diffusion(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    max_seconds: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Train ``model`` in place on random windows of the 1-D ``tokens`` stream.

    AdamW with transformers' linear warm-up + cosine decay schedule; stops early after
    ``max_seconds``. Returns the loss of every step.
    """
    spec = diffusion_spec(model)
    device = next(model.parameters()).device
    if tokens.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} training tokens, got {tokens.numel()}")
    generator = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    tokens = tokens.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    losses: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(steps), desc="masked-diffusion training")
    for step in bar:
        offsets = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=cpu_gen)
        x = torch.stack([tokens[o : o + seq_len] for o in offsets.tolist()])
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = masked_diffusion_loss(model, x, generator, spec=spec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            logger.info(f"stopping after {step + 1} steps: time budget {max_seconds}s reached")
            break
    model.eval()
    return losses
