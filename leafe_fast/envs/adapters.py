"""Adapters for optional text-game packages: ALFWorld, ScienceWorld, WebShop, TextArena.

None of these packages is a dependency. Each adapter imports its package when it is constructed
and raises an ``ImportError`` naming what to install when it is missing.

Snapshots: none of these packages can copy a running game, so restore is by replay
(``restore_mode = "replay"``): a snapshot records the task and the actions taken since ``reset``;
``restore`` resets the backend on the same task (same seed, game file, variation or session) and
replays the actions. That is exact only if the backend is deterministic given the task, so the
replay is checked: the last observation must match the one recorded, else
:class:`ReplayDivergence` is raised instead of continuing from a different state. A restore costs
as many backend steps as the snapshot is deep.

What the adapters do not do: multi-player TextArena games (only single-player ones), ALFWorld's
visual (THOR) mode, WebShop's HTML mode; and ``ground_reflection`` returns None (these
environments carry no solver to say where a trajectory went wrong).

The backend calls follow each package's documented Python API, as listed on each class. They are
exercised in CI against in-test fakes of those APIs, not the real packages.
"""

from __future__ import annotations

import glob
import importlib
import os
import random
from dataclasses import dataclass
from typing import Any

from leafe_fast.envs.base import GroundedReflection, Observation, StepResult, Task

SPLITS = ("train", "val", "test")


class ReplayDivergence(RuntimeError):
    """Replaying the recorded actions did not reproduce the recorded observation."""


