"""Sokoban: rules, action parsing, deadlocks, solver optimality, generator, grounded reflection."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leafe_fast.envs.base import Env, Task
from leafe_fast.envs.sokoban import SokobanEnv, parse_action, sokoban_tasks
from leafe_fast.envs.sokoban_levels import (
    DIRECTIONS,
    apply_move,
    find_deadlock,
    generate_level,
    make_level,
    parse_level,
    render,
    solve,
)


def _task(picture: str, **spec) -> Task:
    return Task("hand", "sokoban", {"level": picture, **spec})


def _env(picture: str, **kwargs) -> tuple[SokobanEnv, str]:
    env = SokobanEnv(**kwargs)
    return env, env.reset(_task(picture))


CORRIDOR = """
#######
#P_X_O#
#######
"""


# ----------------------------------------------------------------------------- rules


def test_env_satisfies_protocol_and_documents_legend():
    env = SokobanEnv()
    assert isinstance(env, Env)
    text = env.instructions()
    for symbol in ["# wall", "_ floor", "O target", "X box", "√ box on a target", "P you", "S you"]:
        assert symbol in text
    for move in DIRECTIONS:
        assert move in text


def test_render_round_trips_every_legend_symbol():
    picture = "######\n#S√X_#\n#_O_X#\n######"
    level = parse_level(picture)
    assert render(level, level.start) == picture
    assert render(level, level.start, box_on_target="*") == picture.replace("√", "*")
    classic = parse_level("######\n#+*$ #\n# . $#\n######")  # the usual XSB symbols are read too
    assert render(classic, classic.start) == picture


def test_walking_into_a_wall_changes_nothing_but_counts_a_step():
    env, obs = _env(CORRIDOR)
    before = env.snapshot()
    r = env.step("up")
    assert r.observation.splitlines()[:3] == obs.splitlines()
    assert "wall" in r.feedback and "Nothing moved" in r.feedback
    assert r.reward == pytest.approx(-0.1) and not r.done and not r.info["moved"]
    after = env.snapshot()
    assert (after.player, after.boxes) == (before.player, before.boxes) and after.steps == 1


def test_pushing_a_box_into_a_wall_or_box_is_refused():
    env, _ = _env("########\n#P_XX_O#\n#____O_#\n########")
    env.step("right")  # walk next to the first box
    r = env.step("right")
    assert "another box is behind it" in r.feedback and not r.info["moved"]
    env2, _ = _env("""
#####
#PXO#
#__X#
#__O#
#####
""")
    env2.step("down")
    env2.step("right")
    r = env2.step("right")  # box at (2,3) is against the right wall
    assert "a wall is behind it" in r.feedback and not r.info["moved"]


def test_push_onto_target_rewards_and_completion_ends_with_success():
    env, _ = _env(CORRIDOR)
    r1 = env.step("right")
    assert r1.info["moved"] and not r1.info["pushed"] and r1.reward == pytest.approx(-0.1)
    r2 = env.step("right")
    assert r2.info["pushed"] and not r2.done and r2.reward == pytest.approx(-0.1)
    r3 = env.step("right")
    assert r3.success and r3.done and r3.reward == pytest.approx(-0.1 + 1 + 10)
    assert "√" in r3.observation and "solved" in r3.feedback
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("left")


def test_pushing_off_a_target_costs_a_point():
    env, _ = _env("########\n#P√__XO#\n########")
    r = env.step("right")
    assert r.info["pushed"] and r.reward == pytest.approx(-0.1 - 1.0) and "off its target" in r.feedback
    assert r.info["boxes_on_target"] == 0


def test_invalid_action_gets_feedback_and_no_state_change():
    env, obs = _env(CORRIDOR)
    r = env.step("jump over the box")
    assert r.info["invalid"] and r.info["action"] is None
    assert "Invalid action" in r.feedback and "up, down, left, right" in r.feedback
    assert r.observation.startswith(obs) and r.reward == pytest.approx(-0.1)
    r = env.step("left or right?")
    assert "several directions" in r.feedback


def test_step_limit_ends_the_episode_as_failure():
    env = SokobanEnv()
    env.reset(_task(CORRIDOR, max_steps=2))
    assert not env.step("left").done
    r = env.step("left")
    assert r.done and not r.success and "step limit (2)" in r.feedback


def test_feedback_can_be_kept_out_of_the_observation():
    env, obs = _env(CORRIDOR, feedback_in_observation=False)
    r = env.step("up")
    assert r.observation == obs and r.feedback


@pytest.mark.parametrize(
    "text, expected",
    [
        ("up", "up"),
        ("I will move Up.", "up"),
        ("LEFT", "left"),
        ("<action>down</action>", "down"),
        ("The box is to the left, so I push it: <action> Left </action>", "left"),
        ("r", "right"),
        ("Go east!", "right"),
        ("Moving left is blocked by the wall, so I move up", None),  # two verbs: ambiguous
        ("The wall is on the left. Action: up", "up"),
        ("", None),
        ("stay", None),
        ("up down", None),
    ],
)
def test_parse_action_is_tolerant_but_never_guesses(text, expected):
    assert parse_action(text)[0] == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parse_action_never_raises_and_answers_a_direction_or_why_not(text):
    direction, why = parse_action(text)
    assert direction in DIRECTIONS or (direction is None and why)


def test_end_on_deadlock_option_stops_the_episode():
    env, _ = _env("""
