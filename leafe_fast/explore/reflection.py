"""What a reflector receives and returns; ``make_reflector`` picks one from the config.

A reflector is a generator function: ``reflect(ctx)`` yields ``GenerationRequest``s, receives their
``GenerationResult``s, and returns a ``Reflection``. That lets the scheduler batch reflection
requests of many tasks together with their action requests, while a reflector that needs no model
(the env-grounded one) simply returns without yielding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Protocol

from leafe_fast.engines.base import GenerationRequest, GenerationResult
from leafe_fast.envs.base import StepResult

TRIGGERS = ("periodic", "failed", "depth", "success")


@dataclass
class ReflectionContext:
    """The current trajectory of one task at the moment it reflects."""

    task_id: str
    trajectory_ids: list[int]  # prompt + every step of the current path, ending with its observation
    n_steps: int  # steps on the current path (>= 1)
    trigger: str  # one of TRIGGERS
    history: list[StepResult]  # the step results of the current path, in order
    env: Any  # the task's env, in the state after the last step
    chat: Any  # ChatFormat
    remaining_tokens: Callable[[], int]  # generation budget left for the task, updated live
    max_context_tokens: int | None = None
    seed: Callable[[], int | None] = lambda: None  # a fresh sampling seed per request

    @property
    def may_keep_all(self) -> bool:
        """At a periodic check the trajectory may simply go on: rollback_step == n_steps."""
        return self.trigger == "periodic"


@dataclass
class Reflection:
    """``rollback_step``: steps to keep (0 .. n_steps-1) for a branch, or None: no branch."""

    rollback_step: int | None
    experience: str = ""
    source: str = ""
    attempts: int = 0  # model replies asked for
    malformed: int = 0  # replies that were not usable (each one retried while attempts remained)
    clamped: bool = False  # the reply's step was out of range and clamped into it
    note: str = ""  # why there is no branch, when there is none
    replies: list[str] = field(default_factory=list)


ReflectGen = Generator[GenerationRequest, GenerationResult, Reflection]


class Reflector(Protocol):
    name: str

    def reflect(self, ctx: ReflectionContext) -> ReflectGen: ...


def resolve_step(k: int, ctx: ReflectionContext) -> tuple[int | None, bool]:
    """Map a proposed rollback step onto the valid range: (step or None to go on, clamped?).

    Valid: 0 .. n_steps-1; ``n_steps`` itself means "keep everything" and is honoured only at a
    periodic check (a finished trajectory cannot be continued), else clamped to n_steps-1.
    """
    n = ctx.n_steps
    if k == n and ctx.may_keep_all:
        return None, False
    clamped = min(max(k, 0), n - 1)
    return clamped, clamped != k


def make_reflector(config: Any) -> Reflector:
    if config.reflector == "grounded":
        from leafe_fast.explore.grounded import GroundedReflector

        return GroundedReflector()
    from leafe_fast.explore.reflect import LLMReflector

    return LLMReflector(
        retries=config.reflect_retries,
        invalid_step=config.invalid_step,
        max_new_tokens=config.reflect_max_new_tokens,
        temperature=config.temperature if config.reflect_temperature is None else config.reflect_temperature,
        top_p=config.top_p,
    )