def require(module: str, install: str, env: str) -> Any:
    """Import ``module`` or fail with an error that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {env} environment needs the Python package providing '{module}', which is not "
            f"installed: {install}"
        ) from exc


@dataclass(frozen=True)
class ReplaySnapshot:
    task: Task
    actions: tuple[str, ...]
    last_observation: str
    steps: int
    done: bool
    success: bool


class ReplayEnv:
    """Shared replay-restore machinery; subclasses implement ``_open`` and ``_act``."""

    name = "replay"
    restore_mode = "replay"
    description = ""

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.verify_replay = verify_replay
        self._task: Task | None = None
        self._actions: list[str] = []
        self._last = ""
        self._steps = 0
        self._done = False
        self._success = False

    # -- backend hooks -------------------------------------------------------------------

    def _open(self, task: Task) -> str:
        """Reset the backend on ``task``; return the first observation."""
        raise NotImplementedError

    def _act(self, action: str) -> tuple[str, float, bool, bool, str, dict]:
        """One backend step: observation, reward, done, success, feedback, info."""
        raise NotImplementedError

    # -- protocol --------------------------------------------------------------------------

    def instructions(self) -> str:
        return self.description

    def reset(self, task: Task) -> Observation:
        if task.env != self.name:
            raise ValueError(f"task {task.task_id!r} is for env {task.env!r}, not {self.name!r}")
        obs = self._open(task)
        self._task, self._actions, self._last = task, [], obs
        self._steps, self._done, self._success = 0, False, False
        return obs

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset() or restore() before step()")
        obs, reward, done, success, feedback, info = self._act(action)
        self._actions.append(action)
        self._steps += 1
        if self._steps >= self.max_steps and not done:
            done = True
            feedback = (feedback + " " if feedback else "") + f"The episode ended at the step limit ({self.max_steps})."
        self._last, self._done, self._success = obs, bool(done), bool(success)
        return StepResult(obs, float(reward), bool(done), bool(success), feedback, {**info, "steps": self._steps})

    def snapshot(self) -> ReplaySnapshot:
        if self._task is None:
            raise RuntimeError("call reset(task) before snapshot()")
        return ReplaySnapshot(self._task, tuple(self._actions), self._last, self._steps, self._done, self._success)

    def restore(self, snapshot: ReplaySnapshot) -> None:
        if not isinstance(snapshot, ReplaySnapshot):
            raise TypeError(f"not a replay snapshot: {type(snapshot).__name__}")
        obs = self._open(snapshot.task)
        for action in snapshot.actions:
            obs = self._act(action)[0]
        if self.verify_replay and obs != snapshot.last_observation:
            raise ReplayDivergence(
                f"{self.name}: replaying {len(snapshot.actions)} actions on task "
                f"{snapshot.task.task_id!r} gave a different observation than recorded; the backend "
                "is not deterministic for this task, so it cannot be restored exactly"
            )
        self._task, self._actions, self._last = snapshot.task, list(snapshot.actions), obs
        self._steps, self._done, self._success = snapshot.steps, snapshot.done, snapshot.success

    def ground_reflection(self, history: list[StepResult]) -> GroundedReflection | None:
        return None  # no solver or oracle for these games


def _split_rng(split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    return random.Random(f"{seed}:{split}")


# --------------------------------------------------------------------------------- ALFWorld


class ALFWorldEnv(ReplayEnv):
    """ALFWorld text games (TextWorld engine), one game file per task: ``spec["game_file"]``.

    Backend: ``textworld.gym.register_game(game_file, request_infos, max_episode_steps,
    wrappers=[AlfredDemangler(), AlfredInfos])``, ``textworld.gym.make(env_id)``,
    ``reset() -> (obs, infos)``, ``step(cmd) -> (obs, score, done, infos)``; success is
    ``infos["won"]``."""

    name = "alfworld"
    description = (
        "You are in a household text game (ALFWorld). Reach the goal stated in the first "
        "observation. Answer each turn with one command, e.g. 'go to countertop 1', "
        "'take apple 1 from countertop 1', 'open fridge 1', 'examine drawer 2', 'inventory'."
    )
    _INSTALL = "pip install alfworld (and download its data with `alfworld-download`)"

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        super().__init__(max_steps, verify_replay)
        self._textworld = require("textworld", self._INSTALL, "alfworld")
        self._tw_gym = require("textworld.gym", self._INSTALL, "alfworld")
        self._alfred = require("alfworld.agents.environment.alfred_tw_env", self._INSTALL, "alfworld")
        self._env = None
        self._env_ids: dict[str, str] = {}

    def _open(self, task: Task) -> str:
        game = task.spec.get("game_file")
        if not game:
            raise ValueError(f"ALFWorld task {task.task_id!r} needs spec['game_file']")
        if game not in self._env_ids:
            infos = self._textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
            self._env_ids[game] = self._tw_gym.register_game(
                game, request_infos=infos, max_episode_steps=self.max_steps,
                wrappers=[self._alfred.AlfredDemangler(), self._alfred.AlfredInfos],
            )
        if self._env is not None and hasattr(self._env, "close"):
            self._env.close()
        self._env = self._tw_gym.make(self._env_ids[game])
        obs, _ = self._env.reset()
        self._score = 0.0
        return str(obs)

    def _act(self, action: str):
        obs, score, done, infos = self._env.step(action)
        reward, self._score = float(score) - self._score, float(score)  # TextWorld scores are cumulative
        won = bool(infos.get("won", False))
        feedback = "That command had no effect." if str(obs).strip() == "Nothing happens." else ""
        info = {"admissible_commands": list(infos.get("admissible_commands") or [])}
        return str(obs), reward, bool(done) or won, won, feedback, info

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, data_dir: str | None = None) -> list[Task]:
        """Game files under ``data_dir`` (default ``$ALFWORLD_DATA/json_2.1.1``): train ->
        train/, val -> valid_seen/, test -> valid_unseen/; ``n`` sampled by ``seed``."""
        rng = _split_rng(split, seed)
        root = data_dir or os.path.join(os.environ.get("ALFWORLD_DATA", ""), "json_2.1.1")
        folder = os.path.join(root, {"train": "train", "val": "valid_seen", "test": "valid_unseen"}[split])
        games = sorted(glob.glob(os.path.join(folder, "**", "game.tw-pddl"), recursive=True))
        if not games:
            raise FileNotFoundError(f"no ALFWorld games (game.tw-pddl) under {folder}; run alfworld-download "
                                    "or pass data_dir")
        picked = rng.sample(games, min(n, len(games)))
        return [Task(f"alfworld-{split}-{os.path.relpath(g, folder)}", "alfworld", {"game_file": g}) for g in picked]


# ------------------------------------------------------------------------------ ScienceWorld


class ScienceWorldEnv(ReplayEnv):
    """ScienceWorld tasks: ``spec = {"task_name", "variation", "simplification"}``.

    Backend: ``scienceworld.ScienceWorldEnv("", envStepLimit=...)``, ``load(task_name, variation,
    simplification)``, ``reset() -> (obs, info)``, ``step(action) -> (obs, reward, completed,
    info)`` with ``info["score"]`` in 0..100; success is a score of 100."""

    name = "scienceworld"
    description = (
        "You are in a science text game (ScienceWorld). Complete the task stated in the first "
        "observation. Answer each turn with one action, e.g. 'look around', 'open door to kitchen', "
        "'go to kitchen', 'pick up thermometer', 'focus on substance in metal pot'."
    )
    _INSTALL = "pip install scienceworld (it also needs a Java runtime)"

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        super().__init__(max_steps, verify_replay)
        self._module = require("scienceworld", self._INSTALL, "scienceworld")
        self._env = self._module.ScienceWorldEnv("", envStepLimit=max_steps)

    def _open(self, task: Task) -> str:
        spec = task.spec
        if "task_name" not in spec or "variation" not in spec:
            raise ValueError(f"ScienceWorld task {task.task_id!r} needs spec['task_name'] and spec['variation']")
        self._env.load(spec["task_name"], int(spec["variation"]), spec.get("simplification", "easy"))
        obs, _ = self._env.reset()
        return str(obs)

    def _act(self, action: str):
        obs, reward, completed, info = self._env.step(action)
        score = float(info.get("score", 0))
        feedback = str(obs) if "No known action matches" in str(obs) else ""
        return str(obs), float(reward), bool(completed), score >= 100, feedback, {"score": score}

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, task_names: list[str] | None = None) -> list[Task]:
        """Variations of ScienceWorld's own train/dev/test split, ``n`` sampled by ``seed``."""
        rng = _split_rng(split, seed)
        env = require("scienceworld", ScienceWorldEnv._INSTALL, "scienceworld").ScienceWorldEnv("")
        pool = []
        for task_name in task_names or sorted(env.get_task_names()):
            env.load(task_name, 0, "")
            getter = {"train": env.get_variations_train, "val": env.get_variations_dev,
                      "test": env.get_variations_test}[split]
            pool += [(task_name, int(v)) for v in getter()]
        picked = rng.sample(pool, min(n, len(pool)))
        return [Task(f"scienceworld-{split}-{t}-{v}", "scienceworld", {"task_name": t, "variation": v})
                for t, v in picked]


