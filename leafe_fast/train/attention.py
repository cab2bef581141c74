"""Varlen (packed) causal attention behind transformers' ``AttentionInterface``.

A packed micro-batch is one row ``[1, T]`` holding several samples back to back; ``cu_seqlens`` marks
where each starts. Attention must stay inside a sample. We register one attention function under the
name :data:`VARLEN_ATTENTION`; a model built with ``attn_implementation=VARLEN_ATTENTION`` keeps its stock
code, and its forward hands ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``position_ids`` through
``**kwargs`` to us. Our mask builder (:func:`varlen_mask`) returns None unless the batch has padding, so
a packed row never gets a [T, T] mask built for it (``attention_mask`` arrives as None).

Backends, fastest first (``select_backend``):

- ``flash_attn``   ``flash_attn.flash_attn_varlen_func`` (CUDA, the flash-attn package installed)
- ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10: flash kernels in torch)
- ``sdpa_mask``    SDPA with a block-diagonal causal mask built from ``cu_seqlens`` (any device; O(T^2)
  memory, so used for short packs on the CPU)
- ``loop``         one causal SDPA call per sample (any device; O(max_len^2) memory, slow for many samples)

The two flash backends take fp16/bf16 only: fp32 inputs (precision="fp32" on CUDA) go to the SDPA paths.

Without ``cu_seq_lens_*`` the boundaries come from ``position_ids`` restarting at 0, so a plain
``model(input_ids, position_ids=...)`` call on a packed row is also correct. Padded [B, T] batches and
KV-cached decoding (evaluation, generation) fall back to ordinary SDPA with transformers' padding mask.
"""

from __future__ import annotations

import inspect
import os
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "leafe_varlen"
Backend = Literal["flash_attn", "torch_varlen", "sdpa_mask", "loop"]
BACKENDS: tuple[str, ...] = ("flash_attn", "torch_varlen", "sdpa_mask", "loop")
# Above this many tokens the CPU path switches from one masked SDPA (T^2 mask) to the per-sample loop.
MASK_MAX_TOKENS = int(os.environ.get("LEAFE_ATTN_MASK_MAX_TOKENS", "8192"))

_forced_backend: str | None = None


@lru_cache(maxsize=1)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA: not usable
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, causal kwargs, supports_gqa) or None when this torch has no varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causality is_causal=True; later versions use window_size=(-1, 0).
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this environment, fastest first."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if _flash_attn_varlen() is not None:
            out.append("flash_attn")
        if _torch_varlen() is not None:
            out.append("torch_varlen")
    out += ["sdpa_mask", "loop"]
    return out


def select_backend(device: torch.device | str, prefer: str = "auto", num_tokens: int = 0) -> str:
    """The backend to use: ``prefer`` if given (error if unavailable), else the fastest available.

    ``num_tokens`` matters only for the CPU choice between one masked SDPA and the per-sample loop.
    """
    avail = available_backends(device)
    if prefer != "auto":
        if prefer not in BACKENDS:
            raise ValueError(f"attention backend {prefer!r} is unknown; choose 'auto' or one of {BACKENDS}")
        if prefer not in avail:
            raise ValueError(f"attention backend {prefer!r} is not available on {device}; available: {avail}")
        return prefer
    if avail[0] in ("flash_attn", "torch_varlen"):
        return avail[0]
    return "sdpa_mask" if num_tokens <= MASK_MAX_TOKENS else "loop"


def set_backend(name: str | None) -> None:
    """Force one backend for every call (None restores automatic choice). Used by tests and benchmarks."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")
    _forced_backend = name


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries of a packed row: a new sample starts wherever the position is 0."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=pos.device), starts])
    end = torch.tensor([pos.numel()], dtype=starts.dtype, device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def document_causal_mask(cu_seqlens: torch.Tensor, total: int, sliding_window: int | None = None) -> torch.Tensor:
    """Bool [T, T]: query i may see key j iff both are in one sample and j <= i (and within the window)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths.long())
    idx = torch.arange(total, device=cu_seqlens.device)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if sliding_window is not None:
        mask &= idx[:, None] - idx[None, :] < sliding_window
    return mask


def _repeat_kv(x: torch.Tensor, groups: int, head_dim: int = 1) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim)


