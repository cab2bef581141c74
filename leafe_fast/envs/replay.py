"""Replay restore and RNG isolation shared by the adapters of optional text-game packages.

None of ALFWorld, ScienceWorld, WebShop or TextArena can copy a running game, so an adapter restores
by replay: a snapshot records the task, the actions taken since ``reset`` and a hash of what was
seen after ``reset`` and after every action; ``restore`` re-opens the task and replays the actions,
checking the hash after every replayed step. The first step whose hash differs raises
:class:`ReplayDivergence` (the env is then unusable until the next ``reset``/``restore``), so a
completed restore reproduced every step's observation (``restore_mode = "replay-checked"``). With
``verify_replay=False`` nothing is checked and ``restore_mode`` is ``"inexact"``; exploration then
refuses to branch unless ``accept_inexact_restores`` is set. A restore costs as many backend steps as
the snapshot is deep. ``replay_stats`` counts restores, replayed steps and divergences.

Global RNG: several backends seed or draw from Python's global ``random`` (and ``numpy.random``).
Every backend call of an adapter runs inside :meth:`PrivateRng.active`, which swaps in the env's own
saved global-RNG state and swaps the host's back afterwards, under one process-wide lock. So the
host program's RNG is never reseeded or advanced by an adapter, and two envs in flight do not draw
from each other's stream (``concurrency > 1``). Limit: code of the host running on another thread
without that lock, while a backend call is in progress, would see the env's state. An adapter whose
backend was checked to draw nothing from Python's RNG (ScienceWorld: a JVM) sets ``isolate_rng =
False``, so its calls run in parallel on ``env_workers`` threads; its package import is still isolated.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

from leafe_fast.envs.base import GroundedReflection, Observation, StepResult, Task

SPLITS = ("train", "val", "test")
RESTORE_MODES = ("exact", "replay-checked", "inexact")
"""``exact``: the snapshot holds the state itself; ``replay-checked``: restore replays the actions and
checks every step, raising on a difference; ``inexact``: restore replays without a check."""

_GLOBAL_RNG_LOCK = threading.RLock()


class ReplayDivergence(RuntimeError):
    """Replaying the recorded actions did not reproduce a recorded step."""


def require(module: str, install: str, env: str) -> Any:
    """Import ``module`` or fail with an error that says what to install. The import runs on a
    throwaway copy of the global RNG state: importing TextArena or ScienceWorld draws from it."""
    try:
        with PrivateRng().active():
            return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {env} environment needs the Python package providing '{module}', which is not "
            f"installed: {install}"
        ) from exc


def split_rng(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    return random.Random(f"{seed}:{split}")


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


class PrivateRng:
    """An env's own copy of the global RNG states (``random`` and, once imported, ``numpy.random``)."""

    def __init__(self) -> None:
        self._py: Any = None
        self._np: Any = None

    def seed(self, seed: int) -> None:
        """What ``random.seed(seed)`` / ``numpy.random.seed`` would do, to this env's copy only."""
        self._py = random.Random(seed).getstate()
        np = sys.modules.get("numpy")
        if np is not None:
            self._np = np.random.RandomState(seed % 2**32).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run a backend call on this env's RNG states; the host's are put back afterwards."""
        with _GLOBAL_RNG_LOCK:
            np = sys.modules.get("numpy")
            host_py = random.getstate()
            host_np = np.random.get_state() if np is not None else None
            try:
                if self._py is not None:
                    random.setstate(self._py)
                if np is not None and self._np is not None:
                    np.random.set_state(self._np)
                yield
            finally:
                self._py = random.getstate()
                random.setstate(host_py)
                np = sys.modules.get("numpy")  # the call may have imported it
                if np is not None:
                    self._np = np.random.get_state()
                    if host_np is not None:
                        np.random.set_state(host_np)


@dataclass(frozen=True)
class ReplaySnapshot:
    task: Task
    actions: tuple[Any, ...]  # what a replay re-sends (see ReplayEnv._record)
    hashes: tuple[str, ...]  # after reset, then after each action
    last_observation: str
    steps: int
    done: bool
    success: bool


class ReplayEnv:
    """Shared replay-restore machinery; subclasses implement ``_open`` and ``_act``.

    Hooks a subclass may override: ``_fingerprint`` (the text hashed per step; default the
    observation), ``_record`` / ``_replay_action`` (what is stored for an action and what is sent
    again on replay), ``_close_backend``.
    """

    name = "replay"
    description = ""
    isolate_rng = True  # False only for a backend that draws nothing from Python's global RNG

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.verify_replay = verify_replay
        self.rng = PrivateRng()
        self.replay_stats = {"restores": 0, "replayed_steps": 0, "divergences": 0}
        self._task: Task | None = None
        self._actions: list[Any] = []
        self._hashes: list[str] = []
        self._last = ""
        self._steps = 0
        self._done = False
        self._success = False
        self._closed = False

    @property
    def restore_mode(self) -> str:
        return "replay-checked" if self.verify_replay else "inexact"

    def _backend(self) -> Any:
        """The context of every backend call: this env's own global-RNG state (see PrivateRng),
        or nothing for a backend that never touches it (its calls then need not be serialised)."""
        return self.rng.active() if self.isolate_rng else nullcontext()

    # -- backend hooks -------------------------------------------------------------------

    def _open(self, task: Task) -> str:
        """Reset the backend on ``task``; return the first observation."""
        raise NotImplementedError

    def _act(self, action: str) -> tuple[str, float, bool, bool, str, dict]:
        """One backend step: observation, reward, done, success, feedback, info."""
        raise NotImplementedError

    def _fingerprint(self, observation: str) -> str:
        """The text whose hash must match on replay (called right after ``_open``/``_act``)."""
        return observation

    def _record(self, action: str) -> Any:
        """What to store for the agent's ``action``, read against the last observation the agent saw
        (``self._last``); picklable."""
        return action

    def _replay_action(self, recorded: Any) -> str:
        """The action to send to the backend for a record, in its current state (on a step and on
        replay); raise ``ReplayDivergence`` if the record cannot be resolved."""
        return recorded

    def _close_backend(self) -> None:
        pass

    # -- protocol --------------------------------------------------------------------------

    def instructions(self) -> str:
        return self.description

    def reset(self, task: Task) -> Observation:
        if task.env != self.name:
            raise ValueError(f"task {task.task_id!r} is for env {task.env!r}, not {self.name!r}")
        self._check_open()
        self._task = None  # not usable if _open fails half-way
        with self._backend():
            obs = self._open(task)
        self._task, self._actions, self._last = task, [], obs
        self._hashes = [digest(self._fingerprint(obs))]
        self._steps, self._done, self._success = 0, False, False
        return obs

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset(task) or restore(snapshot) before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset() or restore() before step()")
        record = self._record(action)
        with self._backend():
            obs, reward, done, success, feedback, info = self._act(self._replay_action(record))
        self._actions.append(record)
        self._hashes.append(digest(self._fingerprint(obs)))
        self._steps += 1
        if self._steps >= self.max_steps and not done:
            done = True
            feedback = (feedback + " " if feedback else "") + f"The episode ended at the step limit ({self.max_steps})."
        self._last, self._done, self._success = obs, bool(done), bool(success)
        return StepResult(obs, float(reward), bool(done), bool(success), feedback, {**info, "steps": self._steps})

    def snapshot(self) -> ReplaySnapshot:
        if self._task is None:
            raise RuntimeError("call reset(task) before snapshot()")
        return ReplaySnapshot(self._task, tuple(self._actions), tuple(self._hashes), self._last, self._steps,
                              self._done, self._success)

    def restore(self, snapshot: ReplaySnapshot) -> None:
        if not isinstance(snapshot, ReplaySnapshot):
            raise TypeError(f"not a replay snapshot: {type(snapshot).__name__}")
        self._check_open()
        self._task = None  # until the replay succeeded
        self.replay_stats["restores"] += 1
        with self._backend():
            obs = self._open(snapshot.task)
        self._check_step(snapshot, 0, obs)
        for i, recorded in enumerate(snapshot.actions, start=1):
            with self._backend():
                try:
                    action = self._replay_action(recorded)
                except ReplayDivergence as exc:
                    self.replay_stats["divergences"] += 1
                    raise ReplayDivergence(f"{self.name}: task {snapshot.task.task_id!r}, step {i}: {exc}") from None
                obs = self._act(action)[0]
            self.replay_stats["replayed_steps"] += 1
            self._check_step(snapshot, i, obs)
        self._task, self._actions, self._hashes = snapshot.task, list(snapshot.actions), list(snapshot.hashes)
        # what the agent saw (the backend's own text may differ in listing order)
        self._last, self._steps = snapshot.last_observation, snapshot.steps
        self._done, self._success = snapshot.done, snapshot.success

    def _check_step(self, snapshot: ReplaySnapshot, i: int, obs: str) -> None:
        if not self.verify_replay or digest(self._fingerprint(obs)) == snapshot.hashes[i]:
            return
        self.replay_stats["divergences"] += 1
        what = "the first observation" if i == 0 else f"step {i} of {len(snapshot.actions)} ({snapshot.actions[i - 1]!r})"
        raise ReplayDivergence(
            f"{self.name}: replaying task {snapshot.task.task_id!r} gave a different state at {what} than "
            "recorded; the backend is not deterministic for this task, so it cannot be restored exactly "
            "(call reset or restore another snapshot)"
        )

    def ground_reflection(self, history: list[StepResult], mode: str = "diagnosis") -> GroundedReflection | None:
        return None  # no solver or oracle for these games

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.name} env is closed")

    def close(self) -> None:
        """Release the backend (a JVM for ScienceWorld); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._task = None
        self._close_backend()

    def __enter__(self) -> "ReplayEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown: modules may already be gone