# ----------------------------------------------------------------------------------- WebShop


class WebShopEnv(ReplayEnv):
    """WebShop in text mode, one goal per task: ``spec["session"]`` (an instruction index).

    Backend: ``web_agent_site.envs.WebAgentTextEnv(observation_mode="text", num_products=...)``,
    ``reset(session=...) -> (obs, info)``, ``step(action) -> (obs, reward, done, info)`` with
    actions ``search[query]`` / ``click[button]``; success is a final reward of 1."""

    name = "webshop"
    description = (
        "You are shopping on a web site (WebShop) for the item described in the instruction. "
        "Answer each turn with one action: search[your query] or click[a button or product shown]."
    )
    _INSTALL = ("WebShop is not on PyPI: install it from https://github.com/princeton-nlp/WebShop "
                "(pip install -e . in its checkout provides 'web_agent_site')")
    # WebShop's own convention: goals 0..499 are the test set, 500..1499 validation, the rest train.
    SESSION_RANGES = {"test": (0, 500), "val": (500, 1500), "train": (1500, 12087)}

    def __init__(self, max_steps: int = 15, verify_replay: bool = True, num_products: int | None = None) -> None:
        super().__init__(max_steps, verify_replay)
        module = require("web_agent_site.envs", self._INSTALL, "webshop")
        options = {} if num_products is None else {"num_products": num_products}
        self._env = module.WebAgentTextEnv(observation_mode="text", **options)

    def _open(self, task: Task) -> str:
        if "session" not in task.spec:
            raise ValueError(f"WebShop task {task.task_id!r} needs spec['session']")
        obs, _ = self._env.reset(session=task.spec["session"])
        return str(obs)

    def _act(self, action: str):
        obs, reward, done, _ = self._env.step(action)
        feedback = "That action is not available on this page." if "Invalid action" in str(obs) else ""
        return str(obs), float(reward), bool(done), bool(done) and float(reward) >= 1.0, feedback, {}

    @classmethod
    def tasks(cls, split: str = "train", n: int = 8, seed: int = 0) -> list[Task]:
        rng = _split_rng(split, seed)
        lo, hi = cls.SESSION_RANGES[split]
        return [Task(f"webshop-{split}-{s}", "webshop", {"session": s})
                for s in sorted(rng.sample(range(lo, hi), min(n, hi - lo)))]


