"""The from-scratch base policy: behaviour cloning of solver trajectories, perturbed, in the exact
prompt format that exploration and evaluation use, with a share of experience-reading samples.

Why perturbed: a policy cloned from optimal play alone would leave nothing to learn from exploration
and would never have seen a wasted move. With probability ``noise`` a step takes a uniformly random
move instead of the solver's (never one that makes the level unsolvable); after a move that changed
the board the solver re-plans from there. Every move is a target, noise included: the policy
imitates an imperfect player. The CPU preset sets ``noise`` to 0 (measured: with 0.15 the action loss
had not left chance within the CPU budget); its policy is imperfect through its size and training
budget alone (greedy action accuracy about 0.6), which the base arm's pass@1 shows.

Why experience samples: LEAFE's Stage 1 inserts an experience message at a rollback point; a policy
that never saw one cannot use it, and branching reduces to resampling. An experience sample is the
conversation up to a state ``k`` of a cloned trajectory, then the diagnosis the environment gives for a
mistake made there (``SokobanEnv.ground_reflection``, diagnosis mode, exactly the text the grounded
reflector hands exploration), then the solver's continuation from ``k``; only the continuation is a
target. Two kinds: a push that loses the level (deadlock diagnosis) and a stretch of wasted moves
(stall diagnosis). Both diagnoses end with the fixed slot ``Avoid: <move>.`` naming the abandoned
move, which the continuation never starts with (samples where the solver's move equals it are
dropped), so the slot is a copyable signal at a fixed distance from the next action.

``dense``: observation (and template) tokens after the first supervised step are targets too. With
action tokens alone the action loss sits near ln 4 for hundreds of steps on the CPU (issue 12); the
board prediction task gives a denser gradient that breaks that plateau.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from leafe_fast.data.columns import Sample
from leafe_fast.envs.base import Task
from leafe_fast.envs.sokoban_levels import DIRECTIONS, apply_move, is_solved, solve
from leafe_fast.trajectory import open_trajectory


@dataclass
class CloneConfig:
    noise: float = 0.15  # share of random moves in cloned trajectories
    experience_share: float = 0.35  # share of samples that carry an experience message
    stall_share: float = 0.25  # of the experience samples: stall diagnoses (the rest: deadlocks)
    dense: bool = True  # observation tokens are targets too


def _state(env: Any) -> tuple[int, frozenset]:
    s = env.snapshot()
    return (s.player, s.boxes)


def _plan(level: Any, state: tuple[int, frozenset]) -> list[str] | None:
    sol = solve(level, state, max_states=50_000)
    return None if sol is None else list(sol.moves)


def cloned_steps(env: Any, task: Task, rng: random.Random, noise: float) -> list[tuple[str, Any]] | None:
    """A perturbed solver trajectory as ``[(direction, StepResult)]``; None if it did not finish."""
    env.reset(task)
    level = env.snapshot().level
    plan = list(task.spec.get("solution") or _plan(level, level.start) or [])
    out = []
    while True:
        state = _state(env)
        direction = plan[0] if plan else None
        if direction is None or rng.random() < noise:
            candidates = list(DIRECTIONS)
            rng.shuffle(candidates)
            for d in candidates:
                nxt = apply_move(level, state, d).state
                if nxt[1] == state[1] or _plan(level, nxt) is not None:  # never a losing push
                    direction = d
                    break
        result = env.step(env.action_text(direction))
        out.append((direction, result))
        if result.done:
            return out if result.success else None
        if plan and direction == plan[0]:
            plan.pop(0)
        elif not result.info["noop"]:
            plan = _plan(level, _state(env)) or []


def _losing_moves(level: Any, state: tuple[int, frozenset]) -> list[str]:
    out = []
    for d in DIRECTIONS:
        o = apply_move(level, state, d)
        if o.pushed_from >= 0 and not is_solved(level, o.state[1]) and _plan(level, o.state) is None:
            out.append(d)
    return out


def _replay(env: Any, task: Task, directions: Sequence[str]) -> list[Any]:
    env.reset(task)
    return [env.step(env.action_text(d)) for d in directions]


def experience_case(env: Any, task: Task, steps: list[tuple[str, Any]], rng: random.Random,
                    stall: bool) -> tuple[int, str, list[str]] | None:
    """(rollback step k, diagnosis text, solver continuation from k) for a mistake made after ``k``
    steps of ``steps``; None when this trajectory offers no such case."""
    dirs = [d for d, _ in steps[:-1]]
    order = list(range(len(dirs)))
    rng.shuffle(order)
    for k in order[:6]:
        history = _replay(env, task, dirs[:k])
        level = env.snapshot().level
        state = _state(env)
        if stall:
            # wasted moves: bumps and back-and-forth walks, no push, for a window's worth of steps
            extra = []
            for _ in range(env.stall_window + rng.randint(0, 3)):
                options = [d for d in DIRECTIONS if apply_move(level, _state(env), d).pushed_from < 0]
                d = rng.choice(options)
                extra.append(d)
                history.append(env.step(env.action_text(d)))
                if history[-1].done:
                    break
        else:
            losing = _losing_moves(level, state)
            if not losing:
                continue
            history.append(env.step(env.action_text(rng.choice(losing))))
        if history[-1].success:
            continue
        g = env.ground_reflection(history)
        if g is None:
            continue
        _replay(env, task, [r.info["action"] for r in history[: g.rollback_step]])  # back to the rollback state
        cont = _plan(level, _state(env))
        if not cont:
            continue
        avoided = history[g.rollback_step].info["action"]
        if cont[0] == avoided:
            continue  # the slot would contradict the continuation
        return g.rollback_step, g.experience, [r.info["action"] for r in history[: g.rollback_step]] + cont
    return None


def build_clone_samples(env: Any, chat: Any, tasks: Sequence[Task], config: CloneConfig, seed: int,
                        ) -> tuple[list[Sample], dict[str, Any]]:
    """One sample per task (plain or with experience, drawn by ``experience_share``)."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    stats = {"plain": 0, "deadlock_experience": 0, "stall_experience": 0, "skipped": 0, "tokens": 0,
             "targets": 0, "action_targets": 0}
    for task in tasks:
        steps = cloned_steps(env, task, rng, config.noise)
        if steps is None:
            stats["skipped"] += 1
            continue
        case = None
        kind = "plain"
        if rng.random() < config.experience_share:
            stall = rng.random() < config.stall_share
            case = experience_case(env, task, steps, rng, stall)
            kind = "stall_experience" if stall else "deadlock_experience"
        if case is None:
            kind = "plain"
            dirs, start, exp = [d for d, _ in steps], 0, None
        else:
            start, exp, dirs = case
        sample = _tokenize(env, chat, task, dirs, start, exp, config.dense)
        if sample is None:
            stats["skipped"] += 1
            continue
        samples.append(sample)
        stats[kind] += 1
        stats["tokens"] += len(sample)
        stats["targets"] += sample.num_targets
        stats["action_targets"] += int(sample.meta["action_targets"])
    return samples, stats


