"""Adapters that let other training stacks use leafe-fast's packer and loss (Hugging Face first)."""

from __future__ import annotations

from leafe_fast._lazy import lazy_getattr

_LAZY = {
    "LeafeCollator": "leafe_fast.integrations.hf",
    "LeafeLossMixin": "leafe_fast.integrations.hf",
    "leafe_compute_loss": "leafe_fast.integrations.hf",
    "enable_packed_attention": "leafe_fast.integrations.hf",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