# --------------------------------------------------------------------------------- TextArena


class TextArenaEnv(ReplayEnv):
    """Single-player TextArena games: ``spec = {"env_id": "Wordle-v0", "seed": 3}``.

    Backend: ``textarena.make(env_id)``, ``reset(num_players=1, seed=...)``,
    ``get_observation() -> (player_id, observation)``, ``step(action) -> (done, info)``,
    ``close() -> rewards`` (or ``(rewards, info)``); success is a positive reward for player 0."""

    name = "textarena"
    description = (
        "You are playing a single-player TextArena game. Its rules and the expected move format "
        "are in the first observation; answer each turn with one move in that format."
    )
    _INSTALL = "pip install textarena"

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        super().__init__(max_steps, verify_replay)
        self._ta = require("textarena", self._INSTALL, "textarena")
        self._env = None

    def _observe(self) -> str:
        _, obs = self._env.get_observation()
        if isinstance(obs, (list, tuple)):  # older releases: a list of (sender, message[, type])
            obs = "\n".join(str(m[1]) if isinstance(m, (list, tuple)) and len(m) > 1 else str(m) for m in obs)
        return str(obs)

    def _open(self, task: Task) -> str:
        if "env_id" not in task.spec or "seed" not in task.spec:
            raise ValueError(f"TextArena task {task.task_id!r} needs spec['env_id'] and spec['seed']")
        self._env = self._ta.make(env_id=task.spec["env_id"])
        self._env.reset(num_players=1, seed=int(task.spec["seed"]))
        return self._observe()

    def _act(self, action: str):
        done, _ = self._env.step(action=action)
        if not done:
            return self._observe(), 0.0, False, False, "", {}
        closed = self._env.close()
        rewards = closed[0] if isinstance(closed, tuple) else closed
        reward = float((rewards or {}).get(0, 0.0))
        game_info = closed[1] if isinstance(closed, tuple) and len(closed) > 1 else {}
        player_info = game_info.get(0) if isinstance(game_info, dict) else None
        reason = str(player_info.get("reason", "")) if isinstance(player_info, dict) else ""
        obs = "The game is over." + (f" {reason}" if reason else "")
        return obs, reward, True, reward > 0, reason, {}

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, env_id: str = "Wordle-v0") -> list[Task]:
        """Game seeds; the split picks disjoint seeds: ``(seed * 1e6 + i) * 3 + split_index``."""
        _split_rng(split, seed)  # validates the split name
        offset = SPLITS.index(split)
        return [Task(f"textarena-{env_id}-{split}-{s}", "textarena", {"env_id": env_id, "seed": s})
                for s in ((seed * 1_000_000 + i) * 3 + offset for i in range(n))]


ADAPTERS: dict[str, type[ReplayEnv]] = {
    cls.name: cls for cls in (ALFWorldEnv, ScienceWorldEnv, WebShopEnv, TextArenaEnv)
}
