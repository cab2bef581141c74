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

Options live in one :class:`LossOptions` (lambdas, z_loss, softcap, reduction, num_groups, impl,
check_ranges), shared by ``leafe_loss``, ``reference_leafe_loss``, ``LeafeLoss``, the trainer's model
wrapper and the Hugging Face mixin; keyword arguments named like its fields override it per call.

Implementations, chosen by name (``LossOptions.impl``):

- ``"chunked"``: row-chunked gradient in forward (CUDA, or the CPU under ``TRITON_INTERPRET=1``): per chunk
  of rows, fp32 logits by cuBLAS, a Triton row kernel (online log-sum-exp, dlogits in place), the two
  gradient matmuls by cuBLAS. 6·M·H·V flops, the floor: the default on CUDA.
- ``"triton_gemm"``, ``"triton_atomic"``: the recompute schedules (fused online log-sum-exp forward,
  logits recomputed in the backward: 8·M·H·V flops), kept for comparison.
- ``"torch"``: the chunked schedule in plain torch with fp32 math (any device): the CPU default.
- ``"reference"``: float64, materialises ``[M, V]``: tests only.
- ``"auto"``: ``"chunked"`` on CUDA, ``"torch"`` elsewhere and for float64.

The gradient-in-forward schedules need the per-row scales at forward time, which the scalar reductions
give; ``reduction="none"`` (and no-grad calls) use the forward only, and its backward recomputes
(``"chunked"`` then uses ``"triton_gemm"``'s backward).

Dtypes: ``hidden`` and ``weight`` share a dtype, or ``weight`` is an fp32 master with bf16/fp16 ``hidden``:
then the matmuls run in ``hidden``'s dtype (the weight is cast once per optimizer step, not per call)
and the weight gradient comes back in fp32.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leafe_fast.errors import UserError
from leafe_fast.kernels.leafe_ce_autograd import IMPLS, Impl, LeafeRowLoss, LeafeScaledLoss
from leafe_fast.labels import IGNORE_INDEX

REDUCTIONS = ("sum", "mean", "none")
IMPL_NAMES = ("auto", *IMPLS, "reference")

__all__ = [
    "IGNORE_INDEX",
    "IMPL_NAMES",
    "LeafeLoss",
    "LeafeLossOutput",
    "LossOptions",
    "group_norms",
    "labels_to_rows",
    "leafe_loss",
    "leafe_loss_from_labels",
    "reference_leafe_loss",
    "resolve_impl",
]


@dataclass(frozen=True)
class LossOptions:
    """Every option of the LEAFE loss, in one place (also the ``--lambdas`` ... ``--impl`` CLI flags).

    ``lambdas`` is normalised to a tuple of floats, ``softcap=0`` to None; invalid values raise
    ``UserError`` naming the field.
    """

    lambdas: tuple[float, ...] = field(
        default=(1.0, 1.0),
        metadata={"help": "per-group loss multipliers (group 0 rehearsal, 1 counterfactual, ...); "
                          "one value is broadcast to num_groups"},
    )
    z_loss: float = field(default=0.0, metadata={"help": "coefficient of the z-loss term z_loss * lse**2 (>= 0)"})
    softcap: float | None = field(
        default=None, metadata={"help": "logit soft-cap c in c * tanh(z / c); unset or 0 disables it"}
    )
    reduction: str = field(
        default="sum",
        metadata={"help": "'sum' (by the given norms, else 1), 'mean' (by local per-group counts when no norms "
                          "are given) or 'none' (per-row contributions)", "choices": REDUCTIONS},
    )
    num_groups: int | None = field(
        default=None, metadata={"help": "number of groups G (default: len(lambdas))"}
    )
    impl: str = field(
        default="auto",
        metadata={"help": "loss implementation: 'auto' (chunked on CUDA, torch elsewhere), 'chunked', "
                          "'triton_gemm', 'triton_atomic', 'torch', 'reference'", "choices": IMPL_NAMES},
    )
    check_ranges: bool = field(
        default=True,
        metadata={"help": "verify row/target/group ranges and norms >= 0 on every call (a device sync on CUDA)"},
    )

    def __post_init__(self) -> None:
        where = "LossOptions"
        try:
            lam = tuple(float(x) for x in torch.as_tensor(self.lambdas, dtype=torch.float64).flatten().tolist())
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{where}.lambdas", f"must be numbers, got {self.lambdas!r} ({exc})",
                            "pass e.g. (1.0, 1.0)") from None
        if not lam:
            raise UserError(f"{where}.lambdas", "is empty", "give one multiplier per group")
        if any(not (x >= 0 and x < float("inf")) for x in lam):  # also nan
            raise UserError(f"{where}.lambdas (--lambdas)", f"must be finite and >= 0, got {lam}",
                            "a negative multiplier would maximise that group's loss; 0 leaves a group out")
        object.__setattr__(self, "lambdas", lam)
        if self.softcap is not None:
            if self.softcap < 0:
                raise UserError(f"{where}.softcap", f"must be positive, got {self.softcap}", "use None to disable")
            object.__setattr__(self, "softcap", float(self.softcap) if self.softcap else None)
        if self.z_loss < 0:
            raise UserError(f"{where}.z_loss", f"must be >= 0, got {self.z_loss}", "use 0 to disable it")
        object.__setattr__(self, "z_loss", float(self.z_loss))
        if self.reduction not in REDUCTIONS:
            raise UserError(f"{where}.reduction", f"must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.impl not in IMPL_NAMES:
            raise UserError(f"{where}.impl", f"must be one of {IMPL_NAMES}, got {self.impl!r}")
        if self.num_groups is not None:
            if self.num_groups < 1:
                raise UserError(f"{where}.num_groups", f"must be >= 1, got {self.num_groups}")
            if len(lam) not in (1, self.num_groups):
                raise UserError(f"{where}.lambdas", f"has {len(lam)} values for num_groups={self.num_groups}",
                                "give one per group, or a single value to broadcast")

    @property
    def groups(self) -> int:
        """G: ``num_groups`` or ``len(lambdas)``."""
        return self.num_groups if self.num_groups is not None else len(self.lambdas)

    def lambda_tensor(self) -> torch.Tensor:
        """float64 ``[G]`` multipliers (a single lambda broadcast)."""
        lam = torch.tensor(self.lambdas, dtype=torch.float64)
        return lam.expand(self.groups) if lam.numel() == 1 else lam

    def with_overrides(self, **overrides: Any) -> LossOptions:
        """A copy with some fields replaced; an unknown name is an error naming the valid ones."""
        if not overrides:
            return self
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown loss option(s) {unknown}; LossOptions fields are {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _options(options: LossOptions | None, overrides: dict[str, Any]) -> LossOptions:
    if options is not None and not isinstance(options, LossOptions):
        raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
    return (options or LossOptions()).with_overrides(**overrides)


@dataclass
class LeafeLossOutput:
    """``loss`` is differentiable; the per-group statistics are detached, for logging."""

    loss: torch.Tensor  # scalar, or [M] for reduction="none"
    group_sums: torch.Tensor  # [G] sum of w_i * CE_i per group (CE without the z-loss term)
    group_counts: torch.Tensor  # [G] number of targets per group
    group_weight_sums: torch.Tensor  # [G] sum of w_i per group


# --------------------------------------------------------------------------------------------------
# validation: one door, errors that name the problem

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
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
    mixed = weight.dtype == torch.float32 and hidden.dtype in _LOW_PRECISION  # fp32 master head
    if hidden.dtype != weight.dtype and not mixed:
        raise TypeError(
            f"leafe_loss: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype "
            "(or weight may be an fp32 master with bf16/fp16 hidden)"
        )
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
    for name, t in (("rows", rows), ("targets", targets), ("row_weight", row_weight), ("group", group)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != m:
            raise ValueError(
                f"leafe_loss: rows, targets, row_weight and group must be 1-D of one length M; "
                f"rows is {tuple(rows.shape)}, {name} is {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != hidden.device:
            raise ValueError(f"leafe_loss: {name} is on {t.device}, hidden on {hidden.device}")
    for name, t in (("rows", rows), ("targets", targets), ("group", group)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"leafe_loss: {name} must be an integer tensor, got {t.dtype}")
    if not row_weight.dtype.is_floating_point:
        raise TypeError(f"leafe_loss: row_weight must be a float tensor, got {row_weight.dtype}")
    if check_ranges and m > 0:
        # One host sync on CUDA; pass check_ranges=False in a hot loop whose inputs are trusted.
        stats = torch.stack([rows.min(), rows.max(), targets.min(), targets.max(), group.min(), group.max()]).tolist()
        n, v = hidden.shape[0], weight.shape[0]
        if stats[0] < 0 or stats[1] >= n:
            raise IndexError(f"leafe_loss: rows out of range [0, {n}): min {stats[0]}, max {stats[1]}")
        if stats[2] < 0 or stats[3] >= v:
            raise IndexError(
                f"leafe_loss: targets out of range [0, {v}): min {stats[2]}, max {stats[3]} "
                f"(ignored positions ({IGNORE_INDEX}) must be dropped before leafe_loss; leafe_loss_from_labels does it)"
            )
        if stats[4] < 0 or stats[5] >= num_groups:
            raise IndexError(f"leafe_loss: group ids out of range [0, {num_groups}): min {stats[4]}, max {stats[5]}")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation ``impl`` names on this device and dtype (``"auto"`` resolved; refusals explained)."""
    if impl not in IMPL_NAMES:
        raise UserError("LossOptions.impl", f"must be one of {IMPL_NAMES}, got {impl!r}")
    if impl == "auto":
        return "chunked" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if impl in IMPLS and IMPLS[impl].ops == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"leafe_loss: impl={impl!r} needs a CUDA tensor, or TRITON_INTERPRET=1 (set before importing "
                "triton) to run the kernels on the CPU; use impl='torch' on the CPU"
            )
        if dtype == torch.float64:
            raise TypeError(f"leafe_loss: impl={impl!r} has no float64 kernels; use impl='torch' or 'reference'")
    return impl


def _group_stats(
    group: torch.Tensor, row_weight: torch.Tensor, ce: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = group.long()
    dev = ce.device
    sums = torch.zeros(num_groups, dtype=ce.dtype, device=dev).index_add_(0, g, row_weight.to(ce.dtype) * ce.detach())
    ones = torch.ones_like(g, dtype=torch.float32)
    counts = torch.zeros(num_groups, dtype=torch.float32, device=dev).index_add_(0, g, ones)
    wsums = torch.zeros(num_groups, dtype=torch.float32, device=dev).index_add_(0, g, row_weight.float())
    return sums, counts, wsums


def _row_scales(
    group: torch.Tensor,
    row_weight: torch.Tensor,
    lam: torch.Tensor,
    norms: torch.Tensor | Sequence[float] | None,
    reduction: str,
    counts: torch.Tensor,
    num_groups: int,
    dtype: torch.dtype,
    validate: bool = True,
) -> torch.Tensor:
    """Per-row constant ``lambda_g * w_i / norm_g`` (0 where norm_g == 0)."""
    dev = row_weight.device
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
    return (per_group.to(dtype)[group.long()] * row_weight.to(dtype)).detach()


# --------------------------------------------------------------------------------------------------
# public API


def leafe_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    group: torch.Tensor,
    *,
    options: LossOptions | None = None,
    norms: torch.Tensor | Sequence[float] | None = None,
    bias: torch.Tensor | None = None,
    **overrides: Any,
) -> LeafeLossOutput:
    """LEAFE loss over the selected rows (see the module docstring for the exact formula).

    Args:
        hidden: ``[N, H]`` final hidden states (after the last norm), fp32/bf16/fp16.
        weight: ``[V, H]`` LM-head weight, same dtype (or fp32 master for bf16/fp16 hidden). ``bias``: ``[V]``.
        rows, targets: ``[M]`` int; ``hidden[rows[i]]`` predicts ``targets[i]``; rows may repeat.
        row_weight: ``[M]`` float per-target weights ``w_i``. ``group``: ``[M]`` int in ``[0, G)``.
        options: a :class:`LossOptions`; keyword arguments named like its fields (``lambdas=``,
            ``z_loss=``, ``impl=`` ...) override it for this call.
        norms: ``[G]`` global normalisers from :func:`group_norms`; None -> see ``reduction``.
    """
    opts = _options(options, overrides)
    num_groups = opts.groups
    lam = opts.lambda_tensor()
    _check_inputs(hidden, weight, rows, targets, row_weight, group, bias, num_groups, opts.check_ranges)
    impl_name = resolve_impl(opts.impl, hidden.device, hidden.dtype)
    if impl_name == "reference":
        return reference_leafe_loss(hidden, weight, rows, targets, row_weight, group, options=opts, norms=norms,
                                    bias=bias)
    impl: Impl = IMPLS[impl_name]
    rows_l, targets_l = rows.long().contiguous(), targets.long().contiguous()
    tensors = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), rows_l, targets_l)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    g_long = group.long()
    counts = torch.zeros(num_groups, dtype=torch.float32, device=group.device).index_add_(
        0, g_long, torch.ones_like(g_long, dtype=torch.float32)
    )  # not bincount: that syncs with the host on CUDA
    scale = _row_scales(group, row_weight, lam, norms, opts.reduction, counts, num_groups, acc, opts.check_ranges)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )  # Function.forward cannot tell no_grad from grad mode, so decide here
    # Autocast (an HF Trainer with bf16=True) would recast the chunked torch path's matmuls to bf16 inside
    # the Functions (wrong dtype for its fp32 buffers, lost precision); the inputs' dtype is the contract.
    with torch.autocast(hidden.device.type, enabled=False):
        if impl.in_forward and opts.reduction != "none" and wants_grad:
            # gradient in forward: one logits pass instead of two (see LeafeScaledLoss)
            loss, ce = LeafeScaledLoss.apply(*tensors, scale, opts.softcap, opts.z_loss, impl)
        else:
            row_loss, ce = LeafeRowLoss.apply(*tensors, opts.softcap, opts.z_loss, impl)
            contrib = scale * row_loss
            loss = contrib if opts.reduction == "none" else contrib.sum()
    sums, counts, wsums = _group_stats(group, row_weight, ce, num_groups)
    return LeafeLossOutput(loss, sums, counts, wsums)


def reference_leafe_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    group: torch.Tensor,
    *,
    options: LossOptions | None = None,
    norms: torch.Tensor | Sequence[float] | None = None,
    bias: torch.Tensor | None = None,
    **overrides: Any,
) -> LeafeLossOutput:
    """Plain float64 torch, materialising ``[M, V]``: the truth the fast paths are tested against.

    Takes the same options as :func:`leafe_loss` (``impl`` and ``check_ranges`` are ignored)."""
    opts = _options(options, overrides)
    num_groups, lam, softcap, z_loss = opts.groups, opts.lambda_tensor(), opts.softcap, opts.z_loss
    f64 = torch.float64
    z = hidden.to(f64)[rows.long()] @ weight.to(f64).T
    if bias is not None:
        z = z + bias.to(f64)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1) if z.shape[0] else z.new_zeros(0)
    ce = lse - z.gather(1, targets.long()[:, None]).squeeze(1)
    row_loss = ce + z_loss * lse**2
    sums, counts, wsums = _group_stats(group, row_weight, ce, num_groups)
    scale = _row_scales(group, row_weight, lam, norms, opts.reduction, counts, num_groups, f64)
    contrib = scale * row_loss
    return LeafeLossOutput(contrib if opts.reduction == "none" else contrib.sum(), sums, counts, wsums)


def labels_to_rows(
    labels: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    *,
    shift: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    default_group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF-style labels -> ``(rows, targets, row_weight, group)`` over the flattened positions.

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
    rows, targets, row_weight, group = labels_to_rows(labels, group_ids, token_weights, shift=shift,
                                                      cu_seqlens=cu_seqlens)
    return leafe_loss(hidden, weight, rows, targets, row_weight, group, **kwargs)


def group_norms(
    groups: Iterable[torch.Tensor],
    weights: Iterable[torch.Tensor] | None = None,
    num_groups: int = 2,
    mode: str = "count",
    process_group: object | None = None,
) -> torch.Tensor:
    """Global per-group normalisers (float64 ``[G]``) for one optimizer step: pass them as ``norms`` to every
    micro-batch.

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
        if dist.get_backend(process_group) == "nccl":  # NCCL: CUDA tensors only (float64 is supported: exact)
            total = total.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        total = total.to(device)
    return total  # float64: counts stay exact above 2**24


class LeafeLoss(nn.Module):
    """``nn.Module`` holding a :class:`LossOptions`; ``forward`` takes the tensors (and optional norms).

    ``LeafeLoss(LossOptions(...))`` or ``LeafeLoss(lambdas=..., z_loss=...)`` (field overrides); a plain
    sequence as the first argument is taken as ``lambdas``.
    """

    def __init__(self, options: LossOptions | Sequence[float] | None = None, **overrides: Any) -> None:
        super().__init__()
        if options is not None and not isinstance(options, LossOptions):
            options = LossOptions(lambdas=tuple(options))
        self.options = _options(options, overrides)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor,
        targets: torch.Tensor,
        row_weight: torch.Tensor,
        group: torch.Tensor,
        norms: torch.Tensor | Sequence[float] | None = None,
        bias: torch.Tensor | None = None,
    ) -> LeafeLossOutput:
        return leafe_loss(hidden, weight, rows, targets, row_weight, group, options=self.options, norms=norms,
                          bias=bias)

    def extra_repr(self) -> str:
        o = self.options
        return (f"lambdas={o.lambdas}, z_loss={o.z_loss}, softcap={o.softcap}, reduction={o.reduction!r}, "
                f"impl={o.impl!r}")