def varlen_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of packed ``q [T, H, D]``, ``k, v [T, Hkv, D]`` -> ``[T, H, D]``, per sample."""
    total, heads, head_dim = q.shape
    groups = heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    name = select_backend(q.device, backend, total) if backend == "auto" or backend in BACKENDS else backend
    if name in ("flash_attn", "torch_varlen") and q.dtype not in (torch.float16, torch.bfloat16):
        # The flash kernels take 16-bit inputs only (precision="fp32" on CUDA): exact SDPA paths instead.
        if backend != "auto":
            raise ValueError(f"attention backend {name!r} needs float16/bfloat16 inputs, got {q.dtype}; "
                             "use 'sdpa_mask' or 'loop' (or 'auto') for fp32")
        name = "sdpa_mask" if total <= MASK_MAX_TOKENS else "loop"
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = int(max_seqlen)
    if name in ("flash_attn", "torch_varlen"):
        # [T, H, D] views of HF's [1, H, T, D] tensors; the flash kernels want dense [T, H, D] inputs.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if name == "flash_attn":
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return _flash_attn_varlen()(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True, window_size=window
        )
    if name == "torch_varlen":
        varlen_attn, causal, has_gqa = _torch_varlen()
        if sliding_window is not None:
            if "window_size" not in causal:
                raise NotImplementedError("torch 2.10 varlen_attn has no sliding window; install flash-attn")
            causal = {"window_size": (sliding_window - 1, 0)}
        if has_gqa:
            extra = {"enable_gqa": groups > 1}
        else:
            k, v, extra = _repeat_kv(k, groups), _repeat_kv(v, groups), {}
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **causal, **extra)
    # SDPA paths want [B, H, T, D]
    qh, kh, vh = q.transpose(0, 1), _repeat_kv(k, groups, 1).transpose(0, 1), _repeat_kv(v, groups, 1).transpose(0, 1)
    if name == "sdpa_mask":
        mask = document_causal_mask(cu, total, sliding_window)
        out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask, scale=scale)[0]
        return out.transpose(0, 1)
    if name == "loop":
        bounds = cu.tolist()
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b == a:
                continue
            mask = None
            if sliding_window is not None:
                i = torch.arange(b - a, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
            pieces.append(
                F.scaled_dot_product_attention(
                    qh[:, a:b], kh[:, a:b], vh[:, a:b], attn_mask=mask, is_causal=mask is None, scale=scale
                )
            )
        return torch.cat(pieces, dim=1).transpose(0, 1)
    raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")


def leafe_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: ``query [B, H, T, D]`` -> ``([B, T, H, D], None)``."""
    if dropout:
        raise NotImplementedError("leafe_varlen attention has no dropout; set attention_dropout=0 in the config")
    batch, heads, total, head_dim = query.shape
    dev_type = query.device.type
    if torch.is_autocast_enabled(dev_type):
        # bf16-mixed: with fp32 parameters the RoPE tables are fp32, so q and k arrive fp32 next to a bf16 v.
        # The flash kernels take one 16-bit dtype; autocast does not reach them, so cast as it would.
        dt = torch.get_autocast_dtype(dev_type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if attention_mask is None and batch == 1 and key.shape[2] == total:
        cu = kwargs.get("cu_seq_lens_q")
        max_len = kwargs.get("max_length_q")
        if cu is None:
            position_ids = kwargs.get("position_ids")
            if position_ids is not None:
                cu = cu_seqlens_from_position_ids(position_ids)
            else:
                cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = varlen_attention_packed(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu,
            max_len,
            scale=scaling,
            sliding_window=sliding_window,
            backend=_forced_backend or "auto",
        )
        return out.unsqueeze(0), None
    # Padded batches and KV-cached decoding (generation, evaluation): SDPA with the model's own mask
    # (built by :func:`varlen_mask` only when there is padding), else causal aligned to the newest key.
    groups = heads // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, kv_len = total, k.shape[2]
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # a raw [B, kv_len] padding mask from a direct call
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            mask = causal[None, None] & attention_mask[:, None, None, -kv_len:].bool()
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
            mask = mask[..., :kv_len]
    elif kv_len != q_len:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        if sliding_window is not None:
            mask &= ~torch.ones_like(mask).tril(kv_len - q_len - sliding_window)
    elif sliding_window is not None:
        mask = document_causal_mask(torch.tensor([0, q_len], device=query.device), q_len, sliding_window)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask builder registered beside the attention: no mask at all unless the batch has padding.

    Packed rows need none (boundaries come from ``cu_seq_lens``/``position_ids``); a padded batch gets the
    same 4-D mask transformers builds for SDPA.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register :func:`leafe_varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, leafe_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION
