"""Triton kernels for the fused LM head + cross-entropy over selected rows (recompute family).

Pass 1, ``_lse_fwd_kernel``: grid (row blocks, V splits). Each program gathers ``BLOCK_M`` rows of
``hidden`` through ``rows``, walks its V range in ``BLOCK_V`` tiles, builds each logits tile with
``tl.dot`` over ``BLOCK_D`` slices of H (fp32 accumulation), applies bias and soft-cap, and keeps an
online log-sum-exp plus the target logit. Partial results ``[splits, M]`` are merged by a tiny torch
``logsumexp``: splitting V keeps a 132-SM GPU busy when M is only a few thousand rows.

Pass 2 recomputes each logits tile and forms ``dlogits = g_i * (softmax * (1 + 2 z lse_i) - onehot)``
(times the soft-cap derivative) from the saved ``lse``; only ``[M]`` floats cross between passes. Two
schedules for what follows, chosen by ``BACKWARD_MODE`` (env ``LEAFE_CE_BACKWARD``):

- ``"gemm"`` (default), ``_dz_kernel``: per V chunk, write dlogits ``[M, Vc]`` in the input dtype
  (``DZ_CHUNK_BYTES`` bounds it), then cuBLAS: ``d_weight[chunk] = dz.T @ hidden[rows]`` (K = M, one
  rounding, written once) and ``d_rows += dz @ W[chunk]`` in fp32.
- ``"atomic"``, ``_ce_bwd_kernel``: both matmuls inside the kernel, added with fp32 atomics into
  ``d_rows [U, H]`` (U distinct rows) and an fp32 ``d_weight`` chunk (``DW_CHUNK_BYTES``). No dlogits
  buffer, but the atomics contend.

Repeated rows meet in the fp32 ``[U, H]`` row gradients before the scatter into ``d_hidden``. dlogits
are cast to the input dtype for the tensor cores (as Liger and CCE do); accumulation stays fp32.
Cost: 2·M·H·V flops forward + 6·M·H·V backward. Never an ``[M, V]`` tensor.
Runs on CUDA, or on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, small tiles).
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DW_CHUNK_BYTES = 128 << 20  # "atomic" mode: fp32 d_weight staging buffer per V chunk (bf16/fp16 weights)
DZ_CHUNK_BYTES = 64 << 20  # "gemm" mode: dlogits buffer [M, Vc] per V chunk (extra-memory budget 0.25 GiB)
# Backward schedule, see backward(). Which one is faster on an H100 is still to be measured
# (benchmarks/bench_loss.py runs both); "gemm" is the default because its two big matmuls run in cuBLAS.
BACKWARD_MODE = os.environ.get("LEAFE_CE_BACKWARD", "gemm")


def _configs(kind: str) -> list[triton.Config]:
    if INTERPRET:  # one small config: the interpreter is slow and tl.dot wants tiles >= 16
        return [triton.Config({"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    if kind in ("fwd", "dz"):
        shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 256, 32, 8, 4), (64, 128, 64, 4, 4)]
    else:
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bv, bd, w, s in shapes
    ]


@triton.jit
def _tanh(x):
    # tanh via exp: libdevice tanh is unavailable in the interpreter; saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton 3.9 interpreter mis-multiplies bf16 tiles; bf16 products are exact in fp32,
    # so upcasting there gives the tensor-core result up to summation order.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _logits_tile(H_ptr, W_ptr, B_ptr, row, m_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 logits of the gathered rows against a tile of the vocabulary."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(H_ptr + row[:, None] * stride_h + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W_ptr + offs_v[:, None] * stride_w + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _dlogits_program(H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, D, stride_h, stride_w, softcap,
                     lse_ptr, g_ptr, DB_ptr, v_lo, v_hi, z_loss,
                     HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                     COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The part both backward schedules share: this program's fp32 ``[BLOCK_M, BLOCK_V]`` tile of
    g_i * (softmax * (1 + 2 z_loss lse_i) - onehot) * softcap' (0 off-range), for row block
    ``program_id(0)`` and V tile ``program_id(1)`` of the chunk ``[v_lo, v_hi)``. Adds the tile's
    column sums into d_bias when asked; returns the tile and its coordinates (offs_m, m_mask, row,
    offs_v, v_mask). Inlined into each kernel, so sharing it costs nothing in the generated code."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    offs_v = (v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < v_hi
    tgt = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=m_mask, other=0.0)
    z = _logits_tile(H_ptr, W_ptr, B_ptr, row, m_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                     HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, BLOCK_M, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])
    dz = p * (g * (1.0 + 2.0 * z_loss * lse))[:, None] - tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0)
    if SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = tl.where(m_mask[:, None] & v_mask[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(DB_ptr + offs_v, tl.sum(dz, axis=0), mask=v_mask)
    return dz, offs_m, m_mask, row, offs_v, v_mask


# Every kernel starts with the same operands, in the order _Head.args() gives them:
#   H_ptr, W_ptr, B_ptr: hidden [N, D], weight [V, D], bias [V] (dummy when HAS_BIAS is False)
#   rows_ptr, tgt_ptr:   int64 [M], the selected rows of hidden and their targets
#   M, V, D, stride_h, stride_w, softcap (1.0 when SOFTCAP is False)


@triton.autotune(configs=_configs("fwd"), key=["D", "V"])
@triton.jit
def _lse_fwd_kernel(
    H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    lse_part_ptr, tgt_part_ptr,  # fp32 [splits, M]: per-split log-sum-exp and target logit (0 if absent)
    v_per_split,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    tgt = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_end
        z = _logits_tile(H_ptr, W_ptr, B_ptr, row, m_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                         HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, BLOCK_M, BLOCK_V, BLOCK_D)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        hit = (offs_v[None, :] == tgt[:, None]) & v_mask[None, :]  # a tile may overhang into the next split
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    lse = tl.where(s_i > 0, m_i + tl.log(tl.maximum(s_i, 1e-30)), float("-inf"))  # empty split: -inf, merged away
    tl.store(lse_part_ptr + pid_s * M + offs_m, lse, mask=m_mask)
    tl.store(tgt_part_ptr + pid_s * M + offs_m, t_i, mask=m_mask)


@triton.autotune(configs=_configs("bwd"), key=["D", "V"], reset_to_zero=["DH_ptr", "DW_ptr", "DB_ptr"])
@triton.jit
def _ce_bwd_kernel(
    H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    dh_index_ptr,  # int64 [M]: each row's slot in DH
    lse_ptr, g_ptr,  # fp32 [M]: saved log-sum-exp, upstream gradient of each row's loss
    DH_ptr, DW_ptr, DB_ptr,  # fp32 [U, D], fp32 [v_hi - v_lo, D] (chunk), fp32 [V]
    v_lo, v_hi, z_loss,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dz, offs_m, m_mask, row, offs_v, v_mask = _dlogits_program(
        H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, D, stride_h, stride_w, softcap, lse_ptr, g_ptr, DB_ptr,
        v_lo, v_hi, z_loss, HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, COMPUTE_DB, BLOCK_M, BLOCK_V, BLOCK_D)
    dz_lp = dz.to(H_ptr.dtype.element_ty)  # tensor-core operand; accumulation stays fp32
    slot = tl.load(dh_index_ptr + offs_m, mask=m_mask, other=0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if COMPUTE_DH:
            w = tl.load(W_ptr + offs_v[:, None] * stride_w + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            dh = _dot(dz_lp, w, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), DOT_PREC, UPCAST)
            tl.atomic_add(DH_ptr + slot[:, None] * D + offs_d[None, :], dh, mask=m_mask[:, None] & d_mask[None, :])
        if COMPUTE_DW:
            h = tl.load(H_ptr + row[:, None] * stride_h + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            dw = _dot(tl.trans(dz_lp), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), DOT_PREC, UPCAST)
            tl.atomic_add(DW_ptr + (offs_v - v_lo)[:, None] * D + offs_d[None, :], dw, mask=v_mask[:, None] & d_mask[None, :])


@triton.autotune(configs=_configs("dz"), key=["D", "V"], reset_to_zero=["DB_ptr"])
@triton.jit
def _dz_kernel(
    H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    lse_ptr, g_ptr,  # fp32 [M]
    DZ_ptr, DB_ptr,  # dlogits chunk [M, v_hi - v_lo] in the input dtype (row stride ldz), fp32 [V]
    ldz, v_lo, v_hi, z_loss,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """"gemm" backward, step 1: recompute logits, write dlogits for one V chunk (the two big matmuls
    that follow are left to cuBLAS, which reaches a higher fraction of peak than atomics-bound tiles)."""
    dz, offs_m, m_mask, _row, offs_v, v_mask = _dlogits_program(
        H_ptr, W_ptr, B_ptr, rows_ptr, tgt_ptr, M, D, stride_h, stride_w, softcap, lse_ptr, g_ptr, DB_ptr,
        v_lo, v_hi, z_loss, HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, COMPUTE_DB, BLOCK_M, BLOCK_V, BLOCK_D)
    tl.store(DZ_ptr + offs_m[:, None].to(tl.int64) * ldz + (offs_v - v_lo)[None, :],
             dz.to(DZ_ptr.dtype.element_ty), mask=m_mask[:, None] & v_mask[None, :])


# --------------------------------------------------------------------------------------------------
# launchers


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent tf32 rounding


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercise the split merge


def _check(hidden: torch.Tensor) -> None:
    if hidden.dtype == torch.float64:
        raise TypeError("leafe_ce_triton: float64 is not supported by the kernels; use backend='torch'")
    if hidden.stride(-1) != 1:
        raise ValueError("leafe_ce_triton: hidden and weight must be contiguous in their last dimension")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("leafe_ce_triton: needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")


class _Head(NamedTuple):
    """The operands every launch shares, and the kernel arguments derived from them."""

    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None  # [V]
    rows: torch.Tensor  # int64 [M]
    targets: torch.Tensor  # int64 [M]
    softcap: float | None

    @property
    def m(self) -> int:
        return self.rows.numel()

    @property
    def v(self) -> int:
        return self.weight.shape[0]

    @property
    def d(self) -> int:
        return self.hidden.shape[1]

    def args(self) -> tuple:
        """The leading arguments of every kernel (see the comment above ``_lse_fwd_kernel``)."""
        bias = self.weight if self.bias is None else self.bias  # dummy pointer, never read
        return (self.hidden, self.weight, bias, self.rows, self.targets, self.m, self.v, self.d,
                self.hidden.stride(0), self.weight.stride(0), float(self.softcap or 1.0))

    def flags(self) -> dict[str, bool | str]:
        """Compile-time flags of every kernel."""
        dtype = self.hidden.dtype
        return {"HAS_BIAS": self.bias is not None, "SOFTCAP": bool(self.softcap),
                "DOT_PREC": _dot_precision(dtype), "UPCAST": INTERPRET and dtype == torch.bfloat16}


def _tile_grid(m: int, cols: int) -> Callable[[dict], tuple[int, int]]:
    """Backward grid: row blocks x V tiles of a ``cols``-wide chunk."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_V"]))


