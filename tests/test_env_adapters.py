"""Optional adapters against in-test fakes of each package's API: lazy imports, clear missing-package
errors, checked replay restore, success definitions, feedback, and isolation of the global RNG.

The fakes behave like the real packages where it matters (measured on ScienceWorld 1.2.3,
TextArena 0.7.4, ALFWorld 0.4.2 / TextWorld 1.7, and WebShop's source): ScienceWorld keeps the task
description out of the first observation, counts clock ticks against ``envStepLimit``, ends an
episode silently at a negative score, and lists objects and ambiguity options in an order that
changes between loads; TextArena reseeds and draws from the global ``random``, repeats the whole
history in its default wrapper, tells the player about a first invalid move, gives partial credit on
losses, and its Wordle needs an nltk download; ALFWorld's wrappers crash on ``tw-make`` games;
WebShop reseeds the global RNG in its constructor and answers an invalid action with the same page
and reward 0. ``tests/test_env_real_*.py`` run the same checks on the real packages when installed.
"""

from __future__ import annotations

import enum
import os
import pickle
import random
import subprocess
import sys
import types
import pytest

from leafe_fast.envs.adapters import ADAPTERS, ReplayDivergence
from leafe_fast.envs.base import Env, Task
from leafe_fast.envs.registry import available_envs, list_tasks, make_env


class _Game:
    """A seeded toy game: reach a hidden total by 'add k'. Observations carry draws from ``rng``
    (the game's own RNG, or the global ``random`` module as TextArena's games use), so only a replay
    with the same seed and actions reproduces them."""

    def __init__(self, seed: int, noisy: bool = False, rng=None):
        self.rng = rng if rng is not None else random.Random(seed)
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
CLOSED: list = []  # fake ScienceWorld backends that were closed
LOADS = {"n": 0}  # every load of the fake ScienceWorld lists things in another order


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _fake_scienceworld() -> dict:
    doors = ["door to kitchen", "door to bedroom", "door to garden"]

    class Server:
        """The simulator behind py4j: a _Game plus doors, waiting, a negative score and an
        ambiguity prompt; orders change with every load, as in the real jar."""

        def load(self, task_name, variation, simplification):
            self.seed = sum(map(ord, task_name)) * 100 + variation
            self.start = 8 if task_name == "melt" else 0  # a task that scores the start position

        def reset(self):
            LOADS["n"] += 1
            self.order = random.Random(LOADS["n"]).sample(range(3), 3)
            self.game, self.score, self.ticks, self.completed = _Game(self.seed, NOISY["on"]), self.start, 0, False
            self.prompt = None

        def step(self, action):
            if self.prompt is not None:
                options, self.prompt = self.prompt, None
                if action.isdigit() and int(action) < len(options):
                    self.score, self.completed = -100, True  # focusing on a door is the wrong focus
                    return f"You focus on the {options[int(action)]}."
            if action == "look around":
                return self.freeActionLook()
            if action == "wait":
                self.ticks += 10
                return "You decide to wait for 10 iterations."
            if action == "focus on door":
                self.prompt = [doors[i] for i in self.order]
                lines = "".join(f"{i}:\tfocus on {d}\n" for i, d in enumerate(self.prompt))
                return "Ambiguous request: Please enter the number for the action you intended:\n" + lines
            if not action.startswith("add"):
                return "No known action matches that input."
            obs, reward, done = self.game.act(action)
            self.ticks += 1
            self.score += 100 * reward
            self.completed = self.completed or done
            return obs

        def getScore(self):
            return self.score / 100

        def getCompleted(self):
            return self.completed

        def freeActionLook(self):
            return "This room is called the hallway. In it, you see: \n" + "".join(
                f"\tA {doors[i]}\n" for i in self.order)

        def freeActionInventory(self):
            return f"In your inventory, you see:\n\ta total of {self.game.total}\n"

        def freeActionTaskDesc(self):
            return "Task Description:\nYour task is to reach the hidden total."

    class ScienceWorldEnv:
        def __init__(self, server_path="", envStepLimit=100):
            self.server, self.envStepLimit = Server(), envStepLimit

        def get_task_names(self):
            return ["boil", "melt"]

        def load(self, task_name, variation, simplification=""):
            self.server.load(task_name, variation, simplification)

        def get_variations_train(self):
            return [0, 1, 2, 3]

        def get_variations_dev(self):
            return [4, 5]

        def get_variations_test(self):
            return [6, 7]

        def reset(self):
            self.server.reset()
            self.last = self.server.score
            obs, _, _, info = self.step("look around")
            return obs, info

        def step(self, action):  # the package's step: ticks against envStepLimit, stops at score < 0
            obs = self.server.step(action)
            score = round(100 * self.server.getScore())
            reward, self.last = score - self.last, score
            completed = self.server.getCompleted() or self.server.ticks > self.envStepLimit or score < 0
            info = {"score": score, "look": self.server.freeActionLook(), "inv": self.server.freeActionInventory(),
                    "taskDesc": self.server.freeActionTaskDesc()}
            return obs, reward, completed, info

        def close(self):
            CLOSED.append(self)

    return {"scienceworld": _module("scienceworld", ScienceWorldEnv=ScienceWorldEnv)}


