"""Random policies, reflections and budgets against plain references.

The reference for the env side is a replay: every node's observation must equal what a fresh env
shows after reset and the node's root-path actions (so each rollback restored the right state).
The reference for the token side is ``Tree.path_token_ids``: every request must be the path of the
node it extends, plus the experience and header (actions) or plus the reflection exchange.
"""

from __future__ import annotations

import json
import random

import pytest
from test_explore_fakes import FakeChat, LineEnv, dec, enc, is_reflection, line_task

from leafe_fast.data.schema import read_trees
from leafe_fast.engines.scripted import ScriptedEngine
from leafe_fast.explore import ExploreConfig, explore

ACTIONS = ["left", "right", "stay", "jump", "right right"]


def random_policy(rng: random.Random):
    def respond(request):
        if is_reflection(dec(request.input_ids)):
            roll = rng.random()
            if roll < 0.2:
                return rng.choice(
                    ["", "no idea", '{"rollback_step": 1}', "[2]", '{"rollback_step": 1.5, "experience": "a"}']
                )
            step = rng.randint(-1, 9)
            return json.dumps({"rollback_step": step, "experience": rng.choice(["go left", "go right", "wait"])})
        return rng.choice(ACTIONS) + " " * rng.randint(0, 30)

    return respond


@pytest.mark.parametrize("seed", range(12))
def test_random_exploration_matches_replay_and_token_references(tmp_path, seed):
    rng = random.Random(seed)
    cfg = ExploreConfig(
        reflector=rng.choice(["llm", "grounded"]),
        reflect_every=rng.choice([0, 1, 2, 3]),
        reflect_retries=rng.randint(0, 2),
        invalid_step=rng.choice(["clamp", "retry"]),
        max_branches=rng.randint(0, 5),
        max_steps=rng.randint(1, 30),
        max_tokens=rng.randint(20, 600),
        max_depth=rng.randint(1, 8),
        max_new_tokens=rng.randint(1, 40),
        reflect_max_new_tokens=rng.randint(5, 80),
        stop_on_success=rng.random() < 0.7,
        concurrency=rng.randint(1, 4),
        progress=False,
    )
    tasks = [
        line_task(i, goal=rng.randint(-3, 3) or 4, pit=rng.choice([-2, 2, 5]),
                  ground=[rng.randint(-1, 6), "walk the other way"] if rng.random() < 0.8 else None)
        for i in range(rng.randint(1, 5))
    ]
    engine = ScriptedEngine(random_policy(rng), encode=enc, decode=dec)
    out = tmp_path / "trees.jsonl"
    summary = explore(tasks, LineEnv, engine, FakeChat(), out, cfg)
    trees = read_trees(out)
    assert sorted(t.task_id for t in trees) == sorted(t.task_id for t in tasks)
    header = FakeChat.header_ids
    for tree in trees:
        task = next(t for t in tasks if t.task_id == tree.task_id)
        s = tree.stats
        # budgets
        assert len(tree.nodes) == s["steps"] <= cfg.max_steps
        assert s["branches"] <= cfg.max_branches
        assert s["generated_tokens"] <= cfg.max_tokens
        assert all(n.step < cfg.max_depth for n in tree.nodes)
        assert sum(1 for n in tree.nodes if n.experience_ids) == s["branches"]
        # env: each node equals a replay of its root path from reset
        for node in tree.nodes:
            env = LineEnv()
            env.reset(task)
            for p in tree.path(node.id):
                result = env.step(p.action)
            assert (result.observation, result.done, result.success) == (node.observation, node.done, node.success)
        # tokens: each request extends the path of the node it continues
        reqs = [r for r in engine.requests if r.request_id.split("#")[0] == tree.task_id]
        actions = [r for r in reqs if not is_reflection(dec(r.input_ids))]
        assert len(actions) == len(tree.nodes)
        for req, node in zip(actions, tree.nodes):
            prefix = tree.path_token_ids(node.parent) if node.parent >= 0 else tree.prompt_ids
            assert req.input_ids == prefix + (node.experience_ids or []) + header
        reflection_reqs = [r for r in reqs if is_reflection(dec(r.input_ids))]
        assert len(reflection_reqs) == sum(rec["attempts"] for rec in tree.meta["reflections"])
        for rec in tree.meta["reflections"]:
            assert rec["rollback_step"] is None or 0 <= rec["rollback_step"] < rec["n_steps"]
        if cfg.reflector == "grounded":
            assert not reflection_reqs
        else:
            for rec in tree.meta["reflections"]:
                path = tree.path_token_ids(rec["at_node"])
                assert any(r.input_ids[: len(path)] == path for r in reflection_reqs)
    assert summary.finished == len(tasks)
    assert summary.generated_tokens == sum(r.output_tokens for r in engine.results)
