"""LEAFE's Stage-2 loss: fused LM head + masked, weighted, per-group cross-entropy.

For M selected positions ``rows`` of ``hidden [N, H]`` (rows may repeat: one position can have several
targets) with targets ``t``, weights ``w`` and groups ``g`` (0 rehearsal, 1 counterfactual, a few more
allowed), the naive torch expression this module computes, without ever materialising ``[M, V]``
logits on the GPU, is::

    z   = hidden[rows].float() @ weight.float().T (+ bias)          # [M, V]
    z   = softcap * tanh(z / softcap)                                 # if softcap
    lse = logsumexp(z, -1);  ce = lse - z[i, t_i]
    l_i = ce_i + z_loss * lse_i ** 2
    L   = sum_g lambda_g * sum_{i in g} w_i * l_i / norm_g

``norm_g`` is the global normaliser of group g for the whole optimizer step (all micro-batches, all
data-parallel ranks; see :func:`group_norms`), so gradient accumulation and FSDP give the gradient of one
big batch. With ``norms=None``: ``reduction="mean"`` uses the local per-group counts, ``"sum"`` uses 1.
A group whose normaliser is 0 contributes 0 (its rows get zero gradient), so an empty group is never a
NaN. ``reduction="none"`` returns the per-row contributions ``lambda_g w_i l_i / norm_g`` (their sum is
the scalar loss). ``weights`` and ``norms`` are constants: no gradient flows into them. Label smoothing
is not offered (off, as LEAFE uses it).

Backends: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``; forward = fused online
log-sum-exp kernel, backward = recomputed dlogits, see ``leafe_fast.kernels.leafe_ce_triton``),
``"torch"`` (chunked over rows, any device; gradient formed in the forward for scalar reductions;
upcasts the weight to fp32, so it is the CPU path, not a GPU one), ``"reference"`` (float64,
materialises everything: tests only), ``"auto"`` (triton on CUDA, torch elsewhere and for float64).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from leafe_fast.kernels.leafe_ce_autograd import LeafeRowLoss, LeafeScaledLoss

IGNORE_INDEX = -100
REDUCTIONS = ("sum", "mean", "none")
BACKENDS = ("auto", "triton", "torch", "reference")

__all__ = [
    "IGNORE_INDEX",
    "LeafeLoss",
    "LeafeLossOutput",
    "group_norms",
    "leafe_loss",
    "leafe_loss_from_labels",
    "reference_leafe_loss",
]


@dataclass
class LeafeLossOutput:
    """``loss`` is differentiable; the per-group statistics are detached, for logging."""

    loss: torch.Tensor  # scalar, or [M] for reduction="none"
    group_sums: torch.Tensor  # [G] sum of w_i * CE_i per group (CE without the z-loss term)
    group_counts: torch.Tensor  # [G] number of targets per group
    group_weight_sums: torch.Tensor  # [G] sum of w_i per group


# --------------------------------------------------------------------------------------------------
# validation: one door, errors that name the problem


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    bias: torch.Tensor | None,
    num_groups: int,
    check_ranges: bool,
) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"leafe_loss: hidden must be a 2-D tensor [N, H], got {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"leafe_loss: weight must be a 2-D tensor [V, H], got {tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"leafe_loss: hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)} "
            "(both need the same H)"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"leafe_loss: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"leafe_loss: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.device != weight.device:
        raise ValueError(f"leafe_loss: hidden is on {hidden.device}, weight on {weight.device}")
    if weight.shape[0] == 0:
        raise ValueError("leafe_loss: weight has V = 0 rows (empty vocabulary)")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"leafe_loss: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"leafe_loss: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    m = rows.shape[0] if rows.dim() == 1 else -1
    for name, t in (("rows", rows), ("targets", targets), ("weights", weights), ("group", group)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != m:
            raise ValueError(
                f"leafe_loss: rows, targets, weights and group must be 1-D of one length M; "
                f"rows is {tuple(rows.shape)}, {name} is {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != hidden.device:
            raise ValueError(f"leafe_loss: {name} is on {t.device}, hidden on {hidden.device}")
    for name, t in (("rows", rows), ("targets", targets), ("group", group)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"leafe_loss: {name} must be an integer tensor, got {t.dtype}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"leafe_loss: weights must be a float tensor, got {weights.dtype}")
    if check_ranges and m > 0:
        # One host sync on CUDA; pass check_ranges=False in a hot loop whose inputs are trusted.
        stats = torch.stack([rows.min(), rows.max(), targets.min(), targets.max(), group.min(), group.max()]).tolist()
        n, v = hidden.shape[0], weight.shape[0]
        if stats[0] < 0 or stats[1] >= n:
            raise IndexError(f"leafe_loss: rows out of range [0, {n}): min {stats[0]}, max {stats[1]}")
        if stats[2] < 0 or stats[3] >= v:
            raise IndexError(
                f"leafe_loss: targets out of range [0, {v}): min {stats[2]}, max {stats[3]} "
                f"(ignored positions (-100) must be dropped before leafe_loss; leafe_loss_from_labels does it)"
            )
        if stats[4] < 0 or stats[5] >= num_groups:
            raise IndexError(f"leafe_loss: group ids out of range [0, {num_groups}): min {stats[4]}, max {stats[5]}")


def _resolve_groups(
    lambdas: float | Sequence[float] | torch.Tensor, num_groups: int | None
) -> tuple[torch.Tensor, int]:
    lam = torch.as_tensor(lambdas, dtype=torch.float64).flatten()
    if num_groups is None:
        num_groups = lam.numel()
    if num_groups < 1:
        raise ValueError(f"leafe_loss: num_groups must be >= 1, got {num_groups}")
    if lam.numel() == 1 and num_groups > 1:
        lam = lam.expand(num_groups)
    if lam.numel() != num_groups:
        raise ValueError(f"leafe_loss: got {lam.numel()} lambdas for {num_groups} groups")
    return lam, num_groups


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"leafe_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "leafe_loss: backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 (set before importing "
            "triton) to run the kernels on the CPU; use backend='torch' on the CPU"
        )
    return backend


def _group_stats(
    group: torch.Tensor, weights: torch.Tensor, ce: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = group.long()
    dev = ce.device
    sums = torch.zeros(num_groups, dtype=ce.dtype, device=dev).index_add_(0, g, weights.to(ce.dtype) * ce.detach())
    ones = torch.ones_like(g, dtype=torch.float32)
    counts = torch.zeros(num_groups, dtype=torch.float32, device=dev).index_add_(0, g, ones)
    wsums = torch.zeros(num_groups, dtype=torch.float32, device=dev).index_add_(0, g, weights.float())
    return sums, counts, wsums


def _row_scales(
    group: torch.Tensor,
    weights: torch.Tensor,
    lam: torch.Tensor,
    norms: torch.Tensor | Sequence[float] | None,
    reduction: str,
    counts: torch.Tensor,
    num_groups: int,
    dtype: torch.dtype,
    validate: bool = True,
) -> torch.Tensor:
    """Per-row constant ``lambda_g * w_i / norm_g`` (0 where norm_g == 0)."""
    dev = weights.device
    if norms is not None:
        norm = torch.as_tensor(norms, dtype=torch.float64, device=dev).flatten()
        if norm.numel() != num_groups:
            raise ValueError(f"leafe_loss: norms has {norm.numel()} entries for {num_groups} groups")
        if validate and bool((norm < 0).any()):
            raise ValueError(f"leafe_loss: norms must be >= 0, got {norm.tolist()}")
    elif reduction == "mean":
        norm = counts.to(torch.float64)
    else:
        norm = torch.ones(num_groups, dtype=torch.float64, device=dev)
    per_group = torch.where(norm > 0, lam.to(dev) / norm.clamp_min(1e-300), torch.zeros_like(norm))
    return (per_group.to(dtype)[group.long()] * weights.to(dtype)).detach()


# --------------------------------------------------------------------------------------------------
# public API


def leafe_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    *,
    lambdas: float | Sequence[float] | torch.Tensor = (1.0, 1.0),
    norms: torch.Tensor | Sequence[float] | None = None,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "sum",
    num_groups: int | None = None,
    backend: str = "auto",
    check_ranges: bool = True,
) -> LeafeLossOutput:
    """LEAFE loss over the selected rows (see the module docstring for the exact formula).

    Args:
        hidden: ``[N, H]`` final hidden states (after the last norm), fp32/bf16/fp16.
        weight: ``[V, H]`` LM-head weight, same dtype. ``bias``: optional ``[V]``.
        rows, targets: ``[M]`` int; ``hidden[rows[i]]`` predicts ``targets[i]``; rows may repeat.
        weights: ``[M]`` float per-target weights. ``group``: ``[M]`` int in ``[0, G)``.
        lambdas: per-group multipliers (a scalar is broadcast); G = len(lambdas) unless ``num_groups``.
        norms: ``[G]`` global normalisers from :func:`group_norms`; None -> see ``reduction``.
        z_loss: coefficient of ``lse**2``. softcap: ``c`` in ``c * tanh(z / c)``; None or 0 disables.
        check_ranges: verify rows/targets/group ranges and norms >= 0 (host syncs on CUDA; a trainer
            whose inputs come from the packer may turn it off).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"leafe_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and softcap <= 0:
        if softcap == 0:
            softcap = None
        else:
            raise ValueError(f"leafe_loss: softcap must be positive (or None), got {softcap}")
    if z_loss < 0:
        raise ValueError(f"leafe_loss: z_loss must be >= 0, got {z_loss}")
    lam, num_groups = _resolve_groups(lambdas, num_groups)
    _check_inputs(hidden, weight, rows, targets, weights, group, bias, num_groups, check_ranges)
    backend = _resolve_backend(backend, hidden.device, hidden.dtype)
    if backend == "reference":
        return reference_leafe_loss(
            hidden, weight, rows, targets, weights, group, lambdas=lam, norms=norms, bias=bias,
            z_loss=z_loss, softcap=softcap, reduction=reduction, num_groups=num_groups,
        )
    rows_l, targets_l = rows.long().contiguous(), targets.long().contiguous()
    tensors = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), rows_l, targets_l)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g_long = group.long()
    counts = torch.zeros(num_groups, dtype=torch.float32, device=group.device).index_add_(
        0, g_long, torch.ones_like(g_long, dtype=torch.float32)
    )  # not bincount: that syncs with the host on CUDA
    scale = _row_scales(group, weights, lam, norms, reduction, counts, num_groups, acc, check_ranges)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )  # Function.forward cannot tell no_grad from grad mode, so decide here
    # Autocast (an HF Trainer with bf16=True) would recast the chunked torch path's matmuls to bf16 inside
    # the Functions (wrong dtype for its fp32 buffers, lost precision); the inputs' dtype is the contract.
    with torch.autocast(hidden.device.type, enabled=False):
        if backend == "torch" and reduction != "none" and wants_grad:
            # gradient in forward: one logits pass instead of two (see LeafeScaledLoss)
            loss, ce = LeafeScaledLoss.apply(*tensors, scale, softcap, float(z_loss), backend)
        else:
            row_loss, ce = LeafeRowLoss.apply(*tensors, softcap, float(z_loss), backend)
            contrib = scale * row_loss
            loss = contrib if reduction == "none" else contrib.sum()
    sums, counts, wsums = _group_stats(group, weights, ce, num_groups)
    return LeafeLossOutput(loss, sums, counts, wsums)