def _fake_textarena() -> dict:
    class ObservationType(enum.Enum):
        PROMPT = 0
        PLAYER_ACTION = 1
        GAME_MESSAGE = 2
        GAME_ADMIN = 3

    class Wrapper:
        def __init__(self, env):
            self.env = env

        def __getattr__(self, name):
            return getattr(self.env, name)

    class HistoryWrapper(Wrapper):
        """Like TextArena's default LLMObservationWrapper: every observation is the whole history."""

        def __init__(self, env):
            super().__init__(env)
            self.seen = []

        def get_observation(self):
            pid, new = self.env.get_observation()
            self.seen += new
            return pid, "\n".join(f"[{s}] {m}" for s, m, _ in self.seen)

    class ActionFormattingWrapper(Wrapper):
        def step(self, action):
            return self.env.step(action if "[" in action else f"[{action}]")

    class Game:
        def reset(self, num_players, seed=None):
            assert num_players == 1
            random.seed(seed)  # as TextArena's State does: the *global* RNG
            self.game, self.errors, self.done = _Game(seed, NOISY["on"], rng=random), 0, False
            self.rewards, self.info = None, {0: {}}
            self.pending = [(-1, "Rules: answer [add k]. " + self.game.intro(), ObservationType.PROMPT)]

        def get_observation(self):
            out, self.pending = self.pending, []
            return 0, out

        def step(self, action):
            self.pending.append((0, action, ObservationType.PLAYER_ACTION))
            move = action.strip("[]")
            if not move.startswith("add"):
                if self.errors == 0:  # TextArena's error_allowance of 1
                    self.errors += 1
                    self.pending.append((-1, "You attempted an invalid move. Reason: not 'add k'.",
                                         ObservationType.GAME_ADMIN))
                    return False, {}
                self.rewards, self.info, self.done = {0: 0.0}, {0: {"reason": "Invalid Move", "invalid_move": True}}, True
                return True, {}
            self.errors = 0
            obs, reward, done = self.game.act(move)
            self.pending.append((-1, obs, ObservationType.GAME_MESSAGE))
            if done:  # partial credit on a loss, 1 for a win
                self.rewards = {0: 1.0 if reward else round(self.game.goal / self.game.total, 3)}
                self.info = {0: {"reason": "won" if reward else "overshot"}}
                self.done = True
            return done, {}

        def close(self):
            return self.rewards, self.info

    def make(env_id):
        if env_id == "Wordle-v0":
            raise LookupError("Resource 'words' not found. Please use the NLTK Downloader")
        return ActionFormattingWrapper(HistoryWrapper(Game()))

    wrappers = _module("textarena.wrappers", ActionFormattingWrapper=ActionFormattingWrapper)
    return {"textarena": _module("textarena", make=make, Wrapper=Wrapper, ObservationType=ObservationType,
                                 wrappers=wrappers)}


def _fake_webshop() -> dict:
    class WebAgentTextEnv:
        def __init__(self, observation_mode="html", **kwargs):
            assert observation_mode == "text"
            random.seed(233)  # as WebShop's SimServer does

        def reset(self, session=None):
            self.game = _Game(session, NOISY["on"])
            self.page = self.game.intro()
            return self.page, None

        def step(self, action):
            if not action.startswith("add"):
                return self.page, 0, False, None  # invalid: same page, reward 0
            self.page, reward, done = self.game.act(action)
            return self.page, reward, done, None

    envs = _module("web_agent_site.envs", WebAgentTextEnv=WebAgentTextEnv)
    return {"web_agent_site": _module("web_agent_site", envs=envs), "web_agent_site.envs": envs}


