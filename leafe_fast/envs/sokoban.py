"""Sokoban as a text environment with exact snapshots and env-grounded reflection.

Levels come from :mod:`leafe_fast.envs.sokoban_levels` (seeded generator, push-optimal solver,
deadlock tests). A task's ``spec`` holds the level picture, so a task is self-contained:

    spec = {"level": "<text picture>", "seed": 7, "optimal_pushes": 3, "max_steps": 30, ...}

Either ``level`` (a picture, e.g. hand-written) or ``seed`` (plus ``height``, ``width``,
``num_boxes``, ``min_pushes``) must be given; :func:`sokoban_tasks` builds such tasks.

Rules of an episode (they are what ``restore`` must reproduce exactly):
- every call to ``step`` counts as a step, including unparseable actions and bumps into walls;
  those leave the board unchanged and say why in ``feedback``;
- rewards: -0.1 per step, +1 for each box pushed onto a target, -1 for each pushed off one,
  +10 when every box is on a target (the usual gym-sokoban shaping);
- the episode ends with success when all boxes are on targets, with failure after ``max_steps``
  steps, and (only if ``end_on_deadlock``) with failure on a detected deadlock.

Snapshots are ``(level, player, boxes, steps, done, success)``: immutable, shared, O(1) to take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from leafe_fast.envs.base import GroundedReflection, Observation, StepResult, Task
from leafe_fast.envs.sokoban_levels import (
    DIRECTIONS,
    Deadlock,
    Level,
    Solution,
    SolverBudgetExceeded,
    State,
    apply_move,
    describe_deadlock,
    find_deadlock,
    generate_level,
    is_solved,
    parse_level,
    plan_moves,
    reachable,
    render,
    solve,
)

DEFAULT_MAX_STEPS = 50
STEP_PENALTY = -0.1
BOX_ON_TARGET_REWARD = 1.0
BOX_OFF_TARGET_PENALTY = -1.0
COMPLETION_REWARD = 10.0

_SYNONYMS = {"up": "up", "down": "down", "left": "left", "right": "right",
             "north": "up", "south": "down", "west": "left", "east": "right"}
_WORD = re.compile(r"\b(up|down|left|right|north|south|west|east)\b")
_TAG = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
_VERB = re.compile(
    r"\b(?:move|moves|moving|go|goes|going|push|pushing|step|walk|action\s*:|answer\s*:)\s*"
    r"(?:the\s+\w+\s+)?(?:to\s+the\s+|to\s+)?(up|down|left|right|north|south|west|east)\b"
)
_LETTER = {"u": "up", "d": "down", "l": "left", "r": "right"}


def parse_action(text: str) -> tuple[str | None, str]:
    """The direction an answer asks for, or ``(None, why not)``.

    Tolerant of case and extra words ("I will move Up." -> "up"), compass names, a single letter
    u/d/l/r, and ``<action>up</action>`` tags (the tag wins when present). When several directions
    are mentioned, a verb phrase ("move left", "Action: left") decides; if that is still ambiguous
    the action is refused rather than guessed."""
    if not isinstance(text, str):
        return None, f"the action must be text, got {type(text).__name__}"
    tags = _TAG.findall(text)
    body = (tags[-1] if tags else text).strip().lower()
    if body.strip(" .!\"'`") in _LETTER:
        return _LETTER[body.strip(" .!\"'`")], ""
    found = {_SYNONYMS[w] for w in _WORD.findall(body)}
    if len(found) == 1:
        return found.pop(), ""
    if not found:
        return None, "no direction found"
    verbs = {_SYNONYMS[w] for w in _VERB.findall(body)}
    if len(verbs) == 1:
        return verbs.pop(), ""
    return None, f"it names several directions ({', '.join(sorted(found))})"


@dataclass(frozen=True)
class SokobanSnapshot:
    level: Level
    player: int
    boxes: frozenset
    steps: int
    done: bool
    success: bool
    max_steps: int


class SokobanEnv:
    """Text Sokoban (see the module docstring for rules and rewards).

    ``max_steps`` overrides the task's ``spec["max_steps"]`` (default 50 when neither is set).
    ``feedback_in_observation`` appends the step's feedback below the board, so a policy that
    only sees observations still learns why a move failed; turn it off when the caller shows
    ``feedback`` separately."""

    name = "sokoban"

    def __init__(
        self,
        max_steps: int | None = None,
        feedback_in_observation: bool = True,
        end_on_deadlock: bool = False,
        box_on_target_char: str = "√",
        solver_max_states: int = 200_000,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if box_on_target_char not in ("√", "*"):
            raise ValueError("box_on_target_char must be '√' or '*'")
        self.max_steps = max_steps
        self.feedback_in_observation = feedback_in_observation
        self.end_on_deadlock = end_on_deadlock
        self.box_on_target_char = box_on_target_char
        self.solver_max_states = solver_max_states
        self._snap: SokobanSnapshot | None = None
        self._solutions: dict[tuple, Solution | None] = {}

    # ------------------------------------------------------------------ protocol

    def instructions(self) -> str:
        return (
            "You are playing Sokoban. Push every box onto a target.\n"
            "The board legend: # wall, _ floor, O target, X box, "
            f"{self.box_on_target_char} box on a target, P you (the player), S you standing on a target.\n"
            "Rows are counted from the top and columns from the left, starting at 0.\n"
            "Each turn, answer with one move: up, down, left or right "
            "(for example <action>up</action>). Walking into a box pushes it one square if the "
            "square behind it is free; you cannot pull boxes or push two at once. A box pushed "
            "into a corner that is not a target can never be moved again, so think before pushing.\n"
            "Rewards: -0.1 per step, +1 for a box put on a target, -1 for a box taken off one, "
            "+10 when all boxes are on targets."
        )

    def reset(self, task: Task) -> Observation:
        level, max_steps = self._level_of(task)
        self._snap = SokobanSnapshot(level, level.player, level.boxes, 0, False, False, max_steps)
        self._solutions.clear()
        return self._observation("")

    def step(self, action: str) -> StepResult:
        snap = self._require_started()
        if snap.done:
            raise RuntimeError("the episode is over; call reset() or restore() before step()")
        level = snap.level
        state: State = (snap.player, snap.boxes)
        steps = snap.steps + 1
        reward = STEP_PENALTY
        direction, why = parse_action(action)
        info: dict[str, Any] = {"action": direction, "moved": False, "pushed": False}
        deadlock: Deadlock | None = None
        if direction is None:
            feedback = (f"Invalid action {_quote(action)}: {why}. "
                        "Answer with exactly one of up, down, left, right.")
            info["invalid"] = True
        else:
            outcome = apply_move(level, state, direction)
            info["moved"] = outcome.moved
            if not outcome.moved:
                feedback = _blocked_text(level, state, direction, outcome.blocked)
            elif outcome.pushed_from < 0:
                feedback = ""
            else:
                info["pushed"] = True
                bonus, feedback = _push_text(level, outcome.pushed_from, outcome.pushed_to, direction)
                reward += bonus
                deadlock = find_deadlock(level, outcome.state[1], outcome.pushed_to)
            state = outcome.state
        success = is_solved(level, state[1])
        if success:
            reward += COMPLETION_REWARD
            feedback = (feedback + " " if feedback else "") + "All boxes are on targets: solved!"
        if deadlock is None and not success:
            # A push elsewhere cannot unfreeze a group, so an old deadlock is still reported.
            deadlock = find_deadlock(level, state[1])
        if deadlock is not None:
            feedback = (feedback + " " if feedback else "") + describe_deadlock(level, deadlock)
        done = success or steps >= snap.max_steps or (deadlock is not None and self.end_on_deadlock)
        if done and not success:
            reason = "a deadlock" if deadlock is not None and self.end_on_deadlock else \
                f"the step limit ({snap.max_steps})"
            feedback = (feedback + " " if feedback else "") + f"The episode ended at {reason}."
        self._snap = SokobanSnapshot(level, state[0], state[1], steps, done, success, snap.max_steps)
        on_target = len(state[1] & level.targets)
        info.update(
            steps=steps,
            boxes_on_target=on_target,
            num_boxes=len(level.boxes),
            deadlock=None if deadlock is None else {
                "kind": deadlock.kind, "cells": [list(level.rc(c)) for c in deadlock.cells]},
            player=list(level.rc(state[0])),
            boxes=[list(level.rc(c)) for c in sorted(state[1])],
        )
        return StepResult(self._observation(feedback), round(reward, 6), done, success, feedback, info)

    def snapshot(self) -> SokobanSnapshot:
        return self._require_started()

    def restore(self, snapshot: SokobanSnapshot) -> None:
        if not isinstance(snapshot, SokobanSnapshot):
            raise TypeError(f"not a Sokoban snapshot: {type(snapshot).__name__}")
        if self._snap is None or snapshot.level != self._snap.level:
            self._solutions.clear()
        self._snap = snapshot

    def render(self) -> str:
        snap = self._require_started()
        return render(snap.level, (snap.player, snap.boxes), self.box_on_target_char)

    # ------------------------------------------------------------------ reflection

    def ground_reflection(self, history: list[StepResult]) -> GroundedReflection | None:
        """Rollback to just before the first move after which the level is unsolvable.

        The trajectory is replayed from the level's start through the parsed actions recorded in
        ``info["action"]``. Solvability can only be lost, never regained, so a binary search over
        the distinct box layouts finds the first unsolvable state with few solver calls. Without
        a deadlock, a failed episode is rolled back to where it stopped making progress (fewest
        pushes still needed); a running episode without deadlock gets ``None``."""
        snap = self._require_started()
        if not history or any(r.success for r in history):
            return None
        level = snap.level
        states = [level.start]
        for result in history:
            info = result.info if isinstance(result.info, dict) else {}
            if "action" not in info:
                return None  # not produced by this environment; nothing grounded to say
            direction = info["action"]
            if direction is None:
                states.append(states[-1])
            else:
                states.append(apply_move(level, states[-1], direction).state)
        try:
            first_bad = self._first_unsolvable(level, states)
        except SolverBudgetExceeded:
            return None
        if first_bad is not None:
            return self._deadlock_reflection(level, states, history, first_bad)
        if not history[-1].done:
            return None
        return self._stall_reflection(level, states)

    def _solution(self, level: Level, state: State) -> Solution | None:
        """The solver's plan from ``state``, memoised per box layout and player region.

        The push plan is shared by every player cell of a region, the walk is not: moves are
        re-derived for this exact player cell."""
        key = (state[1], min(reachable(level, state[0], state[1])))
        if key not in self._solutions:
            self._solutions[key] = solve(level, state, max_states=self.solver_max_states)
        plan = self._solutions[key]
        if plan is None:
            return None
        return Solution(plan.pushes, tuple(plan_moves(level, state, plan.pushes)))

    def _first_unsolvable(self, level: Level, states: list[State]) -> int | None:
        if self._solution(level, states[-1]) is not None:
            return None
        if self._solution(level, states[0]) is None:
            raise SolverBudgetExceeded("the level is unsolvable from its start")  # nothing to say
        lo, hi = 0, len(states) - 1  # states[lo] solvable (the start), states[hi] not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._solution(level, states[mid]) is None:
                hi = mid
            else:
                lo = mid
        return hi

    def _deadlock_reflection(self, level, states, history, bad: int) -> GroundedReflection:
        before, after = states[bad - 1], states[bad]
        direction = history[bad - 1].info["action"]
        moved = sorted(after[1] - before[1])
        where = f" to (row {level.rc(moved[0])[0]}, col {level.rc(moved[0])[1]})" if moved else ""
        deadlock = find_deadlock(level, after[1])
        why = describe_deadlock(level, deadlock) if deadlock is not None else (
            "After it no sequence of moves can solve the level any more "
            "(the boxes can no longer all reach targets).")
        plan = self._solution(level, before)
        assert plan is not None  # states[bad - 1] is solvable by the binary search invariant
        alternative = _plan_text(plan)
        text = (f"Step {bad} ({direction}) pushed a box{where} and lost the level. {why} "
                f"Go back to before step {bad}. {alternative}")
        return GroundedReflection(rollback_step=bad - 1, experience=text)

    def _stall_reflection(self, level, states) -> GroundedReflection:
        needed = [self._solution(level, s).num_pushes for s in states]
        best = min(needed)
        k = needed.index(best)
        last = len(states) - 1
        if k >= last:
            k = 0  # the trajectory ended at its best state: retry from the start, with a plan
        plan = self._solution(level, states[k])
        wasted = last - k
        head = (f"No deadlock, but the episode ran out of steps: after step {k} the level needed "
                f"{_pushes(best)} more and the {wasted} steps after it did not bring it closer. "
                if k > 0 else
                f"No deadlock, but the episode ran out of steps before solving the level. ")
        text = head + f"Go back to step {k}. " + _plan_text(plan)
        return GroundedReflection(rollback_step=k, experience=text)

    # ------------------------------------------------------------------ helpers

    def _level_of(self, task: Task) -> tuple[Level, int]:
        if task.env != self.name:
            raise ValueError(f"task {task.task_id!r} is for env {task.env!r}, not {self.name!r}")
        spec = task.spec
        max_steps = self.max_steps or int(spec.get("max_steps", DEFAULT_MAX_STEPS))
        if "level" in spec:
            return parse_level(spec["level"]), max_steps
        if "seed" in spec:
            gen = generate_level(int(spec["seed"]), **_generator_kwargs(spec))
            return gen.level, max_steps
        raise ValueError(f"Sokoban task {task.task_id!r} needs spec['level'] or spec['seed']")

    def _require_started(self) -> SokobanSnapshot:
        if self._snap is None:
            raise RuntimeError("call reset(task) before using the environment")
        return self._snap

    def _observation(self, feedback: str) -> str:
        board = self.render()
        if self.feedback_in_observation and feedback:
            return board + "\n" + feedback
        return board


def _generator_kwargs(spec: dict) -> dict:
    keys = ("height", "width", "num_boxes", "min_pushes", "max_pushes")
    return {k: int(spec[k]) for k in keys if spec.get(k) is not None}


def _plan_text(plan: Solution) -> str:
    if not plan.moves:
        return "From there the level is already solved."
    shown = ", ".join(plan.moves[:12]) + (", ..." if len(plan.moves) > 12 else "")
    return (f"From there it takes {_pushes(plan.num_pushes)}; do '{plan.moves[0]}' next "
            f"(a shortest-push plan: {shown}).")


def _push_text(level: Level, source: int, dest: int, direction: str) -> tuple[float, str]:
    """The shaping reward of a push and its feedback sentence."""
    was_on, now_on = source in level.targets, dest in level.targets
    r, c = level.rc(dest)
    if now_on and not was_on:
        return BOX_ON_TARGET_REWARD, f"You pushed a box onto the target at (row {r}, col {c})."
    if was_on and not now_on:
        return BOX_OFF_TARGET_PENALTY, f"You pushed a box off its target, to (row {r}, col {c})."
    return 0.0, f"You pushed a box {direction} to (row {r}, col {c})."


def _pushes(n: int) -> str:
    return f"{n} push" if n == 1 else f"{n} pushes"


def _blocked_text(level: Level, state: State, direction: str, blocked: str) -> str:
    if blocked == "wall":
        return f"You cannot move {direction}: there is a wall. Nothing moved."
    k = DIRECTIONS.index(direction)
    box = level.neighbours[k][state[0]]
    r, c = level.rc(box)
    obstacle = "a wall" if blocked == "box_wall" else "another box"
    return (f"You cannot push the box at (row {r}, col {c}) {direction}: {obstacle} is behind it. "
            "Nothing moved.")


def _quote(text: Any) -> str:
    s = str(text).strip().replace("\n", " ")
    return repr(s if len(s) <= 60 else s[:57] + "...")


def sokoban_tasks(
    split: str = "train",
    n: int = 8,
    seed: int = 0,
    height: int = 6,
    width: int = 6,
    num_boxes: int = 1,
    min_pushes: int = 2,
    max_pushes: int | None = 4,
    max_steps: int = 30,
) -> list[Task]:
    """``n`` generated, solver-checked tasks; the split picks disjoint level seeds.

    Level seed = ``(seed * 1_000_000 + i) * 3 + split_index`` (train 0, val 1, test 2), so the
    splits never share a seed, and each task spec carries the level picture and its optimal push
    count. The defaults are the tiny demo set: 6x6, one box, at most 4 pushes."""
    splits = {"train": 0, "val": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(splits)}")
    if n < 0 or n >= 1_000_000:
        raise ValueError(f"n must be in [0, 1e6), got {n}")
    tasks = []
    for i in range(n):
        level_seed = (seed * 1_000_000 + i) * 3 + splits[split]
        gen = generate_level(level_seed, height, width, num_boxes, min_pushes, max_pushes)
        spec = {
            "level": render(gen.level, gen.level.start),
            "seed": level_seed,
            "height": height,
            "width": width,
            "num_boxes": num_boxes,
            "optimal_pushes": gen.optimal_pushes,
            "solution": list(gen.solution.moves),
            "max_steps": max_steps,
            "split": split,
        }
        tasks.append(Task(task_id=f"sokoban-{split}-{level_seed}", env="sokoban", spec=spec))
    return tasks