def reference_leafe_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    *,
    lambdas: float | Sequence[float] | torch.Tensor = (1.0, 1.0),
    norms: torch.Tensor | Sequence[float] | None = None,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "sum",
    num_groups: int | None = None,
) -> LeafeLossOutput:
    """Plain float64 torch, materialising ``[M, V]``: the truth the fast paths are tested against."""
    lam, num_groups = _resolve_groups(lambdas, num_groups)
    f64 = torch.float64
    z = hidden.to(f64)[rows.long()] @ weight.to(f64).T
    if bias is not None:
        z = z + bias.to(f64)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1) if z.shape[0] else z.new_zeros(0)
    ce = lse - z.gather(1, targets.long()[:, None]).squeeze(1)
    row_loss = ce + z_loss * lse**2
    sums, counts, wsums = _group_stats(group, weights, ce, num_groups)
    scale = _row_scales(group, weights, lam, norms, reduction, counts, num_groups, f64)
    contrib = scale * row_loss
    return LeafeLossOutput(contrib if reduction == "none" else contrib.sum(), sums, counts, wsums)


def labels_to_rows(
    labels: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    *,
    shift: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    default_group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF-style labels -> ``(rows, targets, weights, group)`` over the flattened positions.

    ``labels`` is ``[N]`` (packed) or ``[B, S]``, aligned with ``input_ids``, -100 = ignored. With
    ``shift=True`` position ``t`` predicts ``labels[t + 1]`` within a sequence (never across rows of a
    batch, nor across packed samples when ``cu_seqlens`` is given). ``group_ids`` / ``token_weights`` are
    per label token (same shape as labels) or per sample (``[B]``, for 2-D labels only).
    """
    if labels.dim() not in (1, 2):
        raise ValueError(f"leafe_loss_from_labels: labels must be [N] or [B, S], got {tuple(labels.shape)}")
    lab2 = labels if labels.dim() == 2 else labels[None]
    b, s = lab2.shape

    def per_token(x: torch.Tensor | None, name: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
        if x is None:
            return torch.full((b, s), fill, dtype=dtype, device=labels.device)
        x = torch.as_tensor(x, device=labels.device)
        if x.shape == labels.shape:
            return x.reshape(b, s)
        if labels.dim() == 2 and x.shape == (b,):
            return x[:, None].expand(b, s)
        raise ValueError(
            f"leafe_loss_from_labels: {name} must be shaped like labels {tuple(labels.shape)} or [B], "
            f"got {tuple(x.shape)}"
        )

    grp = per_token(group_ids, "group_ids", default_group, torch.long)
    wts = per_token(token_weights, "token_weights", 1.0, torch.float32)
    pos = torch.arange(b * s, device=labels.device).reshape(b, s)
    if shift:
        lab, grp, wts, pos = lab2[:, 1:], grp[:, 1:], wts[:, 1:], pos[:, :-1]
        valid = lab != IGNORE_INDEX
        if cu_seqlens is not None:
            if labels.dim() != 1:
                raise ValueError("leafe_loss_from_labels: cu_seqlens applies to packed 1-D labels only")
            starts = torch.zeros(s, dtype=torch.bool, device=labels.device)
            starts[cu_seqlens.long()[(cu_seqlens > 0) & (cu_seqlens < s)]] = True
            valid = valid & ~starts[1:][None]  # label at a sample start is never predicted by the previous sample
    else:
        lab, valid = lab2, lab2 != IGNORE_INDEX
    return pos[valid], lab[valid].long(), wts[valid].float(), grp[valid].long()


def leafe_loss_from_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    *,
    shift: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> LeafeLossOutput:
    """Convenience form: ``hidden`` ``[N, H]`` or ``[B, S, H]`` with HF labels (see :func:`labels_to_rows`)."""
    if hidden.dim() == 3:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"leafe_loss_from_labels: labels {tuple(labels.shape)} must match hidden's [B, S] {tuple(hidden.shape[:2])}"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])
    elif hidden.dim() == 2:
        if labels.shape != hidden.shape[:1]:
            raise ValueError(
                f"leafe_loss_from_labels: labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}"
            )
    else:
        raise ValueError(f"leafe_loss_from_labels: hidden must be [N, H] or [B, S, H], got {tuple(hidden.shape)}")
    rows, targets, weights, group = labels_to_rows(labels, group_ids, token_weights, shift=shift, cu_seqlens=cu_seqlens)
    return leafe_loss(hidden, weight, rows, targets, weights, group, **kwargs)


def group_norms(
    groups: Iterable[torch.Tensor],
    weights: Iterable[torch.Tensor] | None = None,
    num_groups: int = 2,
    mode: str = "count",
    process_group: object | None = None,
) -> torch.Tensor:
    """Global per-group normalisers for one optimizer step: pass them as ``norms`` to every micro-batch.

    ``groups``: one group tensor per micro-batch (entries < 0 are not targets and are skipped, so a
    per-token group tensor with -1 at ignored labels works). ``mode="count"`` counts targets,
    ``"weight"`` sums their weights. Summed over ``torch.distributed`` ranks (all-reduce SUM) when a
    process group is initialised, so every rank normalises by the same global number.
    """
    if mode not in ("count", "weight"):
        raise ValueError(f"group_norms: mode must be 'count' or 'weight', got {mode!r}")
    groups = list(groups)
    wlist = [None] * len(groups) if weights is None else list(weights)
    if len(wlist) != len(groups):
        raise ValueError(f"group_norms: {len(groups)} group tensors but {len(wlist)} weight tensors")
    if mode == "weight" and weights is None:
        raise ValueError("group_norms: mode='weight' needs weights")
    device = groups[0].device if groups else torch.device("cpu")
    total = torch.zeros(num_groups, dtype=torch.float64, device=device)
    for g, w in zip(groups, wlist):
        g = torch.as_tensor(g, device=device).flatten().long()
        keep = g >= 0
        if bool((g[keep] >= num_groups).any()):
            raise IndexError(f"group_norms: group id >= num_groups={num_groups}")
        if mode == "count":
            val = torch.ones_like(g, dtype=torch.float64)
        else:
            val = torch.as_tensor(w, device=device).flatten().to(torch.float64)
        if val.shape != g.shape:
            raise ValueError(f"group_norms: weights {tuple(val.shape)} do not match groups {tuple(g.shape)}")
        total.index_add_(0, g[keep], val[keep])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(process_group) == "nccl":  # NCCL: CUDA tensors only
            total = total.to(torch.device("cuda", torch.cuda.current_device()), torch.float32)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        total = total.to(device)
    return total.float()


class LeafeLoss(nn.Module):
    """``nn.Module`` holding the loss options; ``forward`` takes the tensors (and optional norms)."""

    def __init__(
        self,
        lambdas: float | Sequence[float] = (1.0, 1.0),
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        reduction: str = "sum",
        num_groups: int | None = None,
        backend: str = "auto",
        check_ranges: bool = True,
    ) -> None:
        super().__init__()
        self.check_ranges = check_ranges
        self.lambdas = tuple(float(x) for x in torch.as_tensor(lambdas, dtype=torch.float64).flatten().tolist())
        self.z_loss, self.softcap, self.reduction = z_loss, softcap, reduction
        self.num_groups, self.backend = num_groups, backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        group: torch.Tensor,
        norms: torch.Tensor | Sequence[float] | None = None,
        bias: torch.Tensor | None = None,
    ) -> LeafeLossOutput:
        return leafe_loss(
            hidden, weight, rows, targets, weights, group, lambdas=self.lambdas, norms=norms, bias=bias,
            z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction, num_groups=self.num_groups,
            backend=self.backend, check_ranges=self.check_ranges,
        )

    def extra_repr(self) -> str:
        return (
            f"lambdas={self.lambdas}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
