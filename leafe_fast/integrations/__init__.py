"""Adapters that let other training stacks use leafe-fast's packer and loss (Hugging Face first)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LeafeCollator": "leafe_fast.integrations.hf",
    "LeafeLossMixin": "leafe_fast.integrations.hf",
    "leafe_compute_loss": "leafe_fast.integrations.hf",
    "enable_packed_attention": "leafe_fast.integrations.hf",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leafe_fast.integrations' has no attribute {name!r}")
