"""Triton kernels for the fused LM head + cross-entropy over selected rows.

Three schedules share the row gather (``hidden[rows]`` is gathered once per call into a contiguous
``[M, D]`` block, so the kernels index rows with 32-bit offsets instead of per-element 64-bit gathered
row addresses):

- ``"chunked"`` (gradient in forward, 6·M·H·V flops): per chunk of rows sized to ``LOGITS_BUDGET_BYTES``,
  fp32 logits ``[R, V]`` by cuBLAS, then ``_row_grad_kernel`` (one program per row: online max/sum-exp
  in fp32, then the unscaled dlogits written in place over the logits buffer in the input dtype), then
  cuBLAS ``d_rows = dz @ W`` (fp32 out, scaled per row afterwards) and ``d_weight += dz^T (g h)``
  (addmm; fp32 accumulation into an fp32 weight gradient when the weight is the fp32 master).
- ``"gemm"`` / ``"atomic"`` (recompute, 8·M·H·V flops): ``_lse_fwd_kernel`` keeps an online
  log-sum-exp per row and V split; the backward recomputes each logits tile. "gemm": ``_dz_kernel``
  writes dlogits per V chunk, cuBLAS does both matmuls. "atomic": ``_ce_bwd_kernel`` does both matmuls
  with fp32 atomics.

fp16 safety: dlogits are cast to the input dtype *unscaled* (``p * (1 + 2 z_loss lse) - onehot``,
times the soft-cap derivative); the per-row upstream gradient ``g`` is applied in fp32 after the
matmuls: exactly per row for ``d_hidden``, and through ``g / max|g|`` on the rows of ``hidden`` (times
``max|g|`` at the end) for ``d_weight``. With global normalisers ``g`` is ~1e-6, and folding it into
fp16 dlogits used to flush almost all of them to zero.

Host syncs: none in the launchers (no ``torch.unique``, no ``.item()``); repeated rows meet through
``index_add_`` into ``d_hidden``. Runs on CUDA, or on the CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, one small config).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from .leafe_ce_operands import GradNeeds, LossHead

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DW_CHUNK_BYTES = 128 << 20  # "atomic": fp32 d_weight staging buffer per V chunk (bf16/fp16 weights)
DZ_CHUNK_BYTES = 64 << 20  # "gemm": dlogits buffer [M, Vc] per V chunk
# "chunked": the fp32 logits chunk [R, V]. 224 MiB leaves room in the 0.25 GiB extra-memory budget for the
# gathered rows and the fp32 [R, H] row gradients (at N=16384, 25% supervised, H=3584: ~35 MiB). fp32, not
# bf16/fp16: measured at H=3584, V=152064 against float64 (benchmarks/logit_chunk_precision.py), storing the
# chunk in bf16 adds up to 0.06-0.11 to lse and 1-2% to d_hidden, fp16 0.006-0.015 and 0.3-0.5%, fp32
# 3e-6-7e-6 (d_hidden then 0.15-0.17%, the bf16 dlogits' own rounding).
LOGITS_BUDGET_BYTES = 224 << 20
SMEM_LIMIT_BYTES = 227 * 1024  # sm_90 opt-in shared memory per block; the device's own value is used on CUDA
SCHEDULES = ("gemm", "atomic")


# --------------------------------------------------------------------------------------------------
# configs

# (BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages). Three families, told apart by BLOCK_D: 64 for the
# tensor-descriptor (TMA) path of sm_90+, 32 for the pointer path (pre-Hopper GPUs, misaligned operands),
# where per-element addresses cost registers, 16 for fp32 operands (twice the bytes per element). Chosen so that every variant the launchers can start compiles
# for sm_90 (and sm_80) in bf16/fp16 within shared memory and without register spills
# (kernels/aot_check.py, tests/test_kernel_compile.py).
TMA_BLOCK_D, POINTER_BLOCK_D, FP32_BLOCK_D = 64, 32, 16
FWD_SHAPES = [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),  # TMA
              (128, 128, 32, 8, 3),  # pointers
              (64, 128, 16, 4, 3)]  # fp32 operands (tf32x3): small tiles of their own
DZ_SHAPES = [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4),  # 128x64 w4 spilled with bias+cap
             (64, 256, 32, 8, 3),
             (64, 128, 16, 4, 3), (128, 64, 16, 4, 3)]
BWD_SHAPES = [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
              (64, 128, 32, 8, 2), (64, 64, 32, 4, 2),
              (64, 64, 16, 4, 2)]
ROW_SHAPES = [(1024, 4, 1), (2048, 8, 1), (4096, 8, 1)]  # (BLOCK_V, num_warps, num_stages)
INTERPRET_SHAPE = (16, 32, 16, 4, 1)  # the interpreter is slow and tl.dot wants tiles >= 16


def config_fits(cfg: triton.Config, tma: bool, fp32: bool = False) -> bool:
    """Whether a tile config belongs to the family a launch takes: fp32 operands, else TMA or pointers."""
    want = FP32_BLOCK_D if fp32 else TMA_BLOCK_D if tma else POINTER_BLOCK_D
    return INTERPRET or cfg.kwargs["BLOCK_D"] == want


def _tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        shapes = [INTERPRET_SHAPE]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bm, bv, bd, w, s in shapes]


def _row_configs() -> list[triton.Config]:
    shapes = [(128, 4, 1)] if INTERPRET else ROW_SHAPES
    return [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=s) for bv, w, s in shapes]


def tile_smem_bytes(cfg: triton.Config, elem_bytes: int, atomic: bool = False) -> int:
    """Shared-memory estimate of a tile config: pipelined operand tiles (+ the atomic kernel's dz tile)."""
    bm, bv, bd = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_V"], cfg.kwargs["BLOCK_D"]
    need = max(1, cfg.num_stages) * (bm + bv) * bd * elem_bytes
    if atomic:
        need += bm * bv * elem_bytes
    return need


def _smem_limit(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT_BYTES))
    return SMEM_LIMIT_BYTES


