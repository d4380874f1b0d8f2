"""Plain maths of FAIR-Calib Stage II: the weighted least-squares target of one linear layer.

At W4A4 the layer that is deployed computes ``Q @ quant(x_q)``: quantized weights applied to
4-bit activations of the *quantized* model's own input ``x_q``. What should come out is the
full-precision model's ``W @ x_fp``. Stage II fits ``Q`` to

    sum_t w_t || Q x~_t - W x_t ||^2,      x~_t = quant(x_q,t),  x_t = x_fp,t,

with ``w_t`` the Stage I frontier weight of token ``t``. Writing ``H = sum w x~ x~^T`` and
``C = sum w x x~^T``, the objective is ``||(Q - W*) X~||^2`` plus a constant, with the
least-squares weight ``W* = W C H^-1`` (normal equations; damped in
:func:`fp_target_weight`). So the fit is exactly GPTQ run on
``W*`` with Hessian ``H`` (the asymmetric calibration of GPTAQ, Li et al. 2025, here with token
weights): :func:`fp_target_weight` computes ``W*`` and llm-compressor's own GPTQ quantizes it.

``W*`` is where the activation error is reached: it absorbs, in the least-squares sense, the
4-bit activation noise of this layer's input and the drift that earlier quantized layers left
in ``x_q``, on the tokens the frontier prior says decide the answer.
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_cross_covariance", "fp_target_weight", "PRECISION"]

PRECISION = torch.float32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(tokens, features)`` view of a linear layer's input."""
    return x.reshape(-1, x.shape[-1]).to(PRECISION)


def accumulate_cross_covariance(
    target_inputs: torch.Tensor, quantized_inputs: torch.Tensor, cross: torch.Tensor
) -> torch.Tensor:
    """``cross += 2 X X~^T`` for one batch, scaled like llm-compressor's GPTQ Hessian.

    Both inputs already carry ``sqrt(w_t)`` per token; with the same factor 2 and the same
    sample count as ``accumulate_hessian`` the ratio ``C H^-1`` is scale-free.
    """
    x, x_q = _rows(target_inputs), _rows(quantized_inputs)
    if x.shape != x_q.shape:
        raise ValueError(
            f"full-precision input {tuple(x.shape)} and quantized input {tuple(x_q.shape)} "
            "differ in shape; both streams must see the same calibration batch"
        )
    cross += 2 * x.T @ x_q
    return cross


def fp_target_weight(
    weight: torch.Tensor,
    cross: torch.Tensor,
    hessian: torch.Tensor,
    *,
    dampening_frac: float = 0.01,
    strength: float = 1.0,
) -> torch.Tensor:
    """``W + strength * (W* - W)`` in the weight's dtype, ``W* = W (C + lI) (H + lI)^-1``.

    ``W*`` is the ridge solution of ``sum w ||Q x~ - W x||^2 + l ||Q - W||^2``: the penalty
    pulls towards the full-precision weight (so ``W* = W`` exactly when the quantized model's
    inputs equal the full-precision ones) and keeps the solve stable when few tokens span the
    input space. ``l = dampening_frac * mean(diag H)``, GPTQ's own damping. ``strength`` in
    ``[0, 1]`` shrinks the correction further (0 gives plain GPTQ on ``H``).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    w = weight.to(PRECISION)
    h = hessian.to(device=w.device, dtype=PRECISION)
    damp = dampening_frac * torch.diagonal(h).mean().clamp(min=1e-8)
    h = h + damp * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    # W* (H + lI) = W C + l W; H + lI is symmetric positive definite
    rhs = w @ cross.to(w.device, PRECISION) + damp * w
    target = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(h)).T
    return (w + strength * (target - w)).to(weight.dtype)
