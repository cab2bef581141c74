"""Liger kernels (RMSNorm, RoPE, SwiGLU) patched into a loaded model, on CUDA only.

Never Liger's cross-entropy or fused-linear cross-entropy: the LM head goes through our own fused LEAFE
loss (two groups, global normalizers), which Liger's loss does not express. Liger is an optional extra
(``pip install leafe-fast[gpu]``); without it, or on the CPU, nothing is patched.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def apply_liger(model: nn.Module, *, required: bool = False) -> bool:
    """Patch ``model`` in place; returns whether anything was applied.

    required=True turns "cannot apply" (no CUDA, Liger missing, unsupported model) into an error.
    """
    device = next(model.parameters()).device
    reason = None
    if device.type != "cuda":
        reason = f"the model is on {device}, Liger's Triton kernels need CUDA"
    elif not liger_available():
        reason = "liger-kernel is not installed (pip install 'leafe-fast[gpu]')"
    if reason is None:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            # Liger itself only logs and returns for these: without this check we would report "applied".
            reason = f"Liger has no kernels for model type {model_type!r}"
    if reason is None:
        try:
            _apply_liger_kernel_to_instance(
                model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                fused_linear_cross_entropy=False,
            )
            return True
        except Exception as exc:  # unsupported model type or an API change: say why, keep the stock model
            reason = f"Liger could not patch {type(model).__name__}: {exc}"
    if required:
        raise RuntimeError(f"apply_liger: {reason}")
    log.info("Liger kernels not applied: %s", reason)
    return False


def liger_fused_ce_available() -> bool:
    """Whether the benchmark's 'HF + Liger fused CE' peer can run."""
    return torch.cuda.is_available() and liger_available()
