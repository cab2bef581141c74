"""ALFWorld adapter (``pip install alfworld``: it builds TextWorld's jericho and fast-downward, about
five minutes). ALFWorld's game data is a download (``alfworld-download``); offline, any game file in
its format works, e.g. the small one in ``tests/data/alfworld/``.

Game files: ALFRED games (``*.tw-pddl``, a PDDL problem for ALFWorld's shipped domain) are loaded with
ALFWorld's wrappers, which rename the PDDL objects (``apple_1`` -> ``apple 1``); other TextWorld
games (``tw-make``'s ``*.z8``) have no ALFRED object names, so those wrappers would crash in
``AlfredDemangler.load``: they are played as plain TextWorld games instead. Any other file is a
clear error. Success: TextWorld's ``won`` (the quest's goal holds); rewards are score differences.
"""

from __future__ import annotations

import glob
import os
import re

from leafe_fast.envs.base import Task
from leafe_fast.envs.replay import ReplayEnv, require, split_rng

_ZMACHINE = re.compile(r"\.z[1-8]$")


def game_kind(path: str) -> str:
    """``"alfred"`` for ``*.tw-pddl``, ``"textworld"`` for ``tw-make`` games (``*.z1``..``*.z8``)."""
    if path.endswith(".tw-pddl"):
        return "alfred"
    if _ZMACHINE.search(path):
        return "textworld"
    raise ValueError(
        f"ALFWorld game file {path!r}: unsupported format; use an ALFRED game (game.tw-pddl) or a "
        "tw-make game (*.z8)"
    )


class ALFWorldEnv(ReplayEnv):
    """ALFWorld text games (TextWorld engine), one game file per task: ``spec["game_file"]``.

    Backend: ``textworld.gym.register_game(game_file, request_infos, max_episode_steps,
    wrappers=[AlfredDemangler(), AlfredInfos])`` (no wrappers for tw-make games),
    ``textworld.gym.make(env_id)``, ``reset() -> (obs, infos)``, ``step(cmd) -> (obs, score, done,
    infos)``; success is ``infos["won"]``."""

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
        self._env_game = ""
        self._env_ids: dict[str, str] = {}
        self._score = 0.0

    def _register(self, game: str) -> str:
        if game not in self._env_ids:
            if not os.path.isfile(game):
                raise FileNotFoundError(f"ALFWorld game file {game!r} does not exist")
            kind = game_kind(game)
            infos = self._textworld.EnvInfos(won=True, admissible_commands=True,
                                             extras=["gamefile"] if kind == "alfred" else [])
            wrappers = [self._alfred.AlfredDemangler(), self._alfred.AlfredInfos] if kind == "alfred" else []
            self._env_ids[game] = self._tw_gym.register_game(
                game, request_infos=infos, max_episode_steps=10**9, wrappers=wrappers)
        return self._env_ids[game]

    def _open(self, task: Task) -> str:
        game = task.spec.get("game_file")
        if not game:
            raise ValueError(f"ALFWorld task {task.task_id!r} needs spec['game_file']")
        env_id = self._register(str(game))
        if self._env is None or self._env_game != game:  # a new game: a new TextWorld env
            self._close_backend()
            self._env = self._tw_gym.make(env_id)
            self._env_game = game
        obs, _ = self._env.reset()
        self._score = 0.0
        return str(obs)

    def _act(self, action: str):
        obs, score, done, infos = self._env.step(action)
        reward, self._score = float(score) - self._score, float(score)  # TextWorld scores are cumulative
        won = bool(infos.get("won", False))
        feedback = f"The command {action!r} had no effect." if str(obs).strip() == "Nothing happens." else ""
        info = {"admissible_commands": list(infos.get("admissible_commands") or [])}
        return str(obs), reward, bool(done) or won, won, feedback, info

    def _close_backend(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None and hasattr(env, "close"):
            env.close()

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, data_dir: str | None = None) -> list[Task]:
        """Game files under ``data_dir`` (default ``$ALFWORLD_DATA/json_2.1.1``): train ->
        train/, val -> valid_seen/, test -> valid_unseen/; ``n`` sampled by ``seed``."""
        rng = split_rng(split, seed)
        root = data_dir or os.path.join(os.environ.get("ALFWORLD_DATA", ""), "json_2.1.1")
        folder = os.path.join(root, {"train": "train", "val": "valid_seen", "test": "valid_unseen"}[split])
        games = sorted(glob.glob(os.path.join(folder, "**", "game.tw-pddl"), recursive=True))
        if not games:
            raise FileNotFoundError(f"no ALFWorld games (game.tw-pddl) under {folder}; run alfworld-download "
                                    "or pass data_dir")
        picked = rng.sample(games, min(n, len(games)))
        return [Task(f"alfworld-{split}-{os.path.relpath(g, folder)}", "alfworld", {"game_file": g}) for g in picked]
