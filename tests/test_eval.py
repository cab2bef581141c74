"""pass@k against brute-force enumeration; evaluate() with a scripted policy on Sokoban."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from leafe_fast.eval import evaluate, pass_at_k, pass_at_k_reference


def _brute_force(n: int, c: int, k: int) -> float:
    """Average over every k-subset of n episodes (c of them successes) of 'any success'."""
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_vectorized_and_edges():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 40, size=200)
    c = rng.integers(0, n + 1)
    k = rng.integers(1, n + 1)
    got = pass_at_k(n, c, k)
    assert isinstance(got, np.ndarray) and got.shape == (200,)
    want = [pass_at_k_reference(int(a), int(b), int(d)) for a, b, d in zip(n, c, k)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert pass_at_k(10, 0, 3) == 0.0  # no success: never
    assert pass_at_k(10, 10, 1) == 1.0  # all successes
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw has a success
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the success rate
    np.testing.assert_allclose(pass_at_k(np.array([[4, 4], [6, 6]]), np.array([1, 2]), 2).shape, (2, 2))
    for bad in [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3.5, 1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError, match="k=4 > n=3"):
        pass_at_k(3, 1, 4)


def test_pass_at_k_large_n_is_stable():
    # binomials of n = 5000 overflow floats; the product form does not need them
    n, c, k = 5000, 3, 100
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10**6, 1, 1) == pytest.approx(1e-6, rel=1e-12)  # no cancellation near 0


def test_evaluate_with_scripted_policy_on_sokoban():
    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.engines.scripted import ScriptedEngine
    from leafe_fast.envs.sokoban import SokobanEnv, sokoban_tasks
    from leafe_fast.tiny import tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    chat = ChatFormat.from_tokenizer(tok)
    tasks = sokoban_tasks("test", n=3, max_steps=8)
    solutions = {t.task_id: t.spec["solution"] for t in tasks}
    good = {tasks[0].task_id: 2, tasks[1].task_id: 0, tasks[2].task_id: 4}  # solving episodes per task

    def respond(req):
        task_id, episode, turn = req.request_id.split("/")
        if int(episode) < good[task_id]:
            return f"I will move {solutions[task_id][int(turn)]}."
        return "I wait."  # invalid: the board never changes, the episode runs out of steps

    engine = ScriptedEngine(respond, encode=lambda s: tok.encode(s, add_special_tokens=False))
    out = evaluate(engine, chat, SokobanEnv(), tasks, n=4, ks=(1, 2, 4), progress=False)

    per_task = {r["task_id"]: r for r in out["tasks"]}
    assert {t: r["successes"] for t, r in per_task.items()} == good
    assert per_task[tasks[1].task_id]["steps"] == [8] * 4  # failures run to the step limit
    assert per_task[tasks[0].task_id]["steps"][:2] == [len(solutions[tasks[0].task_id])] * 2
    c = np.array([2, 0, 4])
    for k in (1, 2, 4):
        assert out["pass@k"][k] == pytest.approx(np.mean([pass_at_k_reference(4, ci, k) for ci in c]))
    assert out["success_rate"] == pytest.approx(6 / 12)
    # episodes step in lockstep: one engine batch per turn, all unfinished episodes in it
    assert len(engine.batches[0]) == 12 and len(engine.batches) == 8
    # a branch prompt is the episode's own history: every prompt of turn t+1 extends one of turn t
    first = {r.request_id.rsplit("/", 1)[0]: r.input_ids for r in engine.batches[0]}
    for r in engine.batches[1]:
        assert r.input_ids[: len(first[r.request_id.rsplit("/", 1)[0]])] == first[r.request_id.rsplit("/", 1)[0]]
    assert out["tokens"]["output"] > 0 and out["tokens"]["prompt"] > 0
    with pytest.raises(ValueError, match="every k"):
        evaluate(engine, chat, SokobanEnv(), tasks, n=2, ks=(3,), progress=False)
    with pytest.raises(ValueError, match="task ids must be unique.*repeated"):
        evaluate(engine, chat, SokobanEnv(), [tasks[0], tasks[0]], n=2, progress=False)


def test_evaluate_ends_episodes_that_outgrow_the_context():
    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.engines.scripted import ScriptedEngine
    from leafe_fast.envs.sokoban import SokobanEnv, sokoban_tasks
    from leafe_fast.tiny import tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    chat = ChatFormat.from_tokenizer(tok)
    tasks = sokoban_tasks("test", n=1, max_steps=20)
    engine = ScriptedEngine(lambda req: "I wait.", encode=lambda s: tok.encode(s, add_special_tokens=False))
    env = SokobanEnv()
    prompt_len = len(chat.prompt_ids([{"role": "system", "content": env.instructions()},
                                      {"role": "user", "content": env.reset(tasks[0])}]))
    limit = prompt_len + 200  # room for a few turns only
    out = evaluate(engine, chat, env, tasks, n=2, sampling=None, max_context_tokens=limit, progress=False)
    assert out["cut_episodes"] == 2 and out["success_rate"] == 0.0
    steps = out["tasks"][0]["steps"]
    assert 0 < steps[0] < 20 and steps[0] == steps[1]
    assert all(len(r.input_ids) + 64 <= limit for r in engine.requests)  # every prompt left room to answer
    capped = evaluate(engine, chat, env, tasks, n=1, max_turns=3, progress=False)
    assert capped["cut_episodes"] == 1 and capped["tasks"][0]["steps"] == [3]
