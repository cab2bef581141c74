"""Stage 1: exploration -> ``trees.jsonl``: LEAFE's reflective tree search, or independent rollouts.

``explore(tasks, env, engine, tokenizer_or_chat, out_path, config)`` runs it; ``ExploreConfig``
holds the settings (mode, reflector, cadence, budgets, sampling, concurrency); ``ExploreSummary`` is
what it returns. Reflectors (``leafe_fast.explore.reflectors``): ``LLMReflector`` (strict JSON from the
policy) and ``GroundedReflector`` (``Env.ground_reflection``: a diagnosis, or the oracle ablation).
"""

from leafe_fast.explore.config import ExploreConfig
from leafe_fast.explore.loop import explore
from leafe_fast.explore.reflectors import (
    GroundedReflector,
    LLMReflector,
    MalformedReflection,
    make_reflector,
    parse_reflection,
)
from leafe_fast.explore.summary import ExploreSummary

__all__ = [
    "explore",
    "ExploreConfig",
    "ExploreSummary",
    "LLMReflector",
    "GroundedReflector",
    "MalformedReflection",
    "make_reflector",
    "parse_reflection",
]
