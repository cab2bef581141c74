"""Reflectors: who decides where a failed attempt went wrong and what to do instead.

- ``base``: the contract (``ReflectionContext`` in, ``Reflection`` out, ``Reflector`` protocol).
- ``llm``: ``LLMReflector``, the policy itself answers in strict JSON (LEAFE's reflection).
- ``grounded``: ``GroundedReflector``, the environment answers (``Env.ground_reflection``): a
  diagnosis by default (``"grounded"``), or the expert's answer (``"oracle"``, an ablation).

``make_reflector(config)`` builds the one ``config.reflector`` names.
"""

from __future__ import annotations

from typing import Any

from leafe_fast.explore.reflectors.base import Reflection, ReflectionContext, Reflector
from leafe_fast.explore.reflectors.grounded import GroundedReflector
from leafe_fast.explore.reflectors.llm import LLMReflector, MalformedReflection, parse_reflection

__all__ = [
    "GroundedReflector",
    "LLMReflector",
    "MalformedReflection",
    "Reflection",
    "ReflectionContext",
    "Reflector",
    "make_reflector",
    "parse_reflection",
]


def make_reflector(config: Any) -> Reflector:
    """The reflector ``config.reflector`` names (an ``ExploreConfig``)."""
    if config.reflector in ("grounded", "oracle"):
        return GroundedReflector(mode="oracle" if config.reflector == "oracle" else "diagnosis")
    return LLMReflector(
        retries=config.reflect_retries,
        invalid_step=config.invalid_step,
        max_new_tokens=config.reflect_max_new_tokens,
        temperature=config.temperature if config.reflect_temperature is None else config.reflect_temperature,
        top_p=config.top_p,
    )