def _prune(atomic: bool) -> Callable[..., list[triton.Config]]:
    """``early_config_prune``: keep the configs of the path this launch takes (TMA or pointers), and drop
    those whose tiles exceed the device's shared memory (keep the smallest if none fits), so a GPU with
    less shared memory than an H100 never starts a config that cannot launch."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        w = named_args["W_ptr"]
        fp32 = w.dtype == torch.float32
        path = [c for c in configs if config_fits(c, bool(kwargs.get("TMA", False)), fp32)] or configs
        limit = _smem_limit(w.device)
        fits = [c for c in path if tile_smem_bytes(c, w.element_size(), atomic) <= limit]
        return fits or [min(path, key=lambda c: tile_smem_bytes(c, w.element_size(), atomic))]

    return prune


# --------------------------------------------------------------------------------------------------
# shared device functions


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
def _sources(H_ptr, W_ptr, M, V, D, stride_h, stride_w, TMA: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where the operand tiles come from. TMA: device-side tensor descriptors (Hopper's TMA unit does the
    addressing and zero-fills out-of-range rows: no per-element 64-bit addresses in registers, which is
    what made the pointer version spill on sm_90). Otherwise the plain pointers (strides not 16-byte
    aligned, or the interpreter on odd test shapes)."""
    if TMA:
        h_src = tl.make_tensor_descriptor(H_ptr, shape=[M, D], strides=[stride_h, 1], block_shape=[BLOCK_M, BLOCK_D])
        w_src = tl.make_tensor_descriptor(W_ptr, shape=[V, D], strides=[stride_w, 1], block_shape=[BLOCK_V, BLOCK_D])
    else:
        h_src = H_ptr
        w_src = W_ptr
    return h_src, w_src


