"""TextArena adapter for single-player games (``pip install textarena``).

Observations: the game is built without TextArena's default observation wrapper (which repeats the
whole history every turn); each observation is only the messages the game sent since the last move
(the prompt and first board at ``reset``), without the echo of the agent's own move. Moves go
through TextArena's ``ActionFormattingWrapper`` (a move without brackets is wrapped in ``[...]``).

Success: TextArena's single-player games end with an outcome reward for player 0 that is 1 only when
the game is won (solved puzzle, guessed number, ...); on a loss they give partial credit in [0, 1)
(or -1). ``success`` is an outcome of 1 that was not ended by an invalid move; partial credit is a
failure, reported as the step's reward. Invalid moves: TextArena allows one (``error_allowance``) and
tells the player; that message is the step's ``feedback`` (the second invalid move in a row ends the
game, with the reason as feedback).

RNG: TextArena's ``reset(seed)`` reseeds Python's global ``random`` and many games draw from it
while stepping. Each env runs its backend calls on its own copy of the global RNG state (see
:class:`leafe_fast.envs.replay.PrivateRng`), seeded with the task's seed, so games are reproducible
and replayable with several envs in flight, and the host's ``random`` is untouched.

Offline: games that need nothing downloaded (Wordle and the other word games need an nltk download
and fail offline) are listed in :data:`OFFLINE_GAMES`; the default is ``GuessTheNumber-v0``.
"""

from __future__ import annotations

import random
import sys

from leafe_fast.envs.base import Task
from leafe_fast.envs.replay import SPLITS, ReplayEnv, require, split_rng

DEFAULT_GAME = "GuessTheNumber-v0"
OFFLINE_GAMES = (
    "GuessTheNumber-v0", "TowerOfHanoi-v0", "FrozenLake-v0", "Minesweeper-v0", "Sudoku-v0", "LightsOut-v0",
    "FifteenPuzzle-v0", "2048-v0", "Countdown-v0", "Mastermind-v0", "PegJump-v0", "RushHour-v0",
    "Cryptarithm-v0", "Secretary-v0", "ThreeCardMonte-v0", "Bandit-v0", "Blackjack-v0",
)
"""Single-player games of TextArena 0.7.4 checked to reset, step and replay offline
(``tests/test_env_real_textarena.py``)."""


class TextArenaEnv(ReplayEnv):
    """Single-player TextArena games: ``spec = {"env_id": "GuessTheNumber-v0", "seed": 3}``.

    Backend: ``textarena.make(env_id)`` (unwrapped to the game), ``reset(num_players=1, seed=...)``,
    ``get_observation() -> (player_id, [(sender, message, type), ...])`` (new messages only),
    ``step(action) -> (done, info)``, ``close() -> (rewards, game_info)``."""

    name = "textarena"
    description = (
        "You are playing a single-player TextArena game. Its rules and the expected move format "
        "are in the first observation; answer each turn with one move in that format, e.g. [5]."
    )
    _INSTALL = "pip install textarena"

    def __init__(self, max_steps: int = 50, verify_replay: bool = True) -> None:
        super().__init__(max_steps, verify_replay)
        self._ta = require("textarena", self._INSTALL, "textarena")
        self._env = None

    def _messages(self) -> tuple[str, str]:
        """The text of the messages since the last call, and the invalid-move notices among them."""
        _, messages = self._env.get_observation()
        if isinstance(messages, str):
            return messages, ""
        types = self._ta.ObservationType
        shown, admin = [], []
        for message in messages or []:
            kind = message[2] if len(message) > 2 else None
            if kind == types.PLAYER_ACTION:
                continue  # the agent's own move, echoed
            shown.append(str(message[1]).strip())
            if kind == types.GAME_ADMIN:
                admin.append(str(message[1]).strip())
        return "\n".join(m for m in shown if m), " ".join(admin)

    def _open(self, task: Task) -> str:
        if "env_id" not in task.spec or "seed" not in task.spec:
            raise ValueError(f"TextArena task {task.task_id!r} needs spec['env_id'] and spec['seed']")
        env_id, seed = str(task.spec["env_id"]), int(task.spec["seed"])
        random.seed(seed)  # this env's private copy (see PrivateRng)
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed(seed % 2**32)
        game = self._ta.make(env_id=env_id)
        while isinstance(game, self._ta.Wrapper):  # drop the default wrappers: they repeat the history
            game = game.env
        formatting = getattr(self._ta.wrappers, "ActionFormattingWrapper", None)
        self._env = formatting(game) if formatting is not None else game
        try:
            self._env.reset(num_players=1, seed=seed)
        except (AssertionError, ValueError) as exc:
            raise ValueError(f"TextArena game {env_id!r} cannot be played by one player: {exc}") from exc
        return self._messages()[0]

    def _act(self, action: str):
        done, _ = self._env.step(action=action)
        text, admin = self._messages()
        if not done:
            return text, 0.0, False, False, admin, {}
        rewards, game_info = self._env.close()
        try:
            reward = float((rewards or {}).get(0, 0.0))
        except (TypeError, ValueError):  # Countdown-v0 puts its invalid-move reason there
            reward = 0.0
        player = (game_info or {}).get(0) or {}
        reason = str(player.get("reason", "") or "")
        invalid = bool(player.get("invalid_move", False))
        won = reward >= 1.0 and not invalid
        text = "\n".join(t for t in (text, "The game is over." + (f" {reason}" if reason else "")) if t)
        feedback = "" if won else (reason or "The game is over and was not won.")
        return text, reward, True, won, feedback, {"outcome_reward": reward}

    @staticmethod
    def tasks(split: str = "train", n: int = 8, seed: int = 0, env_id: str = DEFAULT_GAME) -> list[Task]:
        """Game seeds; the split picks disjoint seeds: ``(seed * 1e6 + i) * 3 + split_index``."""
        split_rng(split, seed)  # validates the split name
        offset = SPLITS.index(split)
        return [Task(f"textarena-{env_id}-{split}-{s}", "textarena", {"env_id": env_id, "seed": s})
                for s in ((seed * 1_000_000 + i) * 3 + offset for i in range(n))]
