"""The ScienceWorld adapter against the real package (``pip install leafe-fast[envs]``; it needs a Java
runtime; skipped when the package is not installed). One JVM serves the module (it takes seconds
to start); the exploration test starts two more (one per task in flight)."""

from __future__ import annotations

import pickle
import random

import pytest

pytest.importorskip("scienceworld")

from leafe_fast.envs.adapters import ScienceWorldEnv  # noqa: E402
from leafe_fast.envs.base import Task  # noqa: E402


def task(name: str, variation: int = 0) -> Task:
    return Task(f"sw-{name}-{variation}", "scienceworld", {"task_name": name, "variation": variation})


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv(max_steps=60) as e:
        yield e


@pytest.fixture
def sw(env):
    env.max_steps = 60
    return env


# ScienceWorld 1.2.3's gold path for find-non-living-thing, variation 0 (get_gold_action_sequence)
GOLD = ["open door to kitchen", "go to kitchen", "look around", "focus on painting", "move painting to red box"]
# A walk that ends nothing: rooms, doors, looking and the inventory (the "boil" start is the hallway).
WALK = ["go to kitchen", "look around", "inventory", "go to hallway", "go to bedroom", "look around",
        "go to hallway", "go to art studio", "look around", "go to hallway"]


def play(env: ScienceWorldEnv, actions: list[str]) -> list:
    return [env.step(a) for a in actions]


def test_reset_shows_the_task_and_the_room(sw):
    first = sw.reset(task("boil"))
    assert first.startswith("Task Description:") and "boil water" in first
    assert "This room is called the hallway" in first
    assert sw.restore_mode == "replay-checked"


def test_valid_and_invalid_steps(sw):
    sw.reset(task("boil"))
    ok = sw.step("go to kitchen")
    assert ok.observation.startswith("You move to the kitchen") and not ok.done and ok.feedback == ""
    bad = sw.step("fly to the moon")
    assert not bad.done and bad.reward == 0 and "Invalid action" in bad.feedback


def test_the_step_limit_counts_actions_not_clock_ticks(sw):
    sw.max_steps = 8
    sw.reset(task("boil"))
    waits = play(sw, ["wait"] * 8)  # each `wait` is 10 ticks of the simulator's clock
    assert not any(r.done for r in waits[:-1])
    assert waits[-1].done and not waits[-1].success and "step limit (8)" in waits[-1].feedback


def test_a_negative_score_ends_the_episode_with_feedback_and_the_reset_score_counts(sw):
    sw.reset(task("find-living-thing"))
    start = sw.score
    assert start > 0  # this task scores the start position
    r = sw.step("focus on air")
    assert r.done and not r.success and r.info["score"] < 0
    assert r.reward == r.info["score"] - start and "score fell" in r.feedback


def test_the_gold_path_succeeds(sw):
    sw.reset(task("find-non-living-thing"))
    results = play(sw, GOLD)
    assert results[-1].success and results[-1].done and results[-1].info["score"] == 100
    assert not any(r.done for r in results[:-1])


@pytest.mark.parametrize("depth", [10, 30, 50])
def test_restore_after_n_steps_is_exact(sw, depth):
    actions = (WALK * 6)[: depth + 5]
    sw.reset(task("boil"))
    play(sw, actions[:depth])
    snap = pickle.loads(pickle.dumps(sw.snapshot()))
    tail = play(sw, actions[depth:])
    after = sw.snapshot()
    sw.restore(snap)
    assert sw.snapshot() == snap
    assert play(sw, actions[depth:]) == tail
    assert sw.snapshot() == after  # same records and per-step hashes


def test_ambiguity_answers_refer_to_the_prompt_the_agent_saw(sw):
    sw.reset(task("boil"))
    prompt = sw.step("focus on door")
    assert prompt.observation.startswith("Ambiguous request") and prompt.feedback
    snap = sw.snapshot()
    chosen = sw.step("2")
    for _ in range(3):  # each load may number the doors differently
        sw.restore(snap)
        assert sw.step("2").observation == chosen.observation


def test_restore_checks_every_step_not_only_the_last(sw):
    sw.reset(task("boil"))
    play(sw, WALK[:4])
    snap = sw.snapshot()
    # a snapshot whose middle step was recorded differently: the last observation still matches
    hashes = list(snap.hashes)
    hashes[2] = "0" * len(hashes[2])
    from dataclasses import replace

    from leafe_fast.envs.adapters import ReplayDivergence

    before = sw.replay_stats["divergences"]
    with pytest.raises(ReplayDivergence, match="step 2 of 4"):
        sw.restore(replace(snap, hashes=tuple(hashes)))
    assert sw.replay_stats["divergences"] == before + 1
    with pytest.raises(RuntimeError, match="reset"):
        sw.step("look around")  # unusable until reset/restore
    sw.restore(snap)
    sw.step("look around")


def test_the_host_global_random_state_is_untouched(sw):
    random.seed(99)
    before = random.getstate()
    sw.reset(task("boil"))
    sw.step("look around")
    sw.restore(sw.snapshot())
    assert random.getstate() == before


def test_exploration_with_concurrency_2(tmp_path):
    from explore_helpers import run_explore

    tasks = [task("boil"), task("find-non-living-thing")]
    moves = ["look around", "go to kitchen", "go to hallway", "inventory", "open door to greenhouse"]
    built = []

    def new_env():
        built.append(ScienceWorldEnv(max_steps=60))
        return built[-1]

    trees = run_explore(tmp_path / "sw.jsonl", tasks, new_env, concurrency=2, moves=moves,
                        max_steps=10, max_branches=1)
    assert len(built) == 2
    # the loop closed its envs: their Java processes are gone, and a closed env says so
    assert all(e._java is not None and e._java.poll() is not None for e in built)
    with pytest.raises(RuntimeError, match="closed"):
        built[0].reset(task("boil"))
    built[0].close()  # twice is fine
    assert sorted(trees) == sorted(t.task_id for t in tasks)
    for tree in trees.values():
        assert tree["stop_reason"] != "env_error", tree["error"]
        assert tree["nodes"][0][2]  # observations recorded
    assert sum(tree["branches"] for tree in trees.values()) >= 1