#####
#___#
#_X_#
#_P_#
#_O_#
#####
""", end_on_deadlock=True)
    r = env.step("up")  # box onto the top wall: row 1 has no target
    assert r.done and not r.success and r.info["deadlock"]["kind"] == "dead_square"


# ----------------------------------------------------------------------------- deadlocks


@pytest.mark.parametrize(
    "picture, kind",
    [
        ("#####\n#X__#\n#_P_#\n#__O#\n#####", "corner"),
        ("######\n#_X__#\n#__P_#\n#___O#\n######", "dead_square"),
        ("#######\n#_XXO_#\n#___P_#\n#__O__#\n#######", "frozen"),  # pair against a wall
        ("#######\n#_√X_O#\n#___P_#\n#_____#\n#######", "frozen"),  # one of the pair off target
        ("#######\n#_____#\n#_XX__#\n#_XX__#\n#_P_OO#\n#___OO#\n#######", "frozen"),  # 2x2 block
        ("#####\n#√__#\n#_P_#\n#___#\n#####", None),  # corner, but on a target
        ("#######\n#_√√__#\n#___P_#\n#_____#\n#######", None),  # frozen pair, both on targets
        ("#####\n#___#\n#_XP#\n#__O#\n#####", None),  # free box
    ],
)
def test_deadlock_detection_on_hand_written_maps(picture, kind):
    level = parse_level(picture)
    found = find_deadlock(level, level.boxes)
    assert (found.kind if found else None) == kind
    if kind is not None:
        assert solve(level) is None  # every reported deadlock is real


def test_deadlock_is_reported_in_feedback_and_info():
    env, _ = _env("#####\n#___#\n#_X_#\n#__P#\n#_O_#\n#####")
    env.step("up")
    r = env.step("left")  # box (2,2) -> (2,1): against the left wall, no target in column 1
    assert r.info["deadlock"] == {"kind": "dead_square", "cells": [[2, 1]]}
    assert "Deadlock" in r.feedback and "(row 2, col 1)" in r.feedback


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize(
    "picture, pushes",
    [
        (CORRIDOR, 2),
        ("######\n#_O__#\n#_X__#\n#_P__#\n######", 1),
        ("########\n#______#\n#_X__X_#\n#_O_PO_#\n#______#\n########", 2),
        ("#######\n#_____#\n#_X___#\n#_P__O#\n#######", 4),  # around the box, then along
        ("#####\n#X__#\n#_P_#\n#__O#\n#####", None),
    ],
)
def test_solver_optimal_push_counts_on_hand_written_maps(picture, pushes):
    level = parse_level(picture)
    plan = solve(level)
    assert (plan.num_pushes if plan else None) == pushes
    if plan is not None:  # the move plan really solves the level
        env, _ = _env(picture)
        results = [env.step(m) for m in plan.moves]
        assert results[-1].success and sum(r.info["pushed"] for r in results) == pushes


def _reference_min_pushes(level, state) -> int | None:
    """Plain 0-1 BFS over full (player, boxes) states: walks cost 0, pushes 1; no pruning."""
    start = (state[0], frozenset(state[1]))
    best = {start: 0}
    queue = deque([(0, start)])
    while queue:
        cost, cur = queue.popleft()
        if cost > best[cur]:
            continue
        if cur[1] <= level.targets:
            return cost
        for d in DIRECTIONS:
            out = apply_move(level, cur, d)
            if not out.moved:
                continue
            step = 1 if out.pushed_from >= 0 else 0
            if best.get(out.state, 1 << 30) > cost + step:
                best[out.state] = cost + step
                (queue.appendleft if step == 0 else queue.append)((cost + step, out.state))
    return None


def test_solver_matches_plain_reference_on_random_states():
    rng = random.Random(1)
    checked = unsolvable = 0
    for seed in range(25):
        gen = generate_level(seed, 6, 6, num_boxes=2)
        level = gen.level
        floor = [c for c in range(36) if c not in level.walls]
        for _ in range(3):  # random (often unsolvable) states on the same board
            cells = rng.sample(floor, 3)
            state = (cells[0], frozenset(cells[1:]))
            plan = solve(level, state)
            ref = _reference_min_pushes(level, state)
            assert (plan.num_pushes if plan else None) == ref, render(level, state)
            checked += 1
            unsolvable += ref is None
    assert checked == 75 and 0 < unsolvable < checked


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_solvable():
    for seed in [0, 5, 17]:
        a = generate_level(seed, 7, 7, num_boxes=2, min_pushes=3)
        b = generate_level(seed, 7, 7, num_boxes=2, min_pushes=3)
        assert render(a.level, a.level.start) == render(b.level, b.level.start)
        assert a.solution == b.solution and a.optimal_pushes >= 3
        assert _reference_min_pushes(a.level, a.level.start) == a.optimal_pushes
    pictures = {render(g.level, g.level.start) for g in (generate_level(s, 8, 8, 3) for s in range(6))}
    assert len(pictures) == 6


@pytest.mark.parametrize("size, boxes", [(6, 1), (7, 2), (8, 3)])
def test_generated_sizes_and_box_counts(size, boxes):
    gen = generate_level(123, size, size, num_boxes=boxes)
    lines = render(gen.level, gen.level.start).splitlines()
    assert len(lines) == size and all(len(ln) == size for ln in lines)
    assert len(gen.level.boxes) == boxes == len(gen.level.targets)
    assert not gen.level.boxes <= gen.level.targets


def test_task_lists_are_deterministic_with_disjoint_splits():
    train = sokoban_tasks("train", 6, seed=3)
    again = sokoban_tasks("train", 6, seed=3)
    test = sokoban_tasks("test", 6, seed=3)
    assert [t.spec["level"] for t in train] == [t.spec["level"] for t in again]
    assert not {t.spec["seed"] for t in train} & {t.spec["seed"] for t in test}
    assert len({t.task_id for t in train + test}) == 12
    env = SokobanEnv()
    for task in train:
        assert 2 <= task.spec["optimal_pushes"] <= 4
        env.reset(task)
        results = [env.step(m) for m in task.spec["solution"]]
        assert results[-1].success
    with pytest.raises(ValueError, match="unknown split"):
        sokoban_tasks("dev", 1)


def test_task_from_seed_alone_matches_generator():
    task = Task("s", "sokoban", {"seed": 42, "height": 7, "width": 7, "num_boxes": 2})
    obs = SokobanEnv().reset(task)
    gen = generate_level(42, 7, 7, 2)
    assert obs == render(gen.level, gen.level.start)


@pytest.mark.parametrize(
    "picture, message",
    [
        ("#####\n#PX_#\n#####", "1 boxes but 0 targets"),
        ("#####\n#_XO#\n#####", "exactly one player"),
        ("#####\n#PXO?#\n#####", "unknown level character"),
    ],
)
def test_bad_levels_are_refused_with_a_reason(picture, message):
    with pytest.raises(ValueError, match=message):
        parse_level(picture)
    with pytest.raises(ValueError, match="not a floor cell"):
        make_level(3, 3, {0}, {4}, {4}, 0)


# ----------------------------------------------------------------------------- reflection


def test_ground_reflection_rolls_back_before_a_scripted_deadlock():
    picture = "#######\n#_____#\n#_X___#\n#_P__O#\n#######"
    env, _ = _env(picture)
    history = [env.step(a) for a in ["right", "hop!", "left", "up", "left", "left"]]
    assert history[3].info["deadlock"]["kind"] == "dead_square"
    reflection = env.ground_reflection(history, mode="oracle")
    assert reflection is not None and reflection.rollback_step == 3
    assert "Step 4 (up)" in reflection.experience and "Deadlock" in reflection.experience
    # The suggested alternative works: replay the kept steps, then follow the plan.
    env.reset(_task(picture))
    for a in ["right", "hop!", "left"]:
        env.step(a)
    plan = solve(env.snapshot().level, (env.snapshot().player, env.snapshot().boxes))
    assert f"do '{plan.moves[0]}' next" in reflection.experience and plan.num_pushes == 4
    assert [env.step(m) for m in plan.moves][-1].success


def _replay(picture: str, actions: list[str]) -> SokobanEnv:
    env, _ = _env(picture)
    for action in actions:
        env.step(action)
    return env


def test_ground_reflection_plans_are_executable_from_the_rollback_point():
    rng = random.Random(4)
    checked = 0
    for task in sokoban_tasks("train", 6, seed=2, height=7, width=7, num_boxes=2, max_pushes=None):
        env = SokobanEnv(max_steps=25)
        env.reset(task)
        actions = [rng.choice(DIRECTIONS) for _ in range(25)]
        history = [env.step(a) for a in actions]
        reflection = env.ground_reflection(history, mode="oracle")
        if reflection is None:
            continue
        checked += 1
        replayed = _replay(task.spec["level"], actions[: reflection.rollback_step])
        snap = replayed.snapshot()
        plan = solve(snap.level, (snap.player, snap.boxes))
        assert f"do '{plan.moves[0]}' next" in reflection.experience
        assert [replayed.step(m) for m in plan.moves][-1].success
    assert checked >= 3


def test_ground_reflection_finds_unsolvable_states_the_heuristics_miss():
    picture = "######\n#__√P#\n###__#\n##__X#\n####O#\n######"
    env, _ = _env(picture)
    history = [env.step(a) for a in ["down", "up", "left", "right"]]
    assert history[2].info["pushed"] and history[2].info["deadlock"] is None
    reflection = env.ground_reflection(history, mode="oracle")
    assert reflection.rollback_step == 2 and "Step 3 (left)" in reflection.experience
    assert "no sequence of moves can solve" in reflection.experience


def test_ground_reflection_on_stalled_or_running_episodes():
    env = SokobanEnv()
    env.reset(_task(CORRIDOR, max_steps=6))
    running = [env.step(a) for a in ["right", "right"]]
    assert env.ground_reflection(running) is None  # no deadlock, not over: nothing to say
    stalled = running + [env.step(a) for a in ["left", "right", "left", "left"]]
    assert stalled[-1].done and not stalled[-1].success
    reflection = env.ground_reflection(stalled, mode="oracle")
    assert reflection.rollback_step == 2 and "do 'right' next" in reflection.experience
    assert "plan: right)" in reflection.experience  # the walk is for the player's own cell
    rollback_state = _replay(CORRIDOR, ["right", "right"])
    assert rollback_state.step("right").success
    env.reset(_task(CORRIDOR))
    solved = [env.step("right") for _ in range(3)]
    assert env.ground_reflection(solved) is None


# ----------------------------------------------------------------------------- issue 11/12 additions


def test_every_step_flags_invalid_and_noop_moves():
    picture = "#####\n#P_X_O\n#####"
    env, _ = _env("######\n#P_XO#\n#_####\n######")
    cases = [("up", True, True), ("hop!", True, True), ("right", False, False), ("right", False, False)]
    for action, invalid, noop in cases:
        r = env.step(action)
        assert r.info["invalid"] is invalid and r.info["noop"] is noop, (action, r.info)
    env, _ = _env("######\n#PXX_#\n#_O_O#\n######")
    r = env.step("right")  # box against a box: a bump, nothing changes
    assert r.info["invalid"] is True and r.info["noop"] is True and not r.info["pushed"]
    env, _ = _env(picture.replace("#P", "#P"))
    r = env.step("down")  # walks into the wall row
    assert isinstance(r.info["invalid"], bool) and isinstance(r.info["noop"], bool)


def test_diagnosis_names_the_step_box_and_reason_without_the_plan():
    picture = "#######\n#_____#\n#_X___#\n#_P__O#\n#######"
    env, _ = _env(picture)
    history = [env.step(a) for a in ["right", "hop!", "left", "up", "left", "left"]]
    g = env.ground_reflection(history)
    assert g.mode == "diagnosis" and g.rollback_step == 3
    text = g.experience
    assert text.startswith("Step 4 (<action>up</action>) pushed a box to (row 1, col 2)")
    assert "against a wall with no target" in text and text.endswith("Avoid: <action>up</action>.")
    for leak in ("next", "plan", "push", "Go back"):
        if leak == "push":
            continue  # "pushed a box" describes the mistake
        assert leak not in text
    oracle = env.ground_reflection(history, mode="oracle")
    assert oracle.mode == "oracle" and oracle.rollback_step == 3 and "next" in oracle.experience
    with pytest.raises(ValueError, match="unknown mode"):
        env.ground_reflection(history, mode="plan")


def test_compact_diagnosis_uses_letters_and_the_shown_board_coordinates():
    picture = "#######\n#_____#\n#_X___#\n#_P__O#\n#######"
    env = SokobanEnv(prompt="compact")
    env.reset(_task(picture))
    history = [env.step(a) for a in "rlul"]
    g = env.ground_reflection(history)
    assert g.rollback_step == 2 and g.experience.startswith("Step 3 (u) pushed a box to (row 0, col 1)")
    assert g.experience.endswith("Avoid: u.")


def test_the_avoided_move_really_loses_the_level_on_random_hard_levels():
    rng = random.Random(11)
    seen = {"deadlock": 0, "stall": 0}
    for task in sokoban_tasks("train", 12, seed=5, difficulty="hard"):
        env = SokobanEnv(prompt="compact")
        env.reset(task)
        actions = [rng.choice("udlr") for _ in range(40)]
        history = [env.step(a) for a in actions]
        if history[-1].success:
            continue
        g = env.ground_reflection(history)
        assert g is not None and g.mode == "diagnosis" and "next" not in g.experience
        replay = _replay(task.spec["level"], actions[: g.rollback_step])
        snap = replay.snapshot()
        assert solve(snap.level, (snap.player, snap.boxes)) is not None  # the rollback state is solvable
        if g.experience.startswith("Step"):
            seen["deadlock"] += 1
            assert g.experience.endswith(f"Avoid: {actions[g.rollback_step]}.")
            replay.step(actions[g.rollback_step])
            after = replay.snapshot()
            assert solve(after.level, (after.player, after.boxes)) is None  # that move lost the level
        else:
            seen["stall"] += 1
            assert g.experience.startswith(("Stalled", "Too slow"))
    assert seen["deadlock"] >= 2 and seen["stall"] >= 1, seen


def test_stall_diagnosis_for_running_episodes_cut_by_a_depth_limit():
    env = SokobanEnv(stall_window=4)
    env.reset(_task(CORRIDOR, max_steps=50))
    running = [env.step(a) for a in ["right", "up", "up", "down"]]
    assert env.ground_reflection(running) is None  # best state only 3 steps old: still in progress
    running.append(env.step("up"))
    g = env.ground_reflection(running)  # 4 steps without progress: stalled
    assert g.rollback_step == 1 and g.experience.startswith("Stalled: no progress after step 1")
    assert "4 of the 5 steps changed nothing" in g.experience and g.experience.endswith("Avoid: <action>up</action>.")
    env.reset(_task(CORRIDOR, max_steps=4))
    ended = [env.step(a) for a in ["up", "right", "right", "left"]]
    g = env.ground_reflection(ended)  # ended by the step limit: progress up to step 3, then a step back
    assert ended[-1].done and g.rollback_step == 3 and g.experience.endswith("Avoid: <action>left</action>.")
    env.reset(_task(CORRIDOR, max_steps=3))
    slow = [env.step(a) for a in ["up", "right", "right"]]
    g = env.ground_reflection(slow)  # progressed to the end: back to the first wasted move
    assert g.rollback_step == 0 and g.experience.startswith("Too slow") and "first at step 1" in g.experience


def test_compact_prompt_is_short_and_parses_letters():
    from leafe_fast.tiny import tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    task = sokoban_tasks("test", 1, difficulty="hard")[0]
    full, compact = SokobanEnv(), SokobanEnv(prompt="compact")
    obs_full, obs_compact = full.reset(task), compact.reset(task)
    assert obs_compact.split("\n") == [row[1:-1] for row in obs_full.split("\n")[1:-1]]
    assert len(tok.encode(compact.instructions())) < len(tok.encode(full.instructions())) / 3
    assert [compact.action_text(d) for d in DIRECTIONS] == ["u", "d", "l", "r"]
    assert all(len(tok.encode(compact.action_text(d))) == 1 for d in DIRECTIONS)
    assert full.action_text("up") == "<action>up</action>"
    for d in DIRECTIONS:
        a, b = full.snapshot(), compact.snapshot()
        assert full.step(full.action_text(d)).info["action"] == compact.step(compact.action_text(d)).info["action"] == d
        full.restore(a), compact.restore(b)
    r = compact.step("x")
    assert r.feedback == "Invalid: reply u, d, l or r." and r.info["invalid"]
    with pytest.raises(ValueError, match="prompt"):
        SokobanEnv(prompt="short")
    # a hand-written board whose border has floor keeps its border
    open_board = SokobanEnv(prompt="compact")
    assert open_board.reset(_task("P_XO")) == "P_XO"


def test_difficulty_splits_and_overrides():
    hard = sokoban_tasks("test", 8, seed=1, difficulty="hard")
    assert all(t.spec["height"] == 7 and t.spec["num_boxes"] == 2 and 4 <= t.spec["optimal_pushes"] <= 8
               and t.spec["max_steps"] == 40 and t.spec["difficulty"] == "hard" for t in hard)
    easy = sokoban_tasks("test", 8, seed=1, difficulty="easy")
    assert {t.task_id for t in easy}.isdisjoint(t.task_id for t in hard)
    assert [t.spec["level"] for t in easy] == [t.spec["level"] for t in sokoban_tasks("test", 8, seed=1)]
    override = sokoban_tasks("test", 2, seed=1, difficulty="hard", max_steps=60)
    assert all(t.spec["max_steps"] == 60 for t in override)
    with pytest.raises(ValueError, match="difficulty"):
        sokoban_tasks("test", 1, difficulty="insane")


def test_hard_split_leaves_headroom_for_a_random_walk():
    rng = random.Random(0)
    env = SokobanEnv(prompt="compact")
    wins = runs = 0
    for task in sokoban_tasks("val", 30, seed=2, difficulty="hard"):
        for _ in range(4):
            env.reset(task)
            r = env.step(rng.choice("udlr"))
            while not r.done:
                r = env.step(rng.choice("udlr"))
            wins += r.success
            runs += 1
    assert wins / runs < 0.15  # measured 0.044 on 100 test levels x 16 episodes
