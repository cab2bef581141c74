"""The trajectory builder reproduces the documented layout token for token (plain reference below),
and exploration, evaluation and training samples all produce the same tokens for the same steps."""

from __future__ import annotations

import random

import numpy as np
import pytest

from leafe_fast.data.chat import ChatFormat
from leafe_fast.data.schema import Node
from leafe_fast.envs.base import StepResult
from leafe_fast.tiny import tiny_tokenizer
from leafe_fast.trajectory import (
    Trajectory,
    experience_ids,
    observation_ids,
    observation_message,
    open_trajectory,
    opening_messages,
)


def _reference(prompt, header, nodes, supervise, with_experience):
    """The layout as the schema docstring writes it, by plain concatenation."""
    ids, mask = list(prompt), [False] * len(prompt)
    for n, sup in zip(nodes, supervise):
        if with_experience and n.experience_ids:
            ids += n.experience_ids
            mask += [False] * len(n.experience_ids)
        ids += header + n.action_ids + n.observation_ids
        mask += [False] * len(header) + [sup] * len(n.action_ids) + [False] * len(n.observation_ids)
    return ids, mask


def _random_path(rng):
    nodes = []
    for i in range(rng.randint(0, 6)):
        exp = [rng.randint(500, 599) for _ in range(rng.randint(1, 3))] if rng.random() < 0.3 else None
        nodes.append(Node(i, i - 1, i, [rng.randint(300, 399) for _ in range(rng.randint(0, 4))],
                          [rng.randint(400, 499) for _ in range(rng.randint(0, 3))], experience_ids=exp))
    return nodes


@pytest.mark.parametrize("seed", range(40))
def test_from_nodes_matches_the_plain_layout(seed):
    rng = random.Random(seed)
    prompt = [rng.randint(100, 199) for _ in range(rng.randint(1, 5))]
    header = [rng.randint(200, 299) for _ in range(rng.randint(0, 2))]
    nodes = _random_path(rng)
    sup = [rng.random() < 0.5 for _ in nodes]
    for with_exp in (True, False):
        traj = Trajectory.from_nodes(prompt, header, nodes, supervise=sup, with_experience=with_exp)
        ids, mask = _reference(prompt, header, nodes, sup, with_exp)
        assert traj.ids == ids and traj.mask == mask
        got_ids, got_mask = traj.arrays(trim=False)
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
        trimmed_ids, trimmed_mask = traj.arrays()
        end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
        assert trimmed_ids.tolist() == ids[:end] and trimmed_mask.tolist() == mask[:end]


def test_rollback_restores_the_prefix_exactly():
    rng = random.Random(3)
    nodes = _random_path(random.Random(5)) or [Node(0, -1, 0, [1], [2])]
    traj = Trajectory.from_nodes([9, 9], [7], nodes)
    for k in range(len(nodes), -1, -1):
        traj.rollback(k)
        ref, _ = _reference([9, 9], [7], nodes[:k], [False] * k, True)
        assert traj.ids == ref and traj.n_steps == k
    with pytest.raises(ValueError):
        traj.rollback(rng.randint(1, 5))