@triton.jit
def _tile(src, r0, d0, R, D, stride, TMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_R, BLOCK_D] tile at (r0, d0) of an [R, D] operand, zero outside."""
    if TMA:
        return src.load([r0, d0])
    else:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = (offs_r < R)[:, None] & (offs_d < D)[None, :]
        return tl.load(src + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _logits_tile(h_src, w_src, B_ptr, m0, v0, M, V, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 logits of gathered rows m0.. against vocabulary rows v0.. (0 off-range).
    Pointer offsets stay 32-bit (the launchers check M*D and V*D < 2**31)."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        h = _tile(h_src, m0, d0, M, D, stride_h, TMA, BLOCK_M, BLOCK_D)
        w = _tile(w_src, v0, d0, V, D, stride_w, TMA, BLOCK_V, BLOCK_D)
        acc = _dot(h, tl.trans(w), acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _unscaled_dlogits(z, lse, tgt, offs_v, valid, softcap, z_loss, SOFTCAP: tl.constexpr):
    """``(softmax * (1 + 2 z_loss lse) - onehot) * softcap'`` in fp32, 0 where not ``valid``: the row's
    upstream gradient is applied by the caller, after the cast (fp16 underflow, see the module doc)."""
    p = tl.exp(z - lse[:, None])
    dz = p * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    if SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    return tl.where(valid, dz, 0.0)


# Every tile kernel starts with the same operands, in the order _args() gives them:
#   H_ptr:  the gathered rows hidden[rows], contiguous [M, D]
#   W_ptr, B_ptr: weight [V, D], bias [V] (a dummy pointer when HAS_BIAS is False)
#   tgt_ptr: int64 [M] targets;  M, V, D, stride_h, stride_w, softcap (1.0 when SOFTCAP is False)


@triton.autotune(configs=_tile_configs(FWD_SHAPES), key=["D", "V"], reset_to_zero=["s_part_ptr", "tgt_part_ptr"],
                 prune_configs_by={"early_config_prune": _prune(False)})
@triton.jit
def _lse_fwd_kernel(
    H_ptr, W_ptr, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    m_part_ptr, s_part_ptr, tgt_part_ptr,  # fp32 [max_splits, M]: running max, sum of exp, target logit
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (row blocks, V splits). The split count follows the config the autotuner picked (the grid
    reads BLOCK_M); rows of the partial buffers beyond it keep s = 0 and merge away."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    tgt = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1)
    v_per_split = tl.cdiv(tl.cdiv(V, tl.num_programs(1)), BLOCK_V) * BLOCK_V
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    h_src, w_src = _sources(H_ptr, W_ptr, M, V, D, stride_h, stride_w, TMA, BLOCK_M, BLOCK_V, BLOCK_D)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = _logits_tile(h_src, w_src, B_ptr, m0, v0, M, V, D, stride_h, stride_w, softcap,
                         HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, TMA, BLOCK_M, BLOCK_V, BLOCK_D)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        hit = (offs_v[None, :] == tgt[:, None]) & v_mask[None, :]
        t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    tl.store(m_part_ptr + pid_s * M + offs_m, m_i, mask=m_mask)
    tl.store(s_part_ptr + pid_s * M + offs_m, s_i, mask=m_mask)
    tl.store(tgt_part_ptr + pid_s * M + offs_m, t_i, mask=m_mask)


@triton.jit
def _dlogits_program(h_src, w_src, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
                     lse_ptr, g_ptr, DB_ptr, v_lo, v_hi, z_loss,
                     HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                     TMA: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The part both recompute schedules share: this program's unscaled fp32 dlogits tile for row block
    ``program_id(0)`` and V tile ``program_id(1)`` of the chunk ``[v_lo, v_hi)``, and each row's upstream
    gradient g. Adds the g-scaled column sums into d_bias (fp32) when asked. Inlined into each kernel."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    v0 = v_lo + pid_v * BLOCK_V
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_hi
    tgt = tl.load(tgt_ptr + offs_m, mask=m_mask, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=m_mask, other=0.0)
    z = _logits_tile(h_src, w_src, B_ptr, m0, v0, M, V, D, stride_h, stride_w, softcap,
                     HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, TMA, BLOCK_M, BLOCK_V, BLOCK_D)
    dz = _unscaled_dlogits(z, lse, tgt, offs_v, m_mask[:, None] & v_mask[None, :], softcap, z_loss, SOFTCAP)
    if COMPUTE_DB:
        tl.atomic_add(DB_ptr + offs_v, tl.sum(dz * g[:, None], axis=0), mask=v_mask)
    return dz, g, m0, v0, offs_m, m_mask, offs_v, v_mask


@triton.autotune(configs=_tile_configs(BWD_SHAPES), key=["D", "V"], reset_to_zero=["DH_ptr", "DW_ptr", "DB_ptr"],
                 prune_configs_by={"early_config_prune": _prune(True)})
@triton.jit
def _ce_bwd_kernel(
    H_ptr, W_ptr, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    lse_ptr, g_ptr, gmax_ptr,  # fp32 [M], [M], [1]: saved log-sum-exp, upstream gradient per row, max |g|
    DH_ptr, DW_ptr, DB_ptr,  # fp32 [M, D] row gradients, fp32 [v_hi - v_lo, D] (chunk), fp32 [V]
    v_lo, v_hi, z_loss,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """"atomic" backward: both matmuls in the kernel. d_rows gets (dz @ W) * g in fp32; d_weight gets
    ((dz * g / max|g|)^T @ h) * max|g|, so the low-precision operand never holds a tiny scaled value."""
    h_src, w_src = _sources(H_ptr, W_ptr, M, V, D, stride_h, stride_w, TMA, BLOCK_M, BLOCK_V, BLOCK_D)
    dz, g, m0, v0, offs_m, m_mask, offs_v, v_mask = _dlogits_program(
        h_src, w_src, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap, lse_ptr, g_ptr, DB_ptr,
        v_lo, v_hi, z_loss, HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, TMA, COMPUTE_DB, BLOCK_M, BLOCK_V, BLOCK_D)
    gmax = tl.load(gmax_ptr)
    dz_lp = dz.to(H_ptr.dtype.element_ty)
    dzw_lp = (dz * (g / gmax)[:, None]).to(H_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if COMPUTE_DH:
            w = _tile(w_src, v0, d0, V, D, stride_w, TMA, BLOCK_V, BLOCK_D)
            dh = _dot(dz_lp, w, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), DOT_PREC, UPCAST) * g[:, None]
            tl.atomic_add(DH_ptr + offs_m[:, None] * D + offs_d[None, :], dh, mask=m_mask[:, None] & d_mask[None, :])
        if COMPUTE_DW:
            h = _tile(h_src, m0, d0, M, D, stride_h, TMA, BLOCK_M, BLOCK_D)
            dw = _dot(tl.trans(dzw_lp), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), DOT_PREC, UPCAST) * gmax
            tl.atomic_add(DW_ptr + (offs_v - v_lo)[:, None] * D + offs_d[None, :], dw,
                          mask=v_mask[:, None] & d_mask[None, :])


@triton.autotune(configs=_tile_configs(DZ_SHAPES), key=["D", "V"], reset_to_zero=["DB_ptr"],
                 prune_configs_by={"early_config_prune": _prune(False)})
@triton.jit
def _dz_kernel(
    H_ptr, W_ptr, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap,
    lse_ptr, g_ptr,  # fp32 [M]
    DZ_ptr, DB_ptr,  # unscaled dlogits chunk [M, v_hi - v_lo] in the input dtype (row stride ldz), fp32 [V]
    ldz, v_lo, v_hi, z_loss,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """"gemm" backward, step 1: recompute logits, write unscaled dlogits for one V chunk (the two big
    matmuls that follow run in cuBLAS)."""
    h_src, w_src = _sources(H_ptr, W_ptr, M, V, D, stride_h, stride_w, TMA, BLOCK_M, BLOCK_V, BLOCK_D)
    dz, _g, _m0, _v0, offs_m, m_mask, offs_v, v_mask = _dlogits_program(
        h_src, w_src, B_ptr, tgt_ptr, M, V, D, stride_h, stride_w, softcap, lse_ptr, g_ptr, DB_ptr,
        v_lo, v_hi, z_loss, HAS_BIAS, SOFTCAP, DOT_PREC, UPCAST, TMA, COMPUTE_DB, BLOCK_M, BLOCK_V, BLOCK_D)
    tl.store(DZ_ptr + offs_m[:, None].to(tl.int64) * ldz + (offs_v - v_lo)[None, :],
             dz.to(DZ_ptr.dtype.element_ty), mask=m_mask[:, None] & v_mask[None, :])


@triton.jit
def _row_logits(z_row, B_ptr, offs, mask, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """A tile of one row of the fp32 logits chunk, with bias and soft-cap applied."""
    z = tl.load(z_row + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        z += tl.load(B_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.autotune(configs=_row_configs(), key=["V"])
@triton.jit
def _row_grad_kernel(
    Z_ptr, B_ptr, tgt_ptr, lse_ptr, t_ptr, LIKE_ptr,
    V, ldz, softcap, z_loss,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, COMPUTE_DZ: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """"chunked": one program per row of the fp32 logits chunk ``Z [R, ldz]``. Pass 1: online max and
    sum of exp (fp32) and the target logit -> lse, t. Pass 2 (COMPUTE_DZ): the unscaled dlogits, written
    in place over the row in LIKE_ptr's dtype (row stride ``ldz * 4 / elem``): a tile's bytes land on
    logits this program has already read, and a barrier orders the first tile's loads before its stores."""
    r = tl.program_id(0).to(tl.int64)
    z_row = Z_ptr + r * ldz
    tgt = tl.load(tgt_ptr + r)
    m_i = tl.full((BLOCK_V,), -1e30, dtype=tl.float32)
    s_i = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.where(mask, _row_logits(z_row, B_ptr, offs, mask, softcap, HAS_BIAS, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, z)  # per-lane running max: one exp per element, merged at the end
        s_i = s_i * tl.exp(m_i - m_new) + tl.exp(z - m_new)
        m_i = m_new
        t_i += tl.where(offs == tgt, z, 0.0)
    m = tl.max(m_i, axis=0)
    lse = m + tl.log(tl.sum(s_i * tl.exp(m_i - m), axis=0))
    tl.store(lse_ptr + r, lse)
    tl.store(t_ptr + r, tl.sum(t_i, axis=0))
    if COMPUTE_DZ:
        DZ_ptr = Z_ptr.to(tl.pointer_type(LIKE_ptr.dtype.element_ty))
        ratio = 32 // LIKE_ptr.dtype.element_ty.primitive_bitwidth
        dz_row = DZ_ptr + r * ldz * ratio
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = _row_logits(z_row, B_ptr, offs, mask, softcap, HAS_BIAS, SOFTCAP)
            p = tl.exp(z - lse)
            dz = p * (1.0 + 2.0 * z_loss * lse) - tl.where(offs == tgt, 1.0, 0.0)
            if SOFTCAP:
                zc = z / softcap
                dz = dz * (1.0 - zc * zc)
            tl.debug_barrier()
            tl.store(dz_row + offs, dz.to(LIKE_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32x3 (three tf32 products: ~fp32 accuracy on tensor cores) on a GPU; the interpreter
    # computes in numpy anyway.
    if dtype == torch.float32:
        return "ieee" if INTERPRET else "tf32x3"
    return "tf32"  # ignored for bf16/fp16 operands


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercise the split merge


def _check(head: LossHead) -> None:
    hidden, weight = head.hidden, head.weight
    if hidden.dtype == torch.float64:
        raise TypeError("leafe_ce_triton: float64 is not supported by the kernels; use impl='torch'")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.stride(-1) != 1:  # a transposed weight would otherwise be read with the wrong layout
            raise ValueError(f"leafe_ce_triton: {name} must be contiguous in its last dimension, strides {t.stride()}")
    if head.bias is not None and head.bias.stride(0) != 1:
        raise ValueError("leafe_ce_triton: bias must be contiguous")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("leafe_ce_triton: needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")


_CAST_CACHE: dict[str, Any] = {}


def compute_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in the matmul dtype. An fp32 master weight with bf16/fp16 hidden states is cast once per
    version of the weight (the optimizer step bumps ``_version``), not once per micro-batch."""
    if weight.dtype == dtype:
        return weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.device, dtype)
    if _CAST_CACHE.get("key") != key:
        _CAST_CACHE.clear()  # one entry: never hold two copies of a head
        _CAST_CACHE["value"] = weight.detach().to(dtype).contiguous()
        _CAST_CACHE["key"] = key
    return _CAST_CACHE["value"]


def _tma_ok(*operands: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (and, on a GPU, sm_90 or newer; the
    interpreter emulates them, so CI covers both paths)."""
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in operands)
    if not aligned:
        return False
    if INTERPRET:
        return True
    if torch.cuda.get_device_capability(operands[0].device)[0] < 9:
        return False
    _ensure_allocator()
    return True


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator; install a torch one unless the process
    already set its own (``triton.set_allocator`` is process-wide, so never replace someone else's)."""
    try:
        from triton.runtime import _allocation

        var = _allocation._allocator
        current = var.get() if hasattr(var, "get") else var
        unset = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):  # layout of another triton version: install ours
        unset = True
    if unset:
        triton.set_allocator(lambda size, _align, _stream: torch.empty(size, dtype=torch.int8, device="cuda"))


class _Launch:
    """Per-call operands in kernel form: rows gathered once, the weight in the matmul dtype."""

    def __init__(self, head: LossHead) -> None:
        _check(head)
        self.head = head
        self.dtype = head.hidden.dtype
        self.weight = compute_weight(head.weight, self.dtype)
        self.bias = head.bias
        self.h_rows = head.hidden[head.rows].contiguous()  # [M, D]: block pointers, no per-element gather
        self.targets = head.targets.contiguous()
        self.m, self.v, self.d = head.m, head.v, head.d
        self.device = head.hidden.device
        self.tma = _tma_ok(self.h_rows, self.weight)
        if max(self.m, self.v) * self.d >= 2**31:
            raise ValueError(f"leafe_ce_triton: M*H and V*H must stay below 2**31 (32-bit offsets); got M={self.m}, "
                             f"V={self.v}, H={self.d}: split the rows into several calls")

    def args(self) -> tuple:
        """The leading arguments of every tile kernel (see the comment above ``_lse_fwd_kernel``)."""
        bias = self.weight if self.bias is None else self.bias  # dummy pointer, never read
        return (self.h_rows, self.weight, bias, self.targets, self.m, self.v, self.d,
                self.h_rows.stride(0), self.weight.stride(0), float(self.head.softcap or 1.0))

    def flags(self) -> dict[str, bool | str]:
        """Compile-time flags of every tile kernel."""
        return {"HAS_BIAS": self.bias is not None, "SOFTCAP": bool(self.head.softcap),
                "DOT_PREC": _dot_precision(self.dtype), "UPCAST": INTERPRET and self.dtype == torch.bfloat16,
                "TMA": self.tma}

    def grad_scale(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g fp32 [M], max|g| [1])`` on the device (no host sync); max|g| is never 0."""
        g = g.float().contiguous()
        return g, g.abs().amax().clamp_min(1e-30).reshape(1)


def _tile_grid(m: int, cols: int) -> Callable[[dict], tuple[int, int]]:
    """Backward grid: row blocks x V tiles of a ``cols``-wide chunk."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_V"]))