def _tokenize(env: Any, chat: Any, task: Task, dirs: Sequence[str], start: int, experience: str | None,
              dense: bool) -> Sample | None:
    traj = open_trajectory(chat, env.instructions(), env.reset(task))
    dense_from = None
    last = None
    for i, d in enumerate(dirs):
        action = chat.encode_action(env.action_text(d))
        exp_ids = chat.message_ids(_experience_message(experience)) if (experience and i == start) else None
        result = env.step(env.action_text(d))
        if i == start:
            dense_from = len(traj.ids) + (len(exp_ids) if exp_ids else 0)
        traj.add_step(action, result, experience_ids=exp_ids, target=i >= start)
        last = result
        if result.done:
            break
    if last is None or not last.success:
        return None
    ids, mask = traj.arrays(trim=not dense)
    action_targets = int(mask.sum())
    if dense and dense_from is not None:
        mask = mask.copy()
        mask[dense_from + 1:] = True  # the first header token is predicted from the context before it
    return Sample(ids, mask, meta={"task_id": task.task_id, "experience": experience is not None,
                                   "action_targets": action_targets})


def _experience_message(experience: str) -> str:
    from leafe_fast.trajectory import experience_message

    return experience_message(experience)


def action_accuracy(lm: Any, samples: Sequence[Sample], chat: Any, limit: int = 64) -> float:
    """Share of action tokens (first token of each action) predicted exactly (greedy), on ``samples``."""
    import torch

    hits = total = 0
    for s in list(samples)[:limit]:
        ids = torch.as_tensor(s.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            logits = lm(ids).logits[0]
        pred = logits.argmax(-1)
        header = chat.header_ids
        n = len(header)
        arr = s.input_ids
        for i in range(n, len(arr)):
            if list(arr[i - n:i]) == header and s.meta.get("action_targets") and i > 0:
                if not _is_target_step(s, i):
                    continue
                hits += int(pred[i - 1] == int(arr[i]))
                total += 1
    return hits / total if total else float("nan")


def _is_target_step(sample: Sample, i: int) -> bool:
    return bool(sample.target_mask[i])
