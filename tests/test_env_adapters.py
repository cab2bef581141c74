"""Optional adapters: lazy imports, clear missing-package errors, and replay restore, checked
against in-test fakes that mimic each package's API (none of the packages is installed in CI)."""

from __future__ import annotations

import os
import pickle
import random
import sys
import types

import pytest

from leafe_fast.envs.adapters import ADAPTERS, ReplayDivergence
from leafe_fast.envs.base import Env
from leafe_fast.envs.registry import available_envs, list_tasks, make_env


class _Game:
    """A seeded toy game: reach a hidden total by 'add k'. Observations carry draws from the
    game's own RNG, so only a replay with the same seed and actions reproduces them."""

    def __init__(self, seed: int, noisy: bool = False):
        self.rng = random.Random(seed)
        self.goal = self.rng.randint(3, 9)
        self.total = 0
        self.noisy = noisy

    def intro(self) -> str:
        return f"Reach the hidden total. Draw {self.rng.random():.6f}"

    def act(self, action: str) -> tuple[str, float, bool]:
        parts = action.split()
        if len(parts) != 2 or parts[0] != "add" or not parts[1].isdigit():
            return "Nothing happens.", 0.0, False
        self.total += int(parts[1])
        won = self.total == self.goal
        noise = os.urandom(4).hex() if self.noisy else f"{self.rng.random():.6f}"
        return f"Total {self.total}. Draw {noise}", 1.0 if won else 0.0, won or self.total > self.goal


NOISY = {"on": False}


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _fake_scienceworld() -> dict:
    class ScienceWorldEnv:
        def __init__(self, server_path="", envStepLimit=100):
            self.game = None

        def get_task_names(self):
            return ["boil", "melt"]

        def load(self, task_name, variation, simplification=""):
            self.seed = sum(map(ord, task_name)) * 100 + variation

        def get_variations_train(self):
            return [0, 1, 2, 3]

        def get_variations_dev(self):
            return [4, 5]

        def get_variations_test(self):
            return [6, 7]

        def reset(self):
            self.game, self.score = _Game(self.seed, NOISY["on"]), 0
            return self.game.intro(), {"score": 0}

        def step(self, action):
            obs, reward, done = self.game.act(action)
            self.score += 100 * reward
            return obs, 100 * reward, done, {"score": self.score}

    return {"scienceworld": _module("scienceworld", ScienceWorldEnv=ScienceWorldEnv)}


def _fake_textarena() -> dict:
    class Env:
        def reset(self, num_players, seed=None):
            assert num_players == 1
            self.game, self.won = _Game(seed, NOISY["on"]), False
            self.last = self.game.intro()

        def get_observation(self):
            return 0, self.last

        def step(self, action):
            self.last, reward, done = self.game.act(action)
            self.won = reward > 0
            return done, {}

        def close(self):
            return {0: 1 if self.won else -1}, {0: {"reason": "won" if self.won else "overshot"}}

    return {"textarena": _module("textarena", make=lambda env_id: Env())}


def _fake_webshop() -> dict:
    class WebAgentTextEnv:
        def __init__(self, observation_mode="html", **kwargs):
            assert observation_mode == "text"

        def reset(self, session=None):
            self.game = _Game(session, NOISY["on"])
            return self.game.intro(), None

        def step(self, action):
            obs, reward, done = self.game.act(action)
            return obs, reward, done, None

    envs = _module("web_agent_site.envs", WebAgentTextEnv=WebAgentTextEnv)
    return {"web_agent_site": _module("web_agent_site", envs=envs), "web_agent_site.envs": envs}


def _fake_alfworld() -> dict:
    registered: dict[str, str] = {}

    class Env:
        def __init__(self, game_file):
            self.game_file = game_file

        def reset(self):
            self.game, self.score = _Game(len(self.game_file), NOISY["on"]), 0
            return self.game.intro(), {"won": False}

        def step(self, command):
            obs, reward, done = self.game.act(command)
            self.score += reward
            return obs, self.score, done, {"won": reward > 0, "admissible_commands": ["add 1", "add 2"]}

        def close(self):
            pass

    def register_game(game_file, request_infos=None, max_episode_steps=50, wrappers=()):
        assert len(wrappers) == 2
        registered[f"tw-{len(registered)}"] = game_file
        return f"tw-{len(registered) - 1}"

    gym = _module("textworld.gym", register_game=register_game, make=lambda env_id: Env(registered[env_id]))
    alfred = _module("alfworld.agents.environment.alfred_tw_env", AlfredDemangler=lambda: object(), AlfredInfos=object)
    return {
        "textworld": _module("textworld", EnvInfos=lambda **kw: kw, gym=gym),
        "textworld.gym": gym,
        "alfworld": _module("alfworld"),
        "alfworld.agents": _module("alfworld.agents"),
        "alfworld.agents.environment": _module("alfworld.agents.environment", alfred_tw_env=alfred),
        "alfworld.agents.environment.alfred_tw_env": alfred,
    }


FAKES = {"scienceworld": _fake_scienceworld, "textarena": _fake_textarena,
         "webshop": _fake_webshop, "alfworld": _fake_alfworld}
PACKAGE_OF = {"scienceworld": "scienceworld", "textarena": "textarena",
              "webshop": "web_agent_site.envs", "alfworld": "textworld"}