def _fake_alfworld() -> dict:
    registered: dict[str, tuple] = {}

    class AlfredDemangler:
        pass

    class Env:
        def __init__(self, game_file, wrappers):
            if game_file.endswith(".z8") and any(isinstance(w, AlfredDemangler) for w in wrappers):
                raise AttributeError("'JerichoEnv' object has no attribute '_entity_infos'")  # the real crash
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
        env_id = f"tw-{len(registered)}"
        registered[env_id] = (game_file, list(wrappers))
        return env_id

    gym = _module("textworld.gym", register_game=register_game, make=lambda env_id: Env(*registered[env_id]))
    alfred = _module("alfworld.agents.environment.alfred_tw_env", AlfredDemangler=AlfredDemangler, AlfredInfos=object)
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


def sw_task(name: str = "boil") -> Task:
    return Task(f"sw-{name}", "scienceworld", {"task_name": name, "variation": 0})


def test_registry_lists_every_environment_and_rejects_unknown_names():
    assert {"sokoban", "code", "alfworld", "scienceworld", "webshop", "textarena"} <= set(available_envs())
    with pytest.raises(KeyError, match="unknown environment 'nethack'"):
        make_env("nethack")


def test_custom_environments_can_be_registered_once(monkeypatch):
    from leafe_fast.envs import registry
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
    # in a fresh interpreter: the real-package test modules of this session import them at collection
    code = ("import sys, leafe_fast.envs.adapters, leafe_fast.envs.registry; print([m for m in "
            "['textarena', 'scienceworld', 'web_agent_site', 'textworld', 'alfworld'] if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


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
        assert isinstance(env, Env) and env.restore_mode == "replay-checked" and env.instructions()
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
        assert env.ground_reflection(results, mode="oracle") is None
        assert env.replay_stats["divergences"] == 0 and env.replay_stats["restores"] == len(snaps)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_no_adapter_touches_the_host_global_rng(name, fake):
    import numpy as np

    task_kwargs = fake(name)
    task = list_tasks(name, split="train", n=1, seed=0, **task_kwargs)[0]
    random.seed(5)
    np.random.seed(5)
    want_py, want_np = random.getstate(), np.random.get_state()[1].copy()
    env = make_env(name)
    env.reset(task)
    env.step("add 1")
    env.restore(env.snapshot())
    assert random.getstate() == want_py
    assert (np.random.get_state()[1] == want_np).all()


def test_interleaved_textarena_envs_do_not_share_the_global_rng(fake):
    """The fake's game draws from the global ``random`` while stepping, like TextArena's games:
    two envs in flight must each see what a lone env sees, and restore without divergence."""
    fake("textarena")
    task = list_tasks("textarena", n=1, seed=0)[0]
    moves = ["add 1"] * 3
    alone = make_env("textarena")
    alone.reset(task)
    want = [alone.step(m) for m in moves]
    a, b = make_env("textarena"), make_env("textarena")
    a.reset(task)
    b.reset(task)
    got = [(a.step(m), random.random(), b.step(m)) for m in moves]
    assert [g[0] for g in got] == want and [g[2] for g in got] == want
    b.restore(a.snapshot())


def test_textarena_success_is_a_win_not_partial_credit(fake):
    fake("textarena")
    task = list_tasks("textarena", n=1, seed=0)[0]
    env = make_env("textarena", max_steps=20)
    first = env.reset(task)
    goal = random.Random(task.spec["seed"]).randint(3, 9)  # what the game drew after its reseed
    results = [env.step("add 1") for _ in range(goal)]
    assert results[-1].success and results[-1].done and results[-1].reward == 1
    assert not any(r.done for r in results[:-1])
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("add 1")
    env.reset(task)
    over = env.step(f"add {goal + 1}")  # overshoot: the fake gives partial credit, as TextArena does
    assert over.done and not over.success and 0 < over.reward < 1 and "overshot" in over.feedback
    assert "Rules" in first


def test_textarena_observations_are_new_messages_and_invalid_moves_give_feedback(fake):
    fake("textarena")
    env = make_env("textarena", max_steps=20)
    env.reset(list_tasks("textarena", n=1, seed=0)[0])
    bad = env.step("look")
    assert not bad.done and "invalid move" in bad.feedback
    step = env.step("add 1")
    assert "Rules" not in step.observation and "invalid move" not in step.observation
    assert "[add 1]" not in step.observation  # the agent's own move is not echoed
    second_bad = env.step("look")
    assert not second_bad.done and second_bad.feedback  # the allowance resets after a valid move
    ended = env.step("look")
    assert ended.done and not ended.success and "Invalid" in ended.feedback


def test_textarena_default_game_is_offline(fake):
    fake("textarena")
    tasks = list_tasks("textarena", n=2, seed=0)
    assert {t.spec["env_id"] for t in tasks} == {"GuessTheNumber-v0"}
    env = make_env("textarena")
    with pytest.raises(LookupError, match="NLTK"):
        env.reset(Task("w", "textarena", {"env_id": "Wordle-v0", "seed": 0}))


def test_step_limit_counts_agent_actions(fake):
    fake("textarena")
    short = make_env("textarena", max_steps=3)
    short.reset(list_tasks("textarena", n=1, seed=0)[0])
    results = [short.step("add 0") for _ in range(3)]
    assert results[-1].done and not results[-1].success and "step limit (3)" in results[-1].feedback


def test_scienceworld_shows_the_task_and_counts_actions_not_ticks(fake):
    fake("scienceworld")
    env = make_env("scienceworld", max_steps=8)
    first = env.reset(sw_task())
    assert first.startswith("Task Description:") and "hallway" in first
    waits = [env.step("wait") for _ in range(8)]  # 10 clock ticks each
    assert not any(r.done for r in waits[:-1]) and waits[-1].done and "step limit (8)" in waits[-1].feedback
    env.reset(sw_task())
    bad = env.step("fly")
    assert not bad.done and "Invalid action" in bad.feedback


def test_scienceworld_negative_score_ends_with_feedback_and_reset_score_is_kept(fake):
    fake("scienceworld")
    env = make_env("scienceworld")
    env.reset(sw_task("melt"))
    assert env.score == 8
    prompt = env.step("focus on door")
    assert prompt.feedback and not prompt.done
    r = env.step("1")
    assert r.done and not r.success and r.info["score"] == -100 and r.reward == -108
    assert "score fell to -100" in r.feedback


def test_scienceworld_restore_survives_reordered_listings_and_re_resolves_choices(fake):
    fake("scienceworld")
    env = make_env("scienceworld")
    env.reset(sw_task())
    env.step("look around")
    prompt = env.step("focus on door")
    snap = env.snapshot()
    chosen = env.step("2")
    for _ in range(3):  # every load orders doors and options differently
        env.restore(snap)
        assert env.step("2").observation == chosen.observation
    env.restore(env.snapshot())  # a snapshot that contains the answered prompt replays too
    assert prompt.observation.startswith("Ambiguous request")
    assert env.replay_stats["divergences"] == 0


def test_restore_checks_every_step(fake):
    fake("scienceworld")
    env = make_env("scienceworld")
    env.reset(sw_task())
    NOISY["on"] = True  # from now on observations carry unseeded noise...
    env.step("add 1")
    NOISY["on"] = False
    env.step("look around")  # ...but the last observation is reproducible
    snap = env.snapshot()
    NOISY["on"] = True
    with pytest.raises(ReplayDivergence, match="step 1 of 2"):
        env.restore(snap)
    assert env.replay_stats["divergences"] == 1
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look around")


def test_unchecked_replay_says_it_is_inexact(fake):
    fake("scienceworld")
    env = make_env("scienceworld", verify_replay=False)
    assert env.restore_mode == "inexact"
    env.reset(sw_task())
    NOISY["on"] = True
    env.step("add 1")
    env.restore(env.snapshot())  # not checked


def test_scienceworld_closes_its_java_process(fake):
    fake("scienceworld")
    CLOSED.clear()
    with make_env("scienceworld") as env:
        env.reset(sw_task())
    assert len(CLOSED) == 1
    env.close()
    assert len(CLOSED) == 1
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(sw_task())
    other = make_env("scienceworld")
    del other
    import gc

    gc.collect()
    assert len(CLOSED) == 2


def test_alfworld_plays_tw_make_games_without_the_alfred_wrappers(fake, tmp_path):
    fake("alfworld")
    game = tmp_path / "tw" / "game.z8"
    game.parent.mkdir()
    game.write_text("z")
    env = make_env("alfworld")
    env.reset(Task("tw", "alfworld", {"game_file": str(game)}))
    assert env.step("add 1").observation.startswith("Total 1")
    bad = tmp_path / "game.ulx"
    bad.write_text("u")
    with pytest.raises(ValueError, match="unsupported format"):
        env.reset(Task("ulx", "alfworld", {"game_file": str(bad)}))
    with pytest.raises(FileNotFoundError):
        env.reset(Task("none", "alfworld", {"game_file": str(tmp_path / "missing.tw-pddl")}))


def test_webshop_flags_invalid_actions_and_keeps_the_global_rng(fake):
    fake("webshop")
    random.seed(7)
    want = random.getstate()
    env = make_env("webshop")
    assert random.getstate() == want
    env.reset(list_tasks("webshop", n=1, seed=0)[0])
    bad = env.step("click[nothing]")
    assert not bad.done and bad.reward == 0 and "Invalid action" in bad.feedback
    ok = env.step("add 1")
    assert ok.feedback == ""


def test_adapters_check_task_specs(fake):
    fake("webshop")
    env = make_env("webshop")
    with pytest.raises(ValueError, match="needs spec\\['session'\\]"):
        env.reset(Task("t", "webshop", {}))
    with pytest.raises(ValueError, match="is for env 'sokoban'"):
        env.reset(Task("t", "sokoban", {"session": 1}))
    with pytest.raises(ValueError, match="unknown split"):
        list_tasks("webshop", split="dev")
    env.reset(Task("t", "webshop", {"session": 1}))
    with pytest.raises(TypeError, match="not a replay snapshot"):
        env.restore({"not": "a snapshot"})


def test_exploration_branches_on_checked_replay_and_refuses_inexact_restores(fake, tmp_path):
    from explore_helpers import run_explore

    fake("scienceworld")
    tasks = [sw_task("boil"), sw_task("melt")]
    moves = ["add 1", "look around", "wait"]
    checked = run_explore(tmp_path / "a.jsonl", tasks, lambda: make_env("scienceworld"), concurrency=2, moves=moves)
    assert sum(t["branches"] for t in checked.values()) > 0

    def inexact():
        return make_env("scienceworld", verify_replay=False)

    refused = run_explore(tmp_path / "b.jsonl", tasks, inexact, concurrency=2, moves=moves)
    assert all(t["branches"] == 0 for t in refused.values())
    assert {t["stop_reason"] for t in refused.values()} <= {"inexact_restore", "success"}
    assert "inexact_restore" in {t["stop_reason"] for t in refused.values()}
    accepted = run_explore(tmp_path / "c.jsonl", tasks, inexact, concurrency=2, moves=moves,
                           accept_inexact_restores=True)
    assert sum(t["branches"] for t in accepted.values()) > 0


def test_scienceworld_normalise_ignores_listing_order_only():
    from leafe_fast.envs.scienceworld_env import normalise

    rng = random.Random(0)
    items = ["a cup (containing water, salt)", "a green bulb, which is off", "an orange wire, which is on", "the agent"]
    for _ in range(50):
        a, b = rng.sample(items, 4), rng.sample(items, 4)
        room = "This room is called the kitchen. In it, you see: \n" + "".join(f"\t{x}\n" for x in a)
        other = "This room is called the kitchen. In it, you see: \n" + "".join(f"\t{x}\n" for x in b)
        assert normalise(room) == normalise(other)
        inline = f"\ta table. On the table is: {', '.join(a)}."
        assert normalise(inline) == normalise(f"\ta table. On the table is: {', '.join(b)}.")
    assert normalise("\ta seed jar (containing a round pea seed, a wrinkly pea seed)") == normalise(
        "\ta seed jar (containing a wrinkly pea seed, a round pea seed)")
    # different states stay different: descriptions swapped between objects, or an object moved
    assert normalise("\tOn it: a bulb, which is off, a wire, which is on.") != normalise(
        "\tOn it: a bulb, which is on, a wire, which is off.")
    assert normalise("\ta cup (containing a jug, a bowl), a chair") != normalise("\ta cup (containing a jug), a bowl, a chair")
    assert normalise("You see:\n\ta cup\nYou also see:\n\ta door") != normalise("You see:\n\ta door\nYou also see:\n\ta cup")
    assert normalise("\ta jar (containing a seed (containing a bug), a nut)") != normalise(
        "\ta jar (containing a seed, a nut (containing a bug))")


def test_scienceworld_without_java_says_what_to_install(fake, monkeypatch):
    from leafe_fast.envs import scienceworld_env
    from leafe_fast.errors import UserError

    fake("scienceworld")
    monkeypatch.setattr(scienceworld_env.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Java 17"):
        make_env("scienceworld")
