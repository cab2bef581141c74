"""Fakes for the exploration tests: a char-level chat format, a line-walk env, scripted policies.

No tests here; the other tests/test_explore*.py files (and the subprocess runner of the resume
test) import these.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass

from leafe_fast.envs.base import GroundedReflection, StepResult, Task

IM_START, IM_END, NL = 300, 301, 10


def enc(text: str) -> list[int]:
    ids = [ord(c) for c in text]
    assert all(i < 256 for i in ids), f"fake codec is ASCII-only: {text!r}"
    return ids


def dec(ids) -> str:
    return "".join(chr(i) if i < 256 else f"<{i}>" for i in ids)


class FakeChat:
    """ChatML-shaped deltas over a char-level codec (each char one token; specials >= 300)."""

    name = "fake-chatml"
    header_ids = [IM_START, *enc("assistant"), NL]
    stop_ids = [IM_END]

    def _msg(self, role: str, content: str) -> list[int]:
        return [IM_START, *enc(role), NL, *enc(content), IM_END, NL]

    def prompt_ids(self, messages) -> list[int]:
        return [t for m in messages for t in self._msg(m["role"], m["content"])]

    def message_ids(self, content: str, role: str = "user") -> list[int]:
        return self._msg(role, content)

    def observation_ids(self, action_ids, content: str, role: str = "user") -> list[int]:
        close = [NL] if list(action_ids[-1:]) == [IM_END] else [IM_END, NL]
        return close + self._msg(role, content)

    def decode_action(self, action_ids) -> str:
        ids = list(action_ids)
        if ids and ids[-1] == IM_END:
            ids = ids[:-1]
        return dec(ids)


class LineEnv:
    """Walk on a line from 0: reach ``goal`` (success) without stepping on ``pit`` (failure).

    Actions: "left", "right", "stay"; anything else is invalid (feedback, no move). The observation
    shows position, step count and a hash of the whole action log, so an inexact restore shows.
    ``ground_reflection`` answers from ``spec["ground"]`` = [rollback_step, experience] or None.
    """

    name = "line"

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay
        self.state = None
        self.spec = None
        self.resets = 0

    def instructions(self) -> str:
        return "Walk the line. Answer left, right or stay."

    def _obs(self) -> str:
        pos, t, log = self.state
        return f"pos={pos} t={t} log={zlib.crc32(repr(log).encode()) % 997}"

    def reset(self, task: Task) -> str:
        self.spec = dict(task.spec)
        self.state = (0, 0, ())
        self.resets += 1
        return f"task {task.task_id}: " + self._obs()

    def step(self, action: str) -> StepResult:
        if self.step_delay:
            time.sleep(self.step_delay)
        pos, t, log = self.state
        move = {"left": -1, "right": 1, "stay": 0}.get(action.strip())
        feedback = "" if move is not None else f"invalid action {action.strip()[:20]!r}"
        pos = pos + (move or 0)
        self.state = (pos, t + 1, log + (action,))
        success = pos == self.spec.get("goal", 10**9)
        failed = pos == self.spec.get("pit", 10**9)
        return StepResult(self._obs(), 1.0 if success else 0.0, success or failed, success, feedback)

    def snapshot(self):
        return self.state

    def restore(self, snapshot) -> None:
        self.state = snapshot

    def ground_reflection(self, history, mode="diagnosis"):
        g = self.spec.get("ground")
        return None if g is None else GroundedReflection(int(g[0]), str(g[1]))


def line_task(i: int = 0, **spec) -> Task:
    return Task(task_id=f"line-{i}", env="line", spec=spec)


# --- scripted policies: prompt (decoded) -> reply text -------------------------------------------
REFLECT_MARK = "Reply with only a JSON object"


def keep_all(prompt_text: str) -> dict:
    """A reflection that keeps every step (on track), for periodic checks."""
    n = int(re.findall(r"You have taken (\d+) step", prompt_text)[-1])
    return {"rollback_step": n, "experience": "on track"}


def is_reflection(prompt_text: str) -> bool:
    """A reflection request is the last user message of the prompt."""
    last_user = prompt_text.rfind("<300>user")
    return REFLECT_MARK in prompt_text[last_user:] or "That reply was not usable" in prompt_text[last_user:]


def last_experience(prompt_text: str) -> str | None:
    found = re.findall(r"earlier attempt that went wrong from this point on: (.*?)\n", prompt_text)
    return found[-1] if found else None


@dataclass
class Policy:
    """Acts ``plan`` (a list of actions, cycled) before any experience; after an experience
    message, acts ``after[experience]`` (default: ``plan``). Reflections pop from ``reflections``
    (JSON objects, raw strings, or callables of the prompt text); when that runs out, ``default_reflection``."""

    plan: list
    after: dict | None = None
    reflections: list | None = None
    default_reflection: object = None

    def __call__(self, request):
        text = dec(request.input_ids)
        if is_reflection(text):
            if self.reflections:
                r = self.reflections.pop(0)
            else:
                r = self.default_reflection
            if callable(r):
                r = r(text)
            return r if isinstance(r, str) else json.dumps(r)
        exp = last_experience(text)
        plan = (self.after or {}).get(exp, self.plan) if exp else self.plan
        # actions since the last experience message (the current request's header included)
        n = text[max(text.rfind("earlier attempt that went wrong"), 0):].count("<300>assistant")
        return plan[(n - 1) % len(plan)]


def run_explore_subprocess(out_path: str, n_tasks: int, step_delay: float) -> None:
    """Entry point of the resume test's child process."""
    from leafe_fast.engines.scripted import ScriptedEngine
    from leafe_fast.explore import ExploreConfig, explore

    tasks = [line_task(i, goal=3, pit=-2, ground=[0, "go right"]) for i in range(n_tasks)]
    policy = Policy(plan=["left", "left", "right"], after={"go right": ["right"]})
    engine = ScriptedEngine(policy, encode=enc, decode=dec)
    cfg = ExploreConfig(reflector="grounded", concurrency=2, max_branches=2, progress=False, seed=1)
    explore(tasks, lambda: LineEnv(step_delay), engine, FakeChat(), out_path, cfg)
