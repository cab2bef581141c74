"""The TextArena adapter against the real package (``pip install leafe-fast[envs]``; skipped when it
is not installed). Everything here runs offline: the games used need no download."""

from __future__ import annotations

import pickle
import random

import pytest

pytest.importorskip("textarena")

from leafe_fast.envs.adapters import OFFLINE_GAMES, TextArenaEnv  # noqa: E402
from leafe_fast.envs.base import Task  # noqa: E402
from leafe_fast.envs.registry import list_tasks, make_env  # noqa: E402


def game(env_id: str = "GuessTheNumber-v0", seed: int = 0) -> Task:
    return Task(f"ta-{env_id}-{seed}", "textarena", {"env_id": env_id, "seed": seed})


def target_of(env: TextArenaEnv) -> int:
    return env._env.env.game_number  # the formatting wrapper's game


def test_default_game_is_offline_and_reset_shows_the_rules():
    tasks = list_tasks("textarena", split="train", n=2, seed=0)
    assert all(t.spec["env_id"] == "GuessTheNumber-v0" for t in tasks)
    env = make_env("textarena")
    first = env.reset(tasks[0])
    assert "Guess The Number" in first and "[5]" in first
    assert env.restore_mode == "replay-checked"


def test_observations_are_the_new_messages_only_not_the_whole_history():
    env = make_env("textarena", max_steps=20)
    first = env.reset(game(seed=4))
    target = target_of(env)
    guesses = [g for g in (1, 2, 3, 20, 19) if g != target][:4]
    results = [env.step(f"[{g}]") for g in guesses]
    for r in results:
        assert "Guess The Number" not in r.observation  # the prompt is not repeated
        assert r.observation.count("The target number is") == 1
    assert "Guess The Number" in first


def test_a_first_invalid_move_gives_feedback_and_a_second_ends_the_game():
    env = make_env("textarena")
    env.reset(game(seed=1))
    bad = env.step("no number here")
    assert not bad.done and "invalid move" in bad.feedback.lower() and bad.feedback in bad.observation
    env.reset(game(seed=1))
    env.step("[99]")
    second = env.step("[99]")
    assert second.done and not second.success and "invalid" in second.feedback.lower()


def test_a_won_game_is_a_success_and_a_lost_game_with_partial_credit_is_not():
    env = make_env("textarena", max_steps=30)
    env.reset(game(seed=2))
    lo, hi = 1, 20
    while True:  # binary search on the hints
        mid = (lo + hi) // 2
        r = env.step(f"[{mid}]")
        if r.done:
            break
        lo, hi = (mid + 1, hi) if "higher" in r.observation else (lo, mid - 1)
    assert r.success and r.reward == 1.0 and r.feedback == ""

    env.reset(game(seed=3))
    target = target_of(env)
    wrong = [f"[{g}]" for g in range(1, 21) if g != target]
    last = _play(env, wrong)[-1]  # wrong guesses until the game's turn limit
    assert last.done and not last.success
    assert 0.0 < last.reward < 1.0  # TextArena's partial credit: a loss, not a success
    assert "turn limit" in last.feedback.lower()


def test_the_host_global_random_state_is_untouched():
    random.seed(1234)
    before = random.getstate()
    env = make_env("textarena")
    env.reset(game("2048-v0", seed=5))
    for move in ["[w]", "[a]", "[s]", "[d]"]:
        env.step(move)
    env.restore(env.snapshot())
    assert random.getstate() == before


def _play(env: TextArenaEnv, moves: list[str]) -> list:
    out = []
    for m in moves:
        r = env.step(m)
        out.append(r)
        if r.done:
            break
    return out


@pytest.mark.parametrize("depth", [10, 30, 50])
def test_restore_after_n_steps_is_exact(depth):
    moves = ["[w]", "[a]", "[s]", "[d]"] * (depth // 4 + 3)  # tiles spawn at random after each move
    env = make_env("textarena", max_steps=200)
    env.reset(game("2048-v0", seed=7))
    head = _play(env, moves[:depth])
    moves = moves[:depth + 8]
    assert len(head) == depth and not head[-1].done
    snap = pickle.loads(pickle.dumps(env.snapshot()))
    tail = _play(env, moves[depth:])
    for target in (env, make_env("textarena", max_steps=200)):
        target.restore(snap)
        assert _play(target, moves[depth:]) == tail
    assert env.replay_stats["divergences"] == 0


def test_interleaved_envs_draw_from_their_own_rng():
    """2048 spawns tiles from the global ``random`` while stepping: two envs stepped in turn must each
    see what a lone env sees (before the fix they shared, and replay diverged)."""
    moves = ["[w]", "[a]", "[s]", "[d]"] * 4
    alone = make_env("textarena", max_steps=100)
    alone.reset(game("2048-v0", seed=11))
    want = _play(alone, moves)
    a, b = make_env("textarena", max_steps=100), make_env("textarena", max_steps=100)
    a.reset(game("2048-v0", seed=11))
    b.reset(game("2048-v0", seed=11))
    got_a, got_b = [], []
    for m in moves:
        got_a.append(a.step(m))
        random.random()  # the host drawing in between changes nothing either
        got_b.append(b.step(m))
    assert got_a == want and got_b == want
    snap = a.snapshot()
    b.restore(snap)  # checked replay: raises if any step differs


@pytest.mark.parametrize("env_id", OFFLINE_GAMES)
def test_every_listed_offline_game_resets_steps_and_restores(env_id):
    env = make_env("textarena", max_steps=10)
    first = env.reset(game(env_id, seed=3))
    assert first.strip()
    r = env.step("[1]")
    assert isinstance(r.observation, str)
    if not r.done:
        env.step("[2]")
    env.restore(env.snapshot())


def test_exploration_with_concurrency_2_matches_concurrency_1(tmp_path):
    from explore_helpers import run_explore

    tasks = [game(seed=s) for s in (20, 21, 22)]
    one = run_explore(tmp_path / "c1.jsonl", tasks, "textarena", concurrency=1, moves=["[7]", "[12]", "[3]", "[15]"])
    two = run_explore(tmp_path / "c2.jsonl", tasks, "textarena", concurrency=2, moves=["[7]", "[12]", "[3]", "[15]"])
    assert one == two
    assert all(tree["stop_reason"] != "env_error" for tree in two.values())
    assert sum(tree["branches"] for tree in two.values()) > 0
