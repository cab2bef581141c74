"""Autograd face of the fused LM-head cross-entropy: two Functions over interchangeable op sets.

An op set (``leafe_ce_torch`` or ``leafe_ce_triton``) offers, on a :class:`LossHead`:

- ``forward(head) -> (lse [M], target_logit [M])`` (fp32; fp64 for fp64 inputs),
- ``backward(head, lse, grad_rows, needs, schedule) -> (d_hidden, d_weight, d_bias)``: the recompute
  family (logits computed again in the backward: 8·M·H·V flops in all),
- ``forward_backward(head, row_scale, needs) -> (lse, tgt, d_hidden, d_weight, d_bias)``: gradient in
  forward (6·M·H·V flops), possible when the per-row scales are known before the backward, as they are
  for the scalar reductions.

``LeafeRowLoss`` returns the per-row loss ``lse_i - z_{i,t_i} + z_loss * lse_i**2`` (differentiable; the
per-row scales are applied outside by autograd, so its backward receives a per-row upstream gradient)
and the per-row cross-entropy (detached, for logging). ``LeafeScaledLoss`` returns the scalar
``sum_i row_scale_i * loss_i`` with its gradients formed in the forward; its backward only multiplies
them by the incoming scalar.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import leafe_ce_torch
from .leafe_ce_operands import NO_GRADS, GradNeeds, LossHead


class Impl(NamedTuple):
    """How a named implementation runs: which op set, and which backward schedule when recomputing."""

    ops: str  # "torch" | "triton"
    in_forward: bool  # gradient in forward for scalar reductions
    schedule: str | None = None  # recompute backward schedule of the op set ("gemm" | "atomic" for triton)


# The named implementations (LossOptions.impl). "auto" is resolved in leafe_fast.loss.
IMPLS: dict[str, Impl] = {
    "chunked": Impl("triton", True, "gemm"),  # row chunks: cuBLAS logits + Triton row kernel + cuBLAS grads
    "triton_gemm": Impl("triton", False, "gemm"),  # fused online-lse forward, recompute: dlogits chunks + cuBLAS
    "triton_atomic": Impl("triton", False, "atomic"),  # fused online-lse forward, recompute: one atomic kernel
    "torch": Impl("torch", True, None),  # the chunked schedule in torch (fp32 math): the CPU path
}


def ops_for(impl: Impl) -> Any:
    if impl.ops == "torch":
        return leafe_ce_torch
    from . import leafe_ce_triton

    return leafe_ce_triton


def _needs(ctx: Any, bias: torch.Tensor | None) -> GradNeeds:
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return GradNeeds(need_h, need_w, need_b and bias is not None)


def _row_losses(lse: torch.Tensor, tgt: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse - z_t + z_loss * lse**2, lse - z_t)`` per row: two distinct tensors, because the second
    leaves the Function as its own (non-differentiable) output."""
    ce = lse - tgt
    return (ce + z_loss * lse * lse if z_loss else ce.clone()), ce


def _forward_only(impl: Impl, head: LossHead) -> tuple[torch.Tensor, torch.Tensor]:
    ops = ops_for(impl)
    if impl.in_forward and impl.ops == "triton":
        lse, tgt, *_ = ops.forward_backward(head, None, NO_GRADS)  # the row-chunked pass, no gradients
        return lse, tgt
    return ops.forward(head)


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
        impl: Impl,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head = LossHead(hidden, weight, bias, rows, targets, softcap, z_loss)
        lse, tgt = _forward_only(impl, head)
        row_loss, ce = _row_losses(lse, tgt, z_loss)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        ctx.softcap, ctx.z_loss, ctx.impl = softcap, z_loss, impl
        ctx.mark_non_differentiable(ce)
        return row_loss, ce

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor, _grad_ce: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        needs = _needs(ctx, bias)
        grads: tuple[Any, Any, Any] = (None, None, None)
        if rows.numel() == 0:
            grads = tuple(torch.zeros_like(t) if need else None for t, need in zip((hidden, weight, bias), needs))
        elif needs.any:
            head = LossHead(hidden, weight, bias, rows, targets, ctx.softcap, ctx.z_loss)
            # no autocast in here even if backward() is called inside one: the ops keep the inputs' dtype
            with torch.autocast(hidden.device.type, enabled=False):
                grads = ops_for(ctx.impl).backward(head, lse, grad_rows.contiguous(), needs, ctx.impl.schedule)
        return (*grads, None, None, None, None, None)


class LeafeScaledLoss(torch.autograd.Function):
    """Scalar ``sum_i row_scale[i] * loss_i`` with its gradients formed during the forward.

    Returns ``(loss, ce [M] detached)``. The gradients live on ``ctx`` until the backward, which scales
    them by the incoming scalar (no work at all when it is 1).
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
        impl: Impl,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head = LossHead(hidden, weight, bias, rows, targets, softcap, z_loss)
        needs = _needs(ctx, bias)
        if needs.any:
            lse, tgt, d_h, d_w, d_b = ops_for(impl).forward_backward(head, row_scale, needs)
        else:
            (lse, tgt), d_h, d_w, d_b = _forward_only(impl, head), None, None, None
        row_loss, ce = _row_losses(lse, tgt, z_loss)
        loss = (row_scale.to(row_loss.dtype) * row_loss).sum()
        ctx.grads = (d_h, d_w, d_b)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_ce: torch.Tensor | None) -> tuple[Any, ...]:
        d_h, d_w, d_b = ctx.grads
        # No host sync: an upstream gradient of exactly 1 (the usual case) still costs one cheap multiply.

        def scaled(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t * grad_loss.to(t.dtype)

        return scaled(d_h), scaled(d_w), scaled(d_b), None, None, None, None, None, None
