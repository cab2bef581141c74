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

Every step's ``info`` says ``invalid`` (unparseable, or a bump into a wall or a blocked box) and
``noop`` (the state did not change), so training can mask wasted moves and a corrected move can be
validated before it is used.

Two prompt styles (``SokobanEnv(prompt=...)``), used identically by exploration and evaluation:
``"full"`` (the default: long rules, ``<action>up</action>``, whole board, feedback sentences) and
``"compact"`` (a few lines of rules, one-letter moves ``u d l r``, the board without its outer wall
ring when that ring is all wall, short feedback): about 40 tokens a step with the tiny tokenizer
instead of about 75, for small from-scratch policies.

Named difficulties (``sokoban_tasks(difficulty=...)``, see ``DIFFICULTIES``) fix board size, boxes,
push range and step limit; ``benchmarks/repro_sokoban.py`` records each split's random-walk pass@k.

Snapshots are ``(level, player, boxes, steps, done, success)``: immutable, shared, O(1) to take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from leafe_fast.envs.base import GROUNDING_MODES, GroundedReflection, Observation, StepResult, Task
from leafe_fast.errors import UserError
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
PROMPTS = ("full", "compact")

DIFFICULTIES: dict[str, dict[str, int]] = {
    # the demo's levels: a uniform random walk solves them often (pass@16 about 0.95)
    "easy": dict(height=6, width=6, num_boxes=1, min_pushes=2, max_pushes=4, max_steps=30),
    "medium": dict(height=7, width=7, num_boxes=2, min_pushes=2, max_pushes=5, max_steps=40),
    # headroom for pass@k: a uniform random walk has pass@1 near 0.05 (measured by the repro benchmark)
    "hard": dict(height=7, width=7, num_boxes=2, min_pushes=4, max_pushes=8, max_steps=40),
}
"""Named Sokoban splits: generator arguments and step limit of each."""


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
    """Text Sokoban (see the module docstring for rules, rewards and prompt styles).

    ``max_steps`` overrides the task's ``spec["max_steps"]`` (default 50 when neither is set).
    ``feedback_in_observation`` appends the step's feedback below the board, so a policy that
    only sees observations still learns why a move failed; turn it off when the caller shows
    ``feedback`` separately. ``prompt`` is ``"full"`` or ``"compact"`` (module docstring).
    ``stall_window``: a running episode whose best state (fewest moves still needed) is at least
    this many steps old counts as stalled, and ``ground_reflection`` diagnoses it (an exploration
    depth cut-off ends episodes the environment has not ended)."""

    name = "sokoban"

    def __init__(
        self,
        max_steps: int | None = None,
        feedback_in_observation: bool = True,
        end_on_deadlock: bool = False,
        box_on_target_char: str = "√",
        solver_max_states: int = 200_000,
        prompt: str = "full",
        stall_window: int = 8,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise UserError("SokobanEnv(max_steps)", f"must be >= 1, got {max_steps}")
        if box_on_target_char not in ("√", "*"):
            raise UserError("SokobanEnv(box_on_target_char)", f"got {box_on_target_char!r}", "use '√' or '*'")
        if prompt not in PROMPTS:
            raise UserError("SokobanEnv(prompt)", f"unknown prompt style {prompt!r}", f"use one of {PROMPTS}")
        if stall_window < 1:
            raise UserError("SokobanEnv(stall_window)", f"must be >= 1, got {stall_window}")
        self.max_steps = max_steps
        self.feedback_in_observation = feedback_in_observation
        self.end_on_deadlock = end_on_deadlock
        self.box_on_target_char = box_on_target_char
        self.solver_max_states = solver_max_states
        self.prompt = prompt
        self.compact = prompt == "compact"
        self.stall_window = stall_window
        self._snap: SokobanSnapshot | None = None
        self._solutions: dict[tuple, Solution | None] = {}

    # ------------------------------------------------------------------ protocol

    def instructions(self) -> str:
        if self.compact:
            return (
                "Sokoban. Push every box X onto a target O. # wall, _ floor, "
                f"{self.box_on_target_char} box on target, P you, S you on target. "
                "Boxes can be pushed, never pulled. Reply with one letter: u, d, l or r."
            )
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

    def action_text(self, direction: str) -> str:
        """A move written in this prompt style's action format (``"u"`` or ``"<action>up</action>"``),
        for scripted policies and cloning data."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; use one of {DIRECTIONS}")
        return direction[0] if self.compact else f"<action>{direction}</action>"

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
        info: dict[str, Any] = {"action": direction, "moved": False, "pushed": False, "invalid": False, "noop": True}
        deadlock: Deadlock | None = None
        parts: list[str] = []
        if direction is None:
            parts.append("Invalid: reply u, d, l or r." if self.compact else
                         f"Invalid action {_quote(action)}: {why}. Answer with exactly one of up, down, left, right.")
            info["invalid"] = True
        else:
            outcome = apply_move(level, state, direction)
            info["moved"] = outcome.moved
            if not outcome.moved:
                info["invalid"] = True  # a bump: into a wall, or a box that cannot move
                parts.append("Blocked." if self.compact else _blocked_text(level, state, direction, outcome.blocked))
            elif outcome.pushed_from >= 0:
                info["pushed"] = True
                bonus, text = _push_text(level, outcome.pushed_from, outcome.pushed_to, direction)
                reward += bonus
                if self.compact:
                    text = {1.0: "Box on target.", -1.0: "Box off target."}.get(bonus, "")
                parts.append(text)
                deadlock = find_deadlock(level, outcome.state[1], outcome.pushed_to)
            info["noop"] = outcome.state == state
            state = outcome.state
        success = is_solved(level, state[1])
        if success:
            reward += COMPLETION_REWARD
            parts.append("Solved!" if self.compact else "All boxes are on targets: solved!")
        if deadlock is None and not success:
            # A push elsewhere cannot unfreeze a group, so an old deadlock is still reported.
            deadlock = find_deadlock(level, state[1])
        if deadlock is not None:
            parts.append(self._deadlock_text(level, deadlock))
        done = success or steps >= snap.max_steps or (deadlock is not None and self.end_on_deadlock)
        if done and not success:
            dead_end = deadlock is not None and self.end_on_deadlock
            if self.compact:
                parts.append("Game over." if dead_end else "Out of steps.")
            else:
                reason = "a deadlock" if dead_end else f"the step limit ({snap.max_steps})"
                parts.append(f"The episode ended at {reason}.")
        feedback = " ".join(p for p in parts if p)
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
        board = render(snap.level, (snap.player, snap.boxes), self.box_on_target_char)
        if self.compact and _ring_is_wall(snap.level):
            rows = board.split("\n")[1:-1]
            board = "\n".join(row[1:-1] for row in rows)
        return board

    # ------------------------------------------------------------------ reflection

    def ground_reflection(
        self, history: list[StepResult], mode: str = "diagnosis"
    ) -> GroundedReflection | None:
        """Where the trajectory went wrong, from the solver and the deadlock tests.

        The trajectory is replayed from the level's start through the parsed actions recorded in
        ``info["action"]``. Solvability can only be lost, never regained, so a binary search over
        the distinct box layouts finds the first unsolvable state with few solver calls; the
        reflection rolls back to just before the move that lost the level. Without such a move, an
        episode that ended, or a running one whose best state (fewest moves still needed) is at
        least ``stall_window`` steps old (an exploration depth cut-off), is diagnosed as stalled and
        rolled back to that best state (or to its first wasted move when it progressed to the end).
        A running episode still making progress, a solved one, or one the solver cannot decide
        gets ``None``.

        ``mode="diagnosis"`` (default) says which step went wrong and why (which box is deadlocked:
        corner, wall without target, frozen group; or how many steps were wasted), ending with a
        fixed slot ``Avoid: <that step's move>.``: feedback an agent could derive from its own
        trajectory, never the solver's plan. ``mode="oracle"`` adds the solver's shortest-push plan
        from the rollback point ("do X next"): expert relabelling, an ablation only."""
        if mode not in GROUNDING_MODES:
            raise UserError("ground_reflection(mode)", f"unknown mode {mode!r}", f"use one of {GROUNDING_MODES}")
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
            if first_bad is not None:
                return self._deadlock_reflection(level, states, history, first_bad, mode)
            return self._stall_reflection(level, states, history, mode)
        except SolverBudgetExceeded:
            return None

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

    def _deadlock_reflection(self, level, states, history, bad: int, mode: str) -> GroundedReflection:
        before, after = states[bad - 1], states[bad]
        direction = history[bad - 1].info["action"]
        moved = sorted(after[1] - before[1])
        if mode == "oracle":  # the original text, with the solver's plan: an ablation
            where = f" to (row {level.rc(moved[0])[0]}, col {level.rc(moved[0])[1]})" if moved else ""
            deadlock = find_deadlock(level, after[1])
            why = describe_deadlock(level, deadlock) if deadlock is not None else (
                "After it no sequence of moves can solve the level any more "
                "(the boxes can no longer all reach targets).")
            plan = self._solution(level, before)
            assert plan is not None  # states[bad - 1] is solvable by the binary search invariant
            text = (f"Step {bad} ({direction}) pushed a box{where} and lost the level. {why} "
                    f"Go back to before step {bad}. {_plan_text(plan)}")
            return GroundedReflection(rollback_step=bad - 1, experience=text, mode="oracle")
        deadlock = find_deadlock(level, after[1], moved[0]) if moved else None
        deadlock = deadlock or find_deadlock(level, after[1])
        if deadlock is None:
            why = "after it the boxes can no longer all reach targets"
        else:
            where = " and ".join(self._at(level, c) for c in deadlock.cells)
            why = {
                "corner": f"the box at {where} is in a corner that is not a target and can never move again",
                "dead_square": f"the box at {where} is against a wall with no target along it "
                               "and can only slide along that wall",
                "frozen": f"the boxes at {where} block each other against the walls and cannot move",
            }[deadlock.kind]
        pushed = f"pushed a box to {self._at(level, moved[0])}" if moved else "moved"
        text = (f"Step {bad} ({self.action_text(direction)}) {pushed}: {why}, so the level could not be "
                f"solved after it. Avoid: {self.action_text(direction)}.")
        return GroundedReflection(rollback_step=bad - 1, experience=text, mode="diagnosis")

    def _stall_reflection(self, level, states, history, mode: str) -> GroundedReflection | None:
        # Progress = moves the solver's plan still needs from the exact state (walking towards a box
        # counts, not only pushes); the best state is the first one with the fewest.
        cost = [len(self._solution(level, s).moves) for s in states]
        k = cost.index(min(cost))
        best = self._solution(level, states[k]).num_pushes
        last = len(states) - 1
        ended = history[-1].done
        if not ended and last - k < self.stall_window:
            return None  # still making progress: nothing to correct yet
        wasted = [i for i, r in enumerate(history, 1) if r.info.get("noop") or r.info.get("invalid")]
        if mode == "oracle":
            k_plan = 0 if k >= last else k
            plan = self._solution(level, states[k_plan])
            head = (f"No deadlock, but the episode ran out of steps: after step {k} the level needed "
                    f"{_pushes(best)} more and the {last - k} steps after it did not bring it closer. "
                    if k_plan > 0 else
                    "No deadlock, but the episode ran out of steps before solving the level. ")
            return GroundedReflection(rollback_step=k_plan, experience=head + f"Go back to step {k_plan}. "
                                      + _plan_text(plan), mode="oracle")
        n_wasted = f"{len(wasted)} of the {last} steps changed nothing (bumps or invalid replies)"
        if k < last:
            move = history[k].info["action"]
            slot = f" Avoid: {self.action_text(move)}." if move is not None else ""
            text = (f"Stalled: no progress after step {k}. The level still needed {_pushes(best)} then, and "
                    f"the {last - k} steps after it brought no box closer to a target; {n_wasted}.{slot}")
            return GroundedReflection(rollback_step=k, experience=text, mode="diagnosis")
        # progress until the end, just too slow: go back to the first wasted move, if there was one
        if not wasted:
            text = (f"Too slow: the level still needed {_pushes(best)} when the steps ran out, "
                    "though every step changed the board. Take fewer detours.")
            return GroundedReflection(rollback_step=0, experience=text, mode="diagnosis")
        j = wasted[0]
        move = history[j - 1].info["action"]
        slot = f" Avoid: {self.action_text(move)}." if move is not None else " Reply with a valid move."
        text = (f"Too slow: the level still needed {_pushes(best)} when the steps ran out; {n_wasted}, "
                f"the first at step {j}.{slot}")
        return GroundedReflection(rollback_step=j - 1, experience=text, mode="diagnosis")

    # ------------------------------------------------------------------ helpers

    def _at(self, level: Level, cell: int) -> str:
        """``(row r, col c)`` in the coordinates of the board this prompt style shows."""
        r, c = level.rc(cell)
        if self.compact and _ring_is_wall(level):
            r, c = r - 1, c - 1
        return f"(row {r}, col {c})"

    def _deadlock_text(self, level: Level, deadlock: Deadlock) -> str:
        if not self.compact:
            return describe_deadlock(level, deadlock)
        where = " and ".join(self._at(level, c) for c in deadlock.cells)
        kind = {"corner": "in a corner", "dead_square": "stuck on a wall", "frozen": "frozen"}[deadlock.kind]
        return f"Deadlock: box {where} {kind}."

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


def _ring_is_wall(level: Level) -> bool:
    """Whether the outer ring of the board is all wall (then the compact board leaves it out)."""
    h, w = level.height, level.width
    if h < 3 or w < 3:
        return False
    ring = [c for c in range(w)] + [(h - 1) * w + c for c in range(w)]
    ring += [r * w for r in range(h)] + [r * w + w - 1 for r in range(h)]
    return all(c in level.walls for c in ring)


def _quote(text: Any) -> str:
    s = str(text).strip().replace("\n", " ")
    return repr(s if len(s) <= 60 else s[:57] + "...")


def sokoban_tasks(
    split: str = "train",
    n: int = 8,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_boxes: int | None = None,
    min_pushes: int | None = None,
    max_pushes: int | None = -1,
    max_steps: int | None = None,
    difficulty: str | None = None,
) -> list[Task]:
    """``n`` generated, solver-checked tasks; the split picks disjoint level seeds.

    Level seed = ``(seed * 1_000_000 + i) * 3 + split_index`` (train 0, val 1, test 2), so the
    splits never share a seed, and each task spec carries the level picture and its optimal push
    count. ``difficulty`` ("easy", "medium", "hard": ``DIFFICULTIES``) sets the board, boxes, push
    range and step limit; explicit arguments override it. Without it the defaults are the tiny
    demo set ("easy": 6x6, one box, 2..4 pushes, 30 steps). ``max_pushes=None`` removes the upper
    bound (``-1``, the default, means "from the difficulty"). Task ids name the difficulty when
    one is given (``sokoban-hard-test-5``), so levels of different splits never share an id."""
    splits = {"train": 0, "val": 1, "test": 2}
    if split not in splits:
        raise UserError("sokoban_tasks(split)", f"unknown split {split!r}", f"use one of {sorted(splits)}")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise UserError("sokoban_tasks(difficulty)", f"unknown difficulty {difficulty!r}",
                        f"use one of {sorted(DIFFICULTIES)}")
    if n < 0 or n >= 1_000_000:
        raise UserError("sokoban_tasks(n)", f"must be in [0, 1e6), got {n}")
    preset = DIFFICULTIES[difficulty or "easy"]
    given = dict(height=height, width=width, num_boxes=num_boxes, min_pushes=min_pushes, max_steps=max_steps)
    p = {k: (preset[k] if v is None else v) for k, v in given.items()}
    p["max_pushes"] = preset["max_pushes"] if max_pushes == -1 else max_pushes
    name = f"sokoban-{difficulty}-{split}" if difficulty else f"sokoban-{split}"
    tasks = []
    for i in range(n):
        level_seed = (seed * 1_000_000 + i) * 3 + splits[split]
        gen = generate_level(level_seed, p["height"], p["width"], p["num_boxes"], p["min_pushes"], p["max_pushes"])
        spec = {
            "level": render(gen.level, gen.level.start),
            "seed": level_seed,
            "height": p["height"],
            "width": p["width"],
            "num_boxes": p["num_boxes"],
            "optimal_pushes": gen.optimal_pushes,
            "solution": list(gen.solution.moves),
            "max_steps": p["max_steps"],
            "split": split,
            **({"difficulty": difficulty} if difficulty else {}),
        }
        tasks.append(Task(task_id=f"{name}-{level_seed}", env="sokoban", spec=spec))
    return tasks
