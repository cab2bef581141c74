"""What a reflector receives and returns (the contract every reflector implements).

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
    experience: str = ""  # may be "" when the run rolls back without a summary (ExploreConfig.summary)
    source: str = ""
    attempts: int = 0  # model replies asked for
    malformed: int = 0  # replies that were not usable (each one retried while attempts remained)
    clamped: bool = False  # the reply's step was out of range and clamped into it (invalid_step="clamp")
    invalid_step: bool = False  # the final answer's step was out of range: no branch
    note: str = ""  # why there is no branch, when there is none
    replies: list[str] = field(default_factory=list)


ReflectGen = Generator[GenerationRequest, GenerationResult, Reflection]


class Reflector(Protocol):
    name: str

    def reflect(self, ctx: ReflectionContext) -> ReflectGen: ...


def resolve_step(k: int, ctx: ReflectionContext) -> tuple[int | None, bool]:
    """A proposed rollback step checked against the valid range: ``(step or None to go on, out_of_range)``.

    Valid: 0 .. n_steps-1; ``n_steps`` itself means "keep everything" and is valid only at a periodic
    check (a finished trajectory cannot be continued). An out-of-range step is never moved silently:
    the caller retries (``invalid_step="retry"``, the default) or clamps it on request, counted.
    """
    n = ctx.n_steps
    if k == n and ctx.may_keep_all:
        return None, False
    if 0 <= k < n:
        return k, False
    return None, True


def clamp_step(k: int, ctx: ReflectionContext) -> int:
    """``k`` moved into 0..n_steps-1 (the ``invalid_step="clamp"`` policy)."""
    return min(max(k, 0), ctx.n_steps - 1)