def _or_placeholder(buf: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``buf``, or a one-element fp32 stand-in for a pointer its kernel never reads (flag off)."""
    return torch.empty(1, dtype=torch.float32, device=device) if buf is None else buf


def _fwd_splits(m: int, v: int, block_m: int, device: torch.device) -> int:
    """Enough programs for ~2 waves, each split at least 2048 columns."""
    return max(1, min(triton.cdiv(2 * _num_sms(device), triton.cdiv(m, block_m)), triton.cdiv(v, 2048)))


def forward(head: LossHead, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [M], target_logit [M])`` fp32 by the fused online log-sum-exp kernel (recompute family)."""
    run = _Launch(head)
    m, v, dev = run.m, run.v, run.device
    if m == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    smallest_bm = min(c.kwargs["BLOCK_M"] for c in _lse_fwd_kernel.configs)
    max_splits = splits or _fwd_splits(m, v, smallest_bm, dev)
    m_part = torch.empty(max_splits, m, dtype=torch.float32, device=dev)
    s_part = torch.zeros(max_splits, m, dtype=torch.float32, device=dev)
    tgt_part = torch.zeros(max_splits, m, dtype=torch.float32, device=dev)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), splits or _fwd_splits(m, v, meta["BLOCK_M"], dev)

    _lse_fwd_kernel[grid](*run.args(), m_part, s_part, tgt_part, **run.flags())
    # Merge only the splits the chosen config used (the autotuner's benchmark runs of other configs may
    # have written further rows); within them, s = 0 (an empty split) contributes nothing.
    best = getattr(_lse_fwd_kernel, "best_config", None)
    used = splits or (_fwd_splits(m, v, best.kwargs["BLOCK_M"], dev) if best is not None else max_splits)
    lse = torch.logsumexp(m_part[:used] + torch.log(s_part[:used]), dim=0)
    return lse, tgt_part[:used].sum(0)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation into ``acc`` (fp32 or the operands' dtype), no temporary."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):  # older torch: no dtype overload of addmm
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result from low-precision operands (fp32 accumulation, one rounding less)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out) if out is not None else \
                torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype overload
            pass
    return torch.mm(a.float(), b.float(), out=out)


