"""Liger kernels (RMSNorm, SwiGLU) swapped into ONE loaded model instance, on CUDA only.

Only the modules of the model passed in change: each ``*RMSNorm`` becomes a ``LigerRMSNorm`` and each
SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``, SiLU) a ``LigerSwiGLUMLP``, both built around the
model's own parameters (same ``Parameter`` objects, so optimizers, FSDP and checkpoints see no change).
Liger's ``apply_liger_kernel_to_<model>`` is not called: it rebinds the ``transformers`` modeling module's
globals (RMSNorm, MLP classes, ``apply_rotary_pos_emb``) for the whole process, so a second model loaded
later (an evaluation copy, a reference) would silently run Liger too; and only Liger's public classes are
used (no private names). RoPE stays HF's: its kernel is reachable only through that module global.

Never Liger's cross-entropy or fused-linear cross-entropy: the LM head goes through our own fused LEAFE
loss (two groups, global normalizers), which Liger's loss does not express. Liger is an optional extra
(``pip install leafe-fast[gpu]``); without it, or on the CPU, nothing is patched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Model families whose RMSNorm and MLP match Liger's RMSNorm ("llama" casting, offset 0) and SwiGLU MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and hasattr(module, "variance_epsilon"))


def _is_swiglu_mlp(module: nn.Module, config: Any) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) in ("silu", "swish"))


def patch_instance(model: nn.Module, rms_norm_cls: type, swiglu_cls: type) -> dict[str, int]:
    """Replace the RMSNorm and SwiGLU-MLP submodules of ``model`` (only) by ``rms_norm_cls`` /
    ``swiglu_cls`` instances that reuse the original parameters. Returns how many of each were swapped."""
    config = getattr(model, "config", None)
    counts = {"rms_norm": 0, "swiglu": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (rms_norm_cls, swiglu_cls):
                continue  # already patched (idempotent)
            if _is_rms_norm(child):
                with torch.device("meta"):
                    new = rms_norm_cls(child.weight.shape[0], eps=child.variance_epsilon)
                new.weight = child.weight
                parent._modules[name] = new
                counts["rms_norm"] += 1
            elif _is_swiglu_mlp(child, config):
                with torch.device("meta"):  # no throw-away [H, I] weights
                    new = swiglu_cls(config, intermediate_size=child.gate_proj.out_features)
                new.gate_proj, new.up_proj, new.down_proj = child.gate_proj, child.up_proj, child.down_proj
                parent._modules[name] = new
                counts["swiglu"] += 1
    return counts


def apply_liger(model: nn.Module, *, required: bool = False) -> bool:
    """Patch ``model`` in place; returns whether anything was applied.

    required=True turns "cannot apply" (no CUDA, Liger missing, unsupported model) into an error.
    """
    device = next(model.parameters()).device
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reason = None
    if device.type != "cuda":
        reason = f"the model is on {device}, Liger's Triton kernels need CUDA"
    elif not liger_available():
        reason = "liger-kernel is not installed (pip install 'leafe-fast[gpu]')"
    elif model_type not in SUPPORTED_MODEL_TYPES:
        reason = f"no instance patch for model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if reason is None:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

        counts = patch_instance(model, LigerRMSNorm, LigerSwiGLUMLP)
        if counts["rms_norm"] or counts["swiglu"]:
            log.info("Liger kernels applied to this model instance: %s", counts)
            return True
        reason = f"no RMSNorm or SwiGLU MLP found in {type(model).__name__}"
    if required:
        raise RuntimeError(f"apply_liger: {reason}")
    log.info("Liger kernels not applied: %s", reason)
    return False


def liger_fused_ce_available() -> bool:
    """Whether the benchmark's 'HF + Liger fused CE' peer can run."""
    return torch.cuda.is_available() and liger_available()
