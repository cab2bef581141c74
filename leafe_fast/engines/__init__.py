"""Rollout engines, token ids in and out: ``hf`` (embedded, CPU or GPU), ``sglang`` (radix cache),
``scripted`` (tests). Backends import lazily, so ``import leafe_fast.engines`` stays cheap and
works without torch-heavy or optional packages."""

from __future__ import annotations

from typing import Any

from leafe_fast._lazy import lazy_getattr
from leafe_fast.engines.base import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "RolloutEngine",
    "SamplingParams",
    "HFEngine",
    "SGLangEngine",
    "ScriptedEngine",
    "ENGINE_KINDS",
    "make_engine",
]

# public name -> module that defines it
_LAZY = {
    "HFEngine": "leafe_fast.engines.hf",
    "SGLangEngine": "leafe_fast.engines.sglang",
    "ScriptedEngine": "leafe_fast.engines.scripted",
}
ENGINE_KINDS = {"hf": "HFEngine", "sglang": "SGLangEngine", "scripted": "ScriptedEngine"}


__getattr__ = lazy_getattr(__name__, _LAZY)


def make_engine(kind: str, **kwargs: Any) -> RolloutEngine:
    """Build an engine by name: ``make_engine("hf", model=..., tokenizer=...)``,
    ``make_engine("sglang", model_path=...)`` or ``make_engine("sglang", url=...)``,
    ``make_engine("scripted", ...)``. Keyword arguments go to the engine's constructor."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; choose from {sorted(ENGINE_KINDS)}")
    cls = __getattr__(ENGINE_KINDS[kind])
    return cls(**kwargs)
