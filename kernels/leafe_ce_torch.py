"""Chunked torch twin of the Triton kernels: same two passes, same semantics, any device.

Used on the CPU (and as a fallback where Triton is unavailable). Rows are processed in chunks of at
most ``max_chunk_elems // V`` so the largest temporary is a ``[chunk, V]`` logits block, never the full
``[M, V]``. Arithmetic is fp32 (fp64 when the inputs are fp64, which is what gradcheck needs).

``forward`` + ``backward`` (recompute family): the forward keeps only each row's log-sum-exp; the backward
recomputes each logits block, forms ``dlogits`` from the saved log-sum-exp and the per-row upstream
gradient, and feeds it into the two matmuls (d_hidden rows, d_weight) and d_bias. ``forward_backward``
(gradient-in-forward) does it in one pass when the per-row scales are known at forward time.
"""

from __future__ import annotations

import torch

from .leafe_ce_operands import NO_GRADS, GradNeeds, LossHead

DEFAULT_MAX_CHUNK_ELEMS = 1 << 22  # 4M logits per block: 16 MiB in fp32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(m: int, v: int, max_chunk_elems: int) -> tuple[range, int]:
    step = max(1, max_chunk_elems // max(1, v))
    return range(0, m, step), step


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def forward(head: LossHead, max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(lse [M], target_logit [M])`` in the compute dtype."""
    lse, tgt, *_ = _chunk_pass(head, None, None, NO_GRADS, max_chunk_elems)
    return lse, tgt


def _dlogits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor,
             softcap: float | None, z_loss: float) -> torch.Tensor:
    """In place on ``z``: g_i * (softmax_ij * (1 + 2 z_loss lse_i) - [j == t_i]) * softcap'(z_ij)."""
    cap_grad = 1.0 - (z / softcap) ** 2 if softcap is not None else None
    dz = z.sub_(lse[:, None]).exp_().mul_((g * (1.0 + 2.0 * z_loss * lse))[:, None])
    dz.scatter_add_(1, targets[:, None], -g[:, None])
    return dz.mul_(cap_grad) if cap_grad is not None else dz


def _chunk_pass(
    head: LossHead,
    g_rows: torch.Tensor | None,
    lse: torch.Tensor | None,
    needs: GradNeeds,
    max_chunk_elems: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one chunk loop of all three passes. ``lse=None``: compute lse and the target logit here
    (forward, gradient-in-forward), else reuse the saved lse (recompute). No gradient asked for
    (forward): no dlogits, ``g_rows`` unused."""
    hidden, weight, bias, rows, targets, softcap, z_loss = head
    need_hidden, need_weight, need_bias = needs
    cdt = _compute_dtype(hidden.dtype)
    m, v = rows.numel(), weight.shape[0]
    dev = hidden.device
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    lse_out = torch.empty(m, dtype=cdt, device=dev) if lse is None else lse.to(cdt)
    tgt_out = torch.empty(m, dtype=cdt, device=dev)
    d_rows = torch.zeros(m, hidden.shape[1], dtype=cdt, device=dev) if need_hidden else None
    d_w = torch.zeros_like(w) if need_weight else None
    d_b = torch.zeros(v, dtype=cdt, device=dev) if need_bias else None
    starts, step = _row_chunks(m, v, max_chunk_elems)
    for s in starts:
        e = min(m, s + step)
        h = hidden[rows[s:e]].to(cdt)
        z = _logits(h, w, b, softcap)
        if lse is None:
            lse_out[s:e] = torch.logsumexp(z, dim=1)
            tgt_out[s:e] = z.gather(1, targets[s:e, None]).squeeze(1)
        if not (need_hidden or need_weight or need_bias):
            continue
        dz = _dlogits(z, lse_out[s:e], targets[s:e], g_rows[s:e].to(cdt), softcap, z_loss)
        if d_rows is not None:
            torch.mm(dz, w, out=d_rows[s:e])
        if d_w is not None:
            d_w.addmm_(dz.T, h)
        if d_b is not None:
            d_b += dz.sum(0)
    d_hidden = None
    if d_rows is not None:
        d_hidden = torch.zeros(hidden.shape, dtype=cdt, device=dev).index_add_(0, rows, d_rows).to(hidden.dtype)
    return (
        lse_out,
        tgt_out,
        d_hidden,
        None if d_w is None else d_w.to(weight.dtype),
        None if d_b is None else d_b.to(bias.dtype),
    )


def backward(
    head: LossHead,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    needs: GradNeeds,
    schedule: str | None = None,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i grad_rows[i] * (lse_i - z_{i,t_i} + z_loss * lse_i**2)`` (recompute pass).

    d logit_ij = grad_i * (softmax_ij * (1 + 2 z_loss lse_i) - [j == t_i]), times the soft-cap
    derivative ``1 - (z_ij / cap)**2`` when capping. d_hidden accumulates repeated rows (index_add).
    ``schedule`` is accepted for the op-set interface; the torch twin has one.
    """
    del schedule
    return _chunk_pass(head, grad_rows, lse, needs, max_chunk_elems)[2:]


def forward_backward(
    head: LossHead,
    row_scale: torch.Tensor | None,
    needs: GradNeeds,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradient in forward: one logits pass gives lse, target logit and the gradients of
    ``sum_i row_scale[i] * loss_i`` (6·M·H·V flops instead of 8), when the per-row scales are known
    up front, as they are for the scalar reductions. Each chunk holds its whole row of V logits, so
    the normaliser is known before the gradient is formed.
    """
    return _chunk_pass(head, row_scale, None, needs, max_chunk_elems)
