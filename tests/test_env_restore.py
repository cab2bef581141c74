"""Restore exactness for every built-in environment: restore(snapshot()) + the same actions gives
the same step results (observation, reward, done, success, feedback, info), in the same env or a
fresh one, after a pickle round trip, and as often as wanted from one snapshot."""

from __future__ import annotations

import pickle
import random

import pytest

from leafe_fast.envs.registry import list_tasks, make_env

SOKOBAN_ACTIONS = ["up", "down", "left", "right", "Move left.", "<action>UP</action>", "jump", "r"]
CODE_ACTIONS = [
    "print(1)",
    "import sys\nprint(sys.stdin.read())",
    "def broken(:\n    pass",
    "print(1 / 0)",
    "n = input()\nprint(n)",
]


CASES = [
    pytest.param(
        "sokoban", {"max_steps": 30}, {"height": 7, "width": 7, "num_boxes": 2, "max_pushes": None},
        SOKOBAN_ACTIONS, 40, 3, id="sokoban",
    ),
    pytest.param(
        "code", {}, {}, CODE_ACTIONS, 4, 1, id="code",
    ),
]


def _run(env, actions):
    results = []
    for action in actions:
        results.append(env.step(action))
        if results[-1].done:
            break
    return results


@pytest.mark.parametrize("name, env_kwargs, task_kwargs, vocabulary, length, n_tasks", CASES)
def test_restore_then_same_actions_gives_same_results(name, env_kwargs, task_kwargs, vocabulary, length, n_tasks):
    rng = random.Random(7)
    tasks = list_tasks(name, split="train", n=n_tasks, seed=1, **task_kwargs)
    assert len(tasks) == n_tasks
    for task in tasks:
        actions = [rng.choice(vocabulary) for _ in range(length)]
        env = make_env(name, **env_kwargs)
        env.reset(task)
        points = sorted(rng.sample(range(length), 3))
        snaps, results = {}, []
        for i, action in enumerate(actions):
            if i in points:
                snaps[i] = env.snapshot()
            results.append(env.step(action))
            if results[-1].done:
                break
        assert snaps, "no snapshot was taken before the episode ended"
        fresh = make_env(name, **env_kwargs)
        fresh.reset(task)
        for i, snap in snaps.items():
            expected = results[i:]
            tail = actions[i:len(results)]
            env.restore(snap)
            assert _run(env, tail) == expected
            env.restore(snap)  # the snapshot is not consumed or aliased by the first restore
            assert _run(env, tail) == expected
            fresh.restore(pickle.loads(pickle.dumps(snap)))
            assert _run(fresh, tail) == expected


def test_sokoban_snapshot_is_cheap_and_immutable():
    tasks = list_tasks("sokoban", split="test", n=1, seed=0)
    env = make_env("sokoban")
    env.reset(tasks[0])
    snap = env.snapshot()
    env.step("left")
    env.step("up")
    assert env.snapshot() is not snap and snap.steps == 0
    with pytest.raises(AttributeError):
        snap.steps = 5  # frozen