INSTALL_HINT = {"scienceworld": "pip install scienceworld", "textarena": "pip install textarena",
                "webshop": "github.com/princeton-nlp/WebShop", "alfworld": "pip install alfworld"}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install the fake package for an adapter; returns the task-listing kwargs it needs."""
    NOISY["on"] = False

    def install(name: str) -> dict:
        for mod_name, mod in FAKES[name]().items():
            monkeypatch.setitem(sys.modules, mod_name, mod)
        if name != "alfworld":
            return {}
        for split_dir in ["train", "valid_seen", "valid_unseen"]:
            for k in range(3):
                game = tmp_path / split_dir / f"pick_{split_dir}_{k}" / "trial_0" / "game.tw-pddl"
                game.parent.mkdir(parents=True)
                game.write_text("{}")
        return {"data_dir": str(tmp_path)}

    return install


def test_registry_lists_every_environment_and_rejects_unknown_names():
    assert {"sokoban", "code", "alfworld", "scienceworld", "webshop", "textarena"} <= set(available_envs())
    with pytest.raises(KeyError, match="unknown environment 'nethack'"):
        make_env("nethack")


def test_custom_environments_can_be_registered_once(monkeypatch):
    from leafe_fast.envs import registry
    from leafe_fast.envs.base import Task
    from leafe_fast.envs.sokoban import SokobanEnv

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    picture = "#######\n#P_X_O#\n#######"
    registry.register_env("corridor", SokobanEnv, lambda split, n, seed: [Task(f"c{i}", "sokoban", {"level": picture})
                                                                         for i in range(n)])
    assert "corridor" in available_envs() and len(list_tasks("corridor", n=3)) == 3
    assert make_env("corridor", max_steps=5).max_steps == 5
    with pytest.raises(ValueError, match="already registered"):
        registry.register_env("corridor", SokobanEnv, lambda **kw: [])
    with pytest.raises(ValueError, match="n must be >= 0"):
        list_tasks("corridor", n=-1)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_missing_package_names_what_to_install(name, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE_OF[name], None)  # import of it now raises ImportError
    with pytest.raises(ImportError) as err:
        make_env(name)
    assert PACKAGE_OF[name] in str(err.value) and INSTALL_HINT[name] in str(err.value)


def test_importing_adapters_imports_no_optional_package():
    import leafe_fast.envs.adapters  # noqa: F401
    import leafe_fast.envs.registry  # noqa: F401

    loaded = [m for m in ["textarena", "scienceworld", "web_agent_site", "textworld", "alfworld"]
              if sys.modules.get(m) is not None]
    assert loaded == []


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_replay_restore_is_exact_on_a_fake_backend(name, fake):
    task_kwargs = fake(name)
    tasks = list_tasks(name, split="train", n=2, seed=0, **task_kwargs)
    assert tasks == list_tasks(name, split="train", n=2, seed=0, **task_kwargs)
    test_ids = {t.task_id for t in list_tasks(name, split="test", n=2, seed=0, **task_kwargs)}
    assert not test_ids & {t.task_id for t in tasks}
    rng = random.Random(3)
    for task in tasks:
        env = make_env(name, max_steps=12)
        assert isinstance(env, Env) and env.restore_mode == "replay" and env.instructions()
        env.reset(task)
        actions = [rng.choice(["add 1", "add 2", "look", "add 1"]) for _ in range(12)]
        snaps, results = {}, []
        for i, action in enumerate(actions):
            if i in (0, 2, 5):
                snaps[i] = env.snapshot()
            results.append(env.step(action))
            if results[-1].done:
                break
        fresh = make_env(name, max_steps=12)
        for i, snap in snaps.items():
            tail = actions[i:len(results)]
            for target in (env, fresh):
                target.restore(pickle.loads(pickle.dumps(snap)))
                replay = []
                for action in tail:
                    replay.append(target.step(action))
                assert replay == results[i:]
        assert env.ground_reflection(results) is None


def test_adapter_reports_success_and_step_limit(fake):
    fake("textarena")
    task = list_tasks("textarena", n=1, seed=0)[0]
    goal = _Game(task.spec["seed"]).goal
    env = make_env("textarena", max_steps=20)
    env.reset(task)
    results = [env.step("add 1") for _ in range(goal)]
    assert results[-1].success and results[-1].done and results[-1].reward == 1
    assert not any(r.done for r in results[:-1])
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("add 1")
    short = make_env("textarena", max_steps=3)
    short.reset(task)
    results = [short.step("look") for _ in range(3)]
    assert results[-1].done and not results[-1].success and "step limit (3)" in results[-1].feedback


def test_nondeterministic_backend_is_caught_on_restore(fake):
    fake("scienceworld")
    env = make_env("scienceworld")
    env.reset(list_tasks("scienceworld", n=1, seed=0)[0])
    NOISY["on"] = True  # from now on observations carry unseeded noise
    env.step("add 1")
    snap = env.snapshot()
    with pytest.raises(ReplayDivergence, match="not deterministic"):
        env.restore(snap)


def test_adapters_check_task_specs(fake):
    fake("webshop")
    env = make_env("webshop")
    from leafe_fast.envs.base import Task

    with pytest.raises(ValueError, match="needs spec\\['session'\\]"):
        env.reset(Task("t", "webshop", {}))
    with pytest.raises(ValueError, match="is for env 'sokoban'"):
        env.reset(Task("t", "sokoban", {"session": 1}))
    with pytest.raises(ValueError, match="unknown split"):
        list_tasks("webshop", split="dev")