def test_first_token_target_is_refused():
    traj = Trajectory([], [])
    traj.add_step_ids([5], [6], target=True)
    with pytest.raises(ValueError, match="first token"):
        traj.arrays()


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_open_and_add_step_equal_the_chat_deltas(style):
    """What exploration/eval/demo call equals today's inline ChatFormat calls (and the whole template)."""
    tok = tiny_tokenizer(style)
    chat = ChatFormat.from_tokenizer(tok)
    traj = open_trajectory(chat, "Rules here.", "Board 1")
    want = list(chat.prompt_ids([{"role": "system", "content": "Rules here."},
                                 {"role": "user", "content": "Board 1"}]))
    assert traj.ids == want
    steps = [StepResult("Board 2", 0.0, False, False, "bumped a wall"), StepResult("Board 3", 1.0, True, True)]
    for i, step in enumerate(steps):
        action = chat.encode_action(f"Move {'up' if i else 'left'}.")
        exp = experience_ids(chat, "avoid walls") if i == 1 else None
        assert traj.generation_prompt(exp) == want + (exp or []) + chat.header_ids
        obs = traj.add_step(action, step, experience_ids=exp)
        assert obs == chat.observation_ids(action, observation_message(step))
        assert obs == observation_ids(chat, action, step)
        want += (exp or []) + chat.header_ids + action + obs
        assert traj.ids == want
    # the whole conversation, rendered by the template at once, is the same token sequence
    msgs = opening_messages("Rules here.", "Board 1") + [
        {"role": "assistant", "content": "Move left."},
        {"role": "user", "content": observation_message(steps[0])},
        {"role": "user", "content": "Experience from an earlier attempt that went wrong from this point on: "
                                    "avoid walls\nUse it for your next action."},
        {"role": "assistant", "content": "Move up."},
        {"role": "user", "content": observation_message(steps[1])},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True)
    assert traj.ids == list(out["input_ids"] if hasattr(out, "keys") else out)


def test_training_arrays_are_int32_and_bool():
    traj = Trajectory([1, 2], [3])
    traj.add_step_ids([4, 5], [6], target=True)
    ids, mask = traj.arrays()
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == [1, 2, 3, 4, 5] and mask.tolist() == [False, False, False, True, True]


def test_demo_walks_keep_todays_tokens():
    """The demo's warm-up walks, written with the builder, equal the inline layout they replaced."""
    from leafe_fast.demo import DIRECTIONS, random_walk_samples
    from leafe_fast.envs.registry import list_tasks, make_env

    chat = ChatFormat.from_tokenizer(tiny_tokenizer("qwen2"))
    env = make_env("sokoban")
    tasks = list_tasks("sokoban", "val", 2, seed=0, max_steps=5)
    got = random_walk_samples(env, chat, tasks, walks_per_task=2, steps=6, seed=1)
    rng = random.Random(1)
    want = []
    for task in tasks:
        for _ in range(2):
            first = env.reset(task)
            ids = list(chat.prompt_ids(opening_messages(env.instructions(), first)))
            mask = [False] * len(ids)
            for _ in range(6):
                action = chat.encode_action(f"Move {rng.choice(DIRECTIONS)}.")
                step = env.step(chat.decode_action(action))
                ids += chat.header_ids + action
                mask += [False] * len(chat.header_ids) + [True] * len(action)
                if step.done:
                    break
                obs = chat.observation_ids(action, observation_message(step))
                ids += obs
                mask += [False] * len(obs)
            want.append((ids, mask))
    assert [(s.input_ids.tolist(), s.target_mask.tolist()) for s in got] == want


def test_evaluation_prompts_equal_the_explored_trajectories(tmp_path):
    """Same env, same actions: every eval request is the explored tree's path prefix + header."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_explore_fakes import FakeChat, LineEnv, dec, enc, line_task

    from leafe_fast.data.schema import read_trees
    from leafe_fast.engines.scripted import ScriptedEngine
    from leafe_fast.eval import evaluate
    from leafe_fast.explore import ExploreConfig, explore

    policy = lambda req: ["right", "left", "right", "right"][dec(req.input_ids).count("<300>assistant") - 1]  # noqa: E731
    task = line_task(goal=2)
    explore([task], LineEnv, ScriptedEngine(policy, encode=enc, decode=dec), FakeChat(), tmp_path / "t.jsonl",
            ExploreConfig(mode="independent", rollouts=1, progress=False))
    (tree,) = read_trees(tmp_path / "t.jsonl")
    engine = ScriptedEngine(policy, encode=enc, decode=dec)
    evaluate(engine, FakeChat(), LineEnv(), [task], n=1, progress=False)
    assert len(engine.requests) == len(tree.nodes) == 4
    for req, node in zip(engine.requests, tree.nodes):
        prefix = tree.path_token_ids(node.parent) if node.parent >= 0 else tree.prompt_ids
        assert req.input_ids == prefix + tree.header_ids
