"""Stage 1: reflective tree exploration (act, reflect, roll back, branch) -> ``trees.jsonl``.

``explore(tasks, env, engine, tokenizer_or_chat, out_path, config)`` runs it; ``ExploreConfig``
holds the settings (budgets, reflector, cadence, sampling, concurrency); ``ExploreSummary`` is what it
returns. Reflectors: ``LLMReflector`` (strict JSON from the policy) and ``GroundedReflector``
(``Env.ground_reflection``).
"""

from leafe_fast.explore.config import ExploreConfig
from leafe_fast.explore.reflectors.grounded import GroundedReflector
from leafe_fast.explore.loop import explore
from leafe_fast.explore.reflectors.llm import LLMReflector, MalformedReflection, parse_reflection
from leafe_fast.explore.summary import ExploreSummary

__all__ = [
    "explore",
    "ExploreConfig",
    "ExploreSummary",
    "LLMReflector",
    "GroundedReflector",
    "MalformedReflection",
    "parse_reflection",
]
