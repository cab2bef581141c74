"""Autograd face of the fused LM-head cross-entropy: two Functions, two interchangeable op sets.

``LeafeRowLoss.apply(hidden, weight, bias, rows, targets, softcap, z_loss, backend)`` returns the
per-row loss ``lse_i - z_{i,t_i} + z_loss * lse_i**2`` (fp32, differentiable) and the per-row
cross-entropy ``lse_i - z_{i,t_i}`` (detached, for logging). Only the ``[M]`` log-sum-exp is saved
between passes; the backward recomputes logits block by block (the "recompute" family: 8·M·H·V flops).
Per-row scales (lambda_g * w_i / norm_g) are applied outside by autograd on the ``[M]`` result, which
is why the backward receives a per-row upstream gradient. ``LeafeScaledLoss`` (below) is the
gradient-in-forward variant for scalar reductions (6·M·H·V flops) on op sets that offer it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import leafe_ce_torch

BACKENDS = ("triton", "torch")


def _ops(backend: str) -> Any:
    if backend == "torch":
        return leafe_ce_torch
    if backend == "triton":
        from . import leafe_ce_triton

        return leafe_ce_triton
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")


def _needed_grads(ctx: Any, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """Which of hidden, weight, bias want a gradient (never bias when there is none)."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return need_h, need_w, need_b and bias is not None


def _row_losses(lse: torch.Tensor, tgt: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse - z_t + z_loss * lse**2, lse - z_t)`` per row: two distinct tensors, because the second
    leaves the Function as its own (non-differentiable) output."""
    ce = lse - tgt
    return (ce + z_loss * lse * lse if z_loss else ce.clone()), ce


class LeafeRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        softcap: float | None,
        z_loss: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _ops(backend)
        lse, tgt = ops.forward(hidden, weight, bias, rows, targets, softcap)
        row_loss, ce = _row_losses(lse, tgt, z_loss)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        ctx.softcap, ctx.z_loss, ctx.backend = softcap, z_loss, backend
        ctx.mark_non_differentiable(ce)
        return row_loss, ce

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor, _grad_ce: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = _needed_grads(ctx, bias)
        d_h = d_w = d_b = None
        if rows.numel() == 0:
            d_h = torch.zeros_like(hidden) if need_h else None
            d_w = torch.zeros_like(weight) if need_w else None
            d_b = torch.zeros_like(bias) if need_b else None
        elif need_h or need_w or need_b:
            # no autocast in here even if backward() is called inside one: the ops keep the inputs' dtype
            with torch.autocast(hidden.device.type, enabled=False):
                d_h, d_w, d_b = _ops(ctx.backend).backward(
                    hidden, weight, bias, rows, targets, lse, grad_rows.contiguous(),
                    ctx.softcap, ctx.z_loss, need_h, need_w, need_b,
                )
        return d_h, d_w, d_b, None, None, None, None, None


class LeafeScaledLoss(torch.autograd.Function):
    """Scalar ``sum_i row_scale[i] * loss_i`` with its gradients formed during the forward.

    For the scalar reductions the per-row scales (lambda_g w_i / norm_g) are known before the
    backward, so ops that provide ``forward_backward`` (the chunked torch path) get loss and gradients
    from one logits pass; the backward only multiplies by the incoming scalar. Returns
    ``(loss, ce [M] detached)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        row_scale: torch.Tensor,
        softcap: float | None,
        z_loss: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _ops(backend)
        need_h, need_w, need_b = _needed_grads(ctx, bias)
        if need_h or need_w or need_b:
            lse, tgt, d_h, d_w, d_b = ops.forward_backward(
                hidden, weight, bias, rows, targets, row_scale, softcap, z_loss, need_h, need_w, need_b
            )
        else:
            (lse, tgt), d_h, d_w, d_b = ops.forward(hidden, weight, bias, rows, targets, softcap), None, None, None
        row_loss, ce = _row_losses(lse, tgt, z_loss)
        loss = (row_scale.to(row_loss.dtype) * row_loss).sum()
        ctx.grads = (d_h, d_w, d_b)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_ce: torch.Tensor | None) -> tuple[Any, ...]:
        d_h, d_w, d_b = ctx.grads
        scale = None if bool(grad_loss == 1) else grad_loss

        def scaled(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or scale is None else t * scale.to(t.dtype)

        return scaled(d_h), scaled(d_w), scaled(d_b), None, None, None, None, None, None