def _or_placeholder(buf: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``buf``, or a one-element fp32 stand-in for a pointer its kernel never reads (flag off)."""
    return torch.empty(1, dtype=torch.float32, device=device) if buf is None else buf


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [M], target_logit [M])`` fp32 for ``hidden[rows] @ weight.T (+ bias)`` (soft-capped)."""
    _check(hidden)
    head = _Head(hidden, weight, bias, rows, targets, softcap)
    m, v, dev = head.m, head.v, hidden.device
    if m == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    if splits is None:  # enough programs for ~2 waves, each split at least 2048 columns
        row_blocks = triton.cdiv(m, 128)
        splits = max(1, min(triton.cdiv(2 * _num_sms(dev), row_blocks), triton.cdiv(v, 2048)))
    lse_part = torch.empty(splits, m, dtype=torch.float32, device=dev)
    tgt_part = torch.empty(splits, m, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)  # noqa: E731
    _lse_fwd_kernel[grid](*head.args(), lse_part, tgt_part, triton.cdiv(v, splits), **head.flags())
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    return lse, tgt_part.sum(0)


def _backward_atomic(head: _Head, lse: torch.Tensor, g: torch.Tensor, z_loss: float, slot: torch.Tensor,
                     d_uniq: torch.Tensor | None, d_bias32: torch.Tensor | None, need_weight: bool,
                     chunk_bytes: int | None) -> torch.Tensor | None:
    """Fully fused backward: both matmuls inside the kernel, fp32 atomics into ``d_uniq [U, H]``, ``d_bias32``
    and a bounded fp32 d_weight chunk (``chunk_bytes``). Returns d_weight."""
    weight, v, d, dev = head.weight, head.v, head.d, head.hidden.device
    d_weight = torch.zeros_like(weight) if need_weight else None
    direct = need_weight and weight.dtype == torch.float32  # accumulate straight into the output
    if need_weight and not direct:
        chunk = max(1, (chunk_bytes or DW_CHUNK_BYTES) // (4 * d))
        chunk = chunk // 256 * 256 if chunk >= 256 else chunk  # tile-aligned chunks on real shapes
        dw_buf = torch.empty(min(chunk, v), d, dtype=torch.float32, device=dev)
    else:
        chunk = v
        dw_buf = _or_placeholder(d_weight if direct else None, dev)
    dh_buf, db_buf = _or_placeholder(d_uniq, dev), _or_placeholder(d_bias32, dev)
    for v_lo in range(0, v, chunk):
        v_hi = min(v, v_lo + chunk)
        if need_weight and not direct:
            dw_buf.zero_()
        _ce_bwd_kernel[_tile_grid(head.m, v_hi - v_lo)](
            *head.args(), slot, lse, g, dh_buf, dw_buf, db_buf, v_lo, v_hi, z_loss, **head.flags(),
            COMPUTE_DH=d_uniq is not None, COMPUTE_DW=need_weight, COMPUTE_DB=d_bias32 is not None,
        )
        if need_weight and not direct:
            d_weight[v_lo:v_hi] = dw_buf[: v_hi - v_lo].to(weight.dtype)
    return d_weight


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result from low-precision operands (fp32 accumulation, one rounding less)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype overload
            pass
    return a.float() @ b.float()


def _backward_gemm(head: _Head, lse: torch.Tensor, g: torch.Tensor, z_loss: float, slot: torch.Tensor,
                   d_uniq: torch.Tensor | None, d_bias32: torch.Tensor | None, need_weight: bool,
                   chunk_bytes: int | None) -> torch.Tensor | None:
    """Per V chunk: Triton writes dlogits [M, Vc] (input dtype, ``chunk_bytes``), cuBLAS does
    d_weight[chunk] = dz.T @ h (K = M: one rounding, written once) and d_rows += dz @ W[chunk] (fp32),
    added into ``d_uniq`` at the end. Memory: the dz chunk, the gathered rows [M, H] and fp32 [M, H]
    row gradients. Returns d_weight."""
    hidden, weight, m, v, dev = head.hidden, head.weight, head.m, head.v, head.hidden.device
    cols = max(1, (chunk_bytes or DZ_CHUNK_BYTES) // (m * hidden.element_size()))
    cols = min(v, cols // 128 * 128 if cols >= 128 else cols)
    dz_buf = torch.empty(m, cols, dtype=hidden.dtype, device=dev)
    h_rows = hidden[head.rows] if need_weight else None
    d_rows = None if d_uniq is None else torch.zeros(m, head.d, dtype=torch.float32, device=dev)
    d_weight = torch.empty_like(weight) if need_weight else None
    db_buf = _or_placeholder(d_bias32, dev)
    for v_lo in range(0, v, cols):
        v_hi = min(v, v_lo + cols)
        dz = dz_buf[:, : v_hi - v_lo]
        _dz_kernel[_tile_grid(m, v_hi - v_lo)](
            *head.args(), lse, g, dz_buf, db_buf, dz_buf.stride(0), v_lo, v_hi, z_loss, **head.flags(),
            COMPUTE_DB=d_bias32 is not None,
        )
        if need_weight:
            torch.mm(dz.T, h_rows, out=d_weight[v_lo:v_hi])
        if d_rows is not None:
            d_rows += _mm_f32(dz, weight[v_lo:v_hi])
    if d_uniq is not None:
        d_uniq.index_add_(0, slot, d_rows)  # repeated rows meet in fp32
    return d_weight


_SCHEDULES = {"gemm": _backward_gemm, "atomic": _backward_atomic}


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    softcap: float | None,
    z_loss: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    mode: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i grad_rows[i] * loss_i`` w.r.t. hidden, weight and bias (None where not needed).

    ``mode``: "gemm" (dlogits chunks + cuBLAS) or "atomic" (one fused kernel); default ``BACKWARD_MODE``.
    ``chunk_bytes`` bounds the staging buffer of either mode (tests make it tiny to cross chunk edges).
    Both schedules add row gradients into fp32 ``[U, H]`` (U distinct rows) and bias gradients into
    fp32 ``[V]``; the scatter into ``d_hidden`` and the casts happen here.
    """
    _check(hidden)
    mode = mode or BACKWARD_MODE
    if mode not in _SCHEDULES:
        raise ValueError(f"leafe_ce_triton.backward: mode must be 'gemm' or 'atomic', got {mode!r}")
    head = _Head(hidden, weight, bias, rows, targets, softcap)
    dev = hidden.device
    if need_hidden:
        uniq, slot = torch.unique(rows, return_inverse=True)
        d_uniq = torch.zeros(uniq.numel(), head.d, dtype=torch.float32, device=dev)
    else:
        uniq, slot, d_uniq = None, rows, None
    d_bias32 = torch.zeros(head.v, dtype=torch.float32, device=dev) if need_bias else None
    d_weight = _SCHEDULES[mode](head, lse.float().contiguous(), grad_rows.float().contiguous(), float(z_loss),
                                slot, d_uniq, d_bias32, need_weight, chunk_bytes)
    d_hidden = None
    if need_hidden:
        d_hidden = torch.zeros_like(hidden)
        d_hidden[uniq] = d_uniq.to(hidden.dtype)
    return d_hidden, d_weight, (d_bias32.to(bias.dtype) if need_bias else None)


def smoke_test(device: str | torch.device | None = None) -> float:
    """Run the forward kernel once on a tiny shape; returns the max |lse error| vs torch (CI smoke test).

    On the CPU this needs ``TRITON_INTERPRET=1`` set before triton is imported.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 24, generator=gen).to(dev)
    weight = torch.randn(40, 24, generator=gen).to(dev)
    rows = torch.tensor([0, 3, 3, 7, 1], device=dev)
    targets = torch.tensor([0, 39, 5, 17, 2], device=dev)
    lse, tgt = forward(hidden, weight, None, rows, targets, None)
    ref = hidden.double()[rows] @ weight.double().T
    err = max((lse.double() - ref.logsumexp(1)).abs().max().item(),
              (tgt.double() - ref.gather(1, targets[:, None]).squeeze(1)).abs().max().item())
    if not math.isfinite(err):
        raise AssertionError("leafe_ce_triton.smoke_test: non-finite result")
    return err
