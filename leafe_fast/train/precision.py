"""Training precision: which dtype the weights live in, and which dtype the math runs in.

- ``"bf16-mixed"`` (default on CUDA): parameters, gradients and AdamW state are fp32 ("master weights");
  matmuls run in bf16. One process: ``torch.autocast`` around the model forward. FSDP2:
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over fp32 shards, so every rank gathers
  bf16 weights for compute and reduces gradients in fp32 into the fp32 shards.
- ``"bf16-pure"``: parameters and optimizer state in bf16, AdamW updates them directly. Half the weight and
  optimizer memory, but an update smaller than half a bf16 ulp of the weight (2^-9 relative, so 1e-5
  steps on weights near 1) is rounded away: lower quality, for when memory is what limits.
- ``"fp32"`` (default on the CPU): everything fp32. Bitwise reproducible on the CPU (exact resume).
- ``"auto"``: ``"bf16-mixed"`` on CUDA, ``"fp32"`` elsewhere.

Memory per parameter (weights + gradients + AdamW's two moments): bf16-mixed and fp32 16 bytes, bf16-pure
8 bytes, before FSDP2 divides it by the number of ranks (a 1.5B model: 24 GB against 12 GB).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

PRECISIONS = ("auto", "bf16-mixed", "bf16-pure", "fp32")


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``"auto"``/None -> ``"bf16-mixed"`` on CUDA, ``"fp32"`` elsewhere; other values are checked."""
    if precision in (None, "auto"):
        return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {PRECISIONS}")
    return precision


def master_dtype(precision: str) -> torch.dtype:
    """The dtype parameters (and so gradients and AdamW state) are stored and updated in."""
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a single-process forward autocasts to (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


def cast_to_master(model: nn.Module, precision: str) -> nn.Module:
    """Put ``model``'s floating-point parameters in ``master_dtype(precision)``, in place.

    Upcasting a bf16-loaded model to fp32 is exact (the stored values do not change), so a bf16 model
    handed to a bf16-mixed trainer simply gains its master copy. Downcasting (fp32 model, bf16-pure) loses
    bits and is warned about.
    """
    want = master_dtype(precision)
    have = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if have and have != {want}:
        if want == torch.bfloat16:
            warnings.warn(f"precision='bf16-pure': casting {sorted(map(str, have))} parameters to bfloat16 "
                          "(lossy); load the model with dtype='bfloat16' to avoid the extra copy", stacklevel=3)
        # Parameters only: buffers such as RoPE's inv_freq keep their dtype (transformers keeps them fp32).
        # Assigning .data keeps tied weights tied (they are one Parameter object).
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)
    return model