def _backward_atomic(run: _Launch, lse: torch.Tensor, g: torch.Tensor, gmax: torch.Tensor,
                     d_rows: torch.Tensor | None, d_bias32: torch.Tensor | None, need_weight: bool,
                     chunk_bytes: int | None) -> torch.Tensor | None:
    """Fully fused backward: both matmuls inside the kernel, fp32 atomics into ``d_rows [M, H]``,
    ``d_bias32`` and a bounded fp32 d_weight chunk (``chunk_bytes``). Returns d_weight (matmul dtype
    or fp32)."""
    v, d, dev = run.v, run.d, run.device
    direct = need_weight and run.head.weight.dtype == torch.float32  # accumulate straight into the output
    d_weight = (torch.zeros(v, d, dtype=torch.float32, device=dev) if direct
                else torch.empty(v, d, dtype=run.dtype, device=dev) if need_weight else None)
    if need_weight and not direct:
        chunk = max(1, (chunk_bytes or DW_CHUNK_BYTES) // (4 * d))
        chunk = chunk // 256 * 256 if chunk >= 256 else chunk  # tile-aligned chunks on real shapes
        dw_buf = torch.empty(min(chunk, v), d, dtype=torch.float32, device=dev)
    else:
        chunk = v
        dw_buf = _or_placeholder(d_weight if direct else None, dev)
    dh_buf, db_buf = _or_placeholder(d_rows, dev), _or_placeholder(d_bias32, dev)
    for v_lo in range(0, v, chunk):
        v_hi = min(v, v_lo + chunk)
        if need_weight and not direct:
            dw_buf.zero_()
        _ce_bwd_kernel[_tile_grid(run.m, v_hi - v_lo)](
            *run.args(), lse, g, gmax, dh_buf, dw_buf, db_buf, v_lo, v_hi, run.head.z_loss, **run.flags(),
            COMPUTE_DH=d_rows is not None, COMPUTE_DW=need_weight, COMPUTE_DB=d_bias32 is not None,
        )
        if need_weight and not direct:
            d_weight[v_lo:v_hi] = dw_buf[: v_hi - v_lo].to(run.dtype)
    return d_weight


def _backward_gemm(run: _Launch, lse: torch.Tensor, g: torch.Tensor, gmax: torch.Tensor,
                   d_rows: torch.Tensor | None, d_bias32: torch.Tensor | None, need_weight: bool,
                   chunk_bytes: int | None) -> torch.Tensor | None:
    """Per V chunk: Triton writes unscaled dlogits [M, Vc] (input dtype, ``chunk_bytes``), cuBLAS does
    d_weight[chunk] = dz.T @ (h g/max|g|) (K = M, written once, times max|g| at the end) and
    d_rows += dz @ W[chunk] (addmm, fp32 accumulation, scaled by g per row by the caller)."""
    m, v, dev = run.m, run.v, run.device
    cols = max(1, (chunk_bytes or DZ_CHUNK_BYTES) // (m * run.h_rows.element_size()))
    cols = min(v, cols // 128 * 128 if cols >= 128 else cols)
    dz_buf = torch.empty(m, cols, dtype=run.dtype, device=dev)
    h_scaled = (run.h_rows.float() * (g / gmax)[:, None]).to(run.dtype) if need_weight else None
    d_weight = torch.empty(v, run.d, dtype=run.dtype, device=dev) if need_weight else None
    db_buf = _or_placeholder(d_bias32, dev)
    for v_lo in range(0, v, cols):
        v_hi = min(v, v_lo + cols)
        dz = dz_buf[:, : v_hi - v_lo]
        _dz_kernel[_tile_grid(m, v_hi - v_lo)](
            *run.args(), lse, g, dz_buf, db_buf, dz_buf.stride(0), v_lo, v_hi, run.head.z_loss, **run.flags(),
            COMPUTE_DB=d_bias32 is not None,
        )
        if need_weight:
            torch.mm(dz.T, h_scaled, out=d_weight[v_lo:v_hi])
        if d_rows is not None:
            _addmm_f32_(d_rows, dz, run.weight[v_lo:v_hi])
    if d_weight is not None:
        d_weight.mul_(gmax.to(d_weight.dtype))
    return d_weight


_SCHEDULES = {"gemm": _backward_gemm, "atomic": _backward_atomic}


def _finish(run: _Launch, needs: GradNeeds, d_rows: torch.Tensor | None, d_weight: torch.Tensor | None,
            d_bias32: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Scatter the fp32 row gradients into ``d_hidden`` (repeated rows meet in index_add_) and cast."""
    head = run.head
    d_hidden = None
    if needs.hidden:
        d_hidden = torch.zeros_like(head.hidden).index_add_(0, head.rows, d_rows.to(head.hidden.dtype))
    if d_weight is not None:
        d_weight = d_weight.to(head.weight.dtype)
    return d_hidden, d_weight, (d_bias32.to(head.bias.dtype) if needs.bias else None)


def backward(
    head: LossHead,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    needs: GradNeeds,
    schedule: str | None = "gemm",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i grad_rows[i] * loss_i`` w.r.t. hidden, weight and bias (None where not needed).

    ``schedule``: "gemm" (dlogits chunks + cuBLAS) or "atomic" (one fused kernel). ``chunk_bytes`` bounds
    the staging buffer of either (tests make it tiny to cross chunk edges).
    """
    schedule = schedule or "gemm"
    if schedule not in _SCHEDULES:
        raise ValueError(f"leafe_ce_triton.backward: schedule must be one of {SCHEDULES}, got {schedule!r}")
    run = _Launch(head)
    g, gmax = run.grad_scale(grad_rows)
    d_rows = torch.zeros(run.m, run.d, dtype=torch.float32, device=run.device) if needs.hidden else None
    d_bias32 = torch.zeros(run.v, dtype=torch.float32, device=run.device) if needs.bias else None
    d_weight = _SCHEDULES[schedule](run, lse.float().contiguous(), g, gmax, d_rows, d_bias32, needs.weight,
                                    chunk_bytes)
    if d_rows is not None and schedule == "gemm":
        d_rows.mul_(g[:, None])  # the per-row scale, in fp32, after the matmul ("atomic" applies it in-kernel)
    return _finish(run, needs, d_rows, d_weight, d_bias32)


def chunk_rows(v: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk of the "chunked" schedule: the fp32 logits chunk [R, V] within the budget (>= 1)."""
    return max(1, (budget_bytes or LOGITS_BUDGET_BYTES) // (4 * v))


def forward_backward(
    head: LossHead,
    row_scale: torch.Tensor | None,
    needs: GradNeeds,
    budget_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The "chunked" schedule: loss and the gradients of ``sum_i row_scale[i] * loss_i`` in one pass
    (6·M·H·V flops). Per chunk of rows: fp32 logits by cuBLAS, ``_row_grad_kernel`` (lse, target logit,
    unscaled dlogits in place), then ``d_rows = dz @ W`` (fp32, times the row scale) and
    ``d_weight += dz^T (h * g / max|g|)`` (addmm; fp32 accumulation when the weight is fp32), times
    ``max|g|`` at the end. ``needs`` all False: forward only (lse and target logit)."""
    run = _Launch(head)
    m, v, d, dev, dt = run.m, run.v, run.d, run.device, run.dtype
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    tgt = torch.empty(m, dtype=torch.float32, device=dev)
    if m == 0:  # no rows: zero gradients, nothing to launch
        grads = (torch.zeros_like(t) if need else None for t, need in zip((head.hidden, head.weight, head.bias), needs))
        return (lse, tgt, *grads)
    rows_per = min(m, chunk_rows(v, budget_bytes))
    zbuf = torch.empty(rows_per, v, dtype=torch.float32, device=dev)
    if needs.any:
        g, gmax = run.grad_scale(row_scale)
    d_rows_c = torch.empty(rows_per, d, dtype=torch.float32, device=dev) if needs.hidden else None
    d_hidden = torch.zeros_like(head.hidden) if needs.hidden else None
    w_acc_dtype = torch.float32 if head.weight.dtype == torch.float32 else dt
    d_weight = torch.zeros(v, d, dtype=w_acc_dtype, device=dev) if needs.weight else None
    d_bias32 = torch.zeros(v, dtype=torch.float32, device=dev) if needs.bias else None
    bias = run.weight if run.bias is None else run.bias
    for r0 in range(0, m, rows_per):
        r1 = min(m, r0 + rows_per)
        h = run.h_rows[r0:r1]
        z = zbuf[: r1 - r0]
        _mm_f32(h, run.weight.T, out=z)
        _row_grad_kernel[(r1 - r0,)](
            z, bias, run.targets[r0:r1], lse[r0:], tgt[r0:], run.weight, v, zbuf.stride(0),
            float(head.softcap or 1.0), float(head.z_loss),
            HAS_BIAS=run.bias is not None, SOFTCAP=bool(head.softcap), COMPUTE_DZ=needs.any,
        )
        if not needs.any:
            continue
        # the dlogits now sit in place over the logits rows, in the matmul dtype
        dz = z.view(dt)[:, :v] if dt != torch.float32 else z
        g_c = g[r0:r1]
        if needs.hidden:
            dr = d_rows_c[: r1 - r0]
            _mm_f32(dz, run.weight, out=dr)
            dr.mul_(g_c[:, None])  # the row scale, in fp32, after the matmul
            d_hidden.index_add_(0, head.rows[r0:r1], dr.to(dt))
        if needs.weight:
            _addmm_f32_(d_weight, dz.T, (h.float() * (g_c / gmax)[:, None]).to(dt))
        if needs.bias:
            d_bias32 += torch.mv(dz.T.float(), g_c)
    if needs.weight:
        d_weight.mul_(gmax.to(d_weight.dtype))
        d_weight = d_weight.to(head.weight.dtype)
    d_bias = d_bias32.to(head.bias.dtype) if needs.bias else None
    return lse, tgt, d_hidden, d_weight, d_bias


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
    lse, tgt = forward(LossHead(hidden, weight, None, rows, targets))
    ref = hidden.double()[rows] @ weight.double().T
    err = max((lse.double() - ref.logsumexp(1)).abs().max().item(),
              (tgt.double() - ref.gather(1, targets[:, None]).squeeze(1)).abs().max().item())
    if not math.isfinite(err):
        raise AssertionError("leafe_ce_triton.smoke_test: non-finite result")
    return err
