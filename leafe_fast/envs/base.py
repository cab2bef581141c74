"""The environment contract of Stage 1.

An environment is text in, text out, and must restore exactly: ``restore(snapshot())`` followed by
the same actions yields the same observations, rewards and feedback. LEAFE's reflection reads
``feedback``: the environment's own diagnosis of what went wrong (invalid move, deadlock, compile
error, failing test with input/expected/actual).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Observation = str
"""What the agent sees after ``reset`` or a step, as plain text."""


@dataclass(frozen=True)
class Task:
    """One task of an environment: an id that is unique within its environment, plus the data
    the environment needs to build it (a level seed, a problem with its tests, ...)."""

    task_id: str
    env: str
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """One step's outcome. ``info`` keys the pipeline reads (all optional):

    - ``"invalid"`` (bool): the action could not be parsed, or is a move the rules refuse (Sokoban: a
      bump into a wall or into a box that cannot move);
    - ``"noop"`` (bool): the state did not change (every refused move is also a no-op);
    - ``"action"`` (str): the env's canonical reading of the action (e.g. ``"up"`` for "Move up.").

    Stage 2 masks ``invalid``/``noop`` actions out of the targets where the env's registry entry asks
    for it and drops corrections that are invalid, no-ops or equal to the abandoned action.
    """

    observation: Observation
    reward: float
    done: bool
    success: bool
    feedback: str = ""
    info: dict[str, Any] = field(default_factory=dict)


GROUNDING_MODES = ("diagnosis", "oracle")
"""``diagnosis``: which step went wrong and why, phrased like feedback an agent could derive (LEAFE's
default). ``oracle``: may hand over an expert's answer (for example a solver's plan); an ablation,
never reported as LEAFE."""


@dataclass(frozen=True)
class GroundedReflection:
    """A reflection computed from the environment's own knowledge, not by an LLM.

    ``rollback_step`` is the number of steps to keep (0 = restart from ``reset``); the branch
    re-acts from the state after that many steps, with ``experience`` in context.
    """

    rollback_step: int
    experience: str
    mode: str = "diagnosis"  # which GROUNDING_MODES produced it; "oracle" marks an ablation


@runtime_checkable
class Env(Protocol):
    """Text environment with exact snapshot/restore."""

    name: str

    def instructions(self) -> str:
        """The system prompt: rules of the environment and the expected action format."""

    def reset(self, task: Task) -> Observation: ...

    def step(self, action: str) -> StepResult: ...

    def snapshot(self) -> Any:
        """An opaque, picklable state; cheap enough to take at every step."""

    def restore(self, snapshot: Any) -> None: ...

    def ground_reflection(
        self, history: list[StepResult], mode: str = "diagnosis"
    ) -> GroundedReflection | None:
        """Env-grounded reflection over the steps taken since reset (for policies too small to
        reflect): where it went wrong and why (``mode="diagnosis"``), or with ``mode="oracle"`` also
        the expert's answer; None if nothing is known. ``mode`` is one of ``GROUNDING_MODES``."""
