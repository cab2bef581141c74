"""The ALFWorld adapter against the real package (``pip install alfworld``; a five-minute build, so CI
does not install it and these tests skip). The game is our own: ``tests/data/alfworld/`` holds a
small ALFRED-style game written for ALFWorld's shipped PDDL domain (``make_game.py`` regenerates it);
ALFWorld's own game data is a download and is not needed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("alfworld.agents.environment.alfred_tw_env")

from leafe_fast.envs.adapters import ALFWorldEnv  # noqa: E402
from leafe_fast.envs.base import Task  # noqa: E402

GAME = Path(__file__).parent / "data" / "alfworld" / "put_apple_in_fridge" / "game.tw-pddl"
WALKTHROUGH = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1", "open fridge 1",
               "move apple 1 to fridge 1"]
TASK = Task("alfworld-test-put-apple", "alfworld", {"game_file": str(GAME)})


@pytest.fixture(scope="module")
def env():
    with ALFWorldEnv(max_steps=80) as e:
        yield e


def test_reset_shows_the_goal_and_the_walkthrough_wins(env):
    first = env.reset(TASK)
    assert "Your task is to: put an apple in fridge." in first and "countertop 1" in first
    results = [env.step(a) for a in WALKTHROUGH]
    assert results[-1].success and results[-1].done and results[-1].reward == 1.0
    assert not any(r.done for r in results[:-1])


def test_invalid_command_gives_feedback_and_the_step_limit_ends_a_failure(env):
    env.reset(TASK)
    bad = env.step("fly to the moon")
    assert not bad.done and "had no effect" in bad.feedback
    assert "go to fridge 1" in bad.info["admissible_commands"]
    env.max_steps = 3
    try:
        env.reset(TASK)
        last = [env.step("look") for _ in range(3)][-1]
        assert last.done and not last.success and "step limit (3)" in last.feedback
    finally:
        env.max_steps = 80


@pytest.mark.parametrize("depth", [10, 30, 50])
def test_restore_after_n_steps_is_exact(env, depth):
    walk = ["go to countertop 1", "take bread 1 from countertop 1", "go to microwave 1", "open microwave 1",
            "move bread 1 to microwave 1", "close microwave 1", "go to fridge 1", "look", "inventory",
            "go to microwave 1", "open microwave 1", "take bread 1 from microwave 1", "go to countertop 1",
            "move bread 1 to countertop 1", "examine countertop 1"]
    actions = (walk * 5)[: depth + 6]
    env.reset(TASK)
    head = [env.step(a) for a in actions[:depth]]
    assert not any(r.done for r in head)
    snap = pickle.loads(pickle.dumps(env.snapshot()))
    tail = [env.step(a) for a in actions[depth:]]
    env.restore(snap)
    assert [env.step(a) for a in actions[depth:]] == tail


def test_tw_make_games_are_played_without_the_alfred_wrappers(env, tmp_path):
    tw_make = Path(sys.executable).parent / "tw-make"
    if not tw_make.exists():
        pytest.skip("tw-make (TextWorld) is not installed")
    game = tmp_path / "tiny.z8"
    subprocess.run([str(tw_make), "custom", "--world-size", "1", "--nb-objects", "2", "--quest-length", "1",
                    "--seed", "3", "--output", str(game), "-f", "--silent"], check=True, timeout=300,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    first = env.reset(Task("tw", "alfworld", {"game_file": str(game)}))
    assert first.strip()
    r = env.step("look")
    assert not r.done and r.info["admissible_commands"]
    env.restore(env.snapshot())
