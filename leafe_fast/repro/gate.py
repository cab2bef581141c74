"""The experience gate: does the policy act on an experience message at all?

From the policy's own failed episodes on validation levels, the diagnosis reflector (the environment's
``ground_reflection``, diagnosis mode, the same one exploration uses) gives a rollback point and an
experience. From that point the policy continues ``m`` times with the experience message in its
context and ``m`` times without, with the same sampling noise per pair (common random numbers), and
the two continuation success rates are compared. Reported beside them: how often the first
continuation move repeats the move the diagnosis says to avoid, with and without the message (the
direct measure of whether the policy reads the message's ``Avoid:`` slot).

Only if the gain clears ``min_gain`` can Stage 1's experience-guided branches be more than resampling;
the benchmark reports the figure either way and records whether the gate passed.
"""

from __future__ import annotations

from typing import Any, Sequence

from leafe_fast.envs.base import Task
from leafe_fast.repro.rollout import Episode, MemoChat, episode_key, play


def measure_gate(lm: Any, chat: MemoChat, env: Any, tasks: Sequence[Task], *, continuations: int, seed: int,
                 max_turns: int, chunk: int = 256, max_new_tokens: int = 2) -> dict[str, Any]:
    """Gate figures on ``tasks`` (one policy episode each; failures become rollback cases)."""
    first = [Episode(t, episode_key(t.task_id, 0)) for t in tasks]
    play(lm, chat, env, first, seed=seed + 7_919, max_turns=max_turns, chunk=chunk, keep_ids=True,
         max_new_tokens=max_new_tokens,
         keep_history=True)
    cases = []
    for e in first:
        if e.success:
            continue
        env.reset(e.task)
        g = env.ground_reflection(e.history)
        if g is None or g.rollback_step >= len(e.history):
            continue
        k = g.rollback_step
        env.reset(e.task)
        for r in e.history[:k]:
            env.step(env.action_text(r.info["action"]) if r.info.get("action") else "?")
        snap = env.snapshot()
        prefix = e.ids[: e.step_ends[k - 1] if k else e.prompt_len]
        avoided = e.history[k].info.get("action")
        cases.append((e.task, k, snap, prefix, g.experience, avoided))
    runs: dict[str, list[Episode]] = {"with": [], "without": []}
    for ci, (task, k, snap, prefix, exp, _) in enumerate(cases):
        for j in range(continuations):
            key = episode_key(task.task_id, 1_000 + j)
            runs["without"].append(Episode(task, key, snapshot=snap, prefix_ids=list(prefix), turn0=k))
            runs["with"].append(Episode(task, key, snapshot=snap, prefix_ids=list(prefix) + chat.experience_ids(exp),
                                        turn0=k))
    out: dict[str, Any] = {"levels": len(tasks), "failed_episodes": sum(not e.success for e in first),
                           "cases": len(cases), "continuations_per_case": continuations,
                           "first_episode_success": sum(e.success for e in first) / max(1, len(first))}
    for name, eps in runs.items():
        play(lm, chat, env, eps, seed=seed, max_turns=max_turns, chunk=chunk, max_new_tokens=max_new_tokens)
        n = max(1, len(eps))
        out[f"success_{name}"] = sum(e.success for e in eps) / n
        # only where the message names a move to avoid (a "too slow" diagnosis or an invalid reply names none)
        repeats = [e.actions[0] == cases[i // continuations][5] for i, e in enumerate(eps)
                   if e.actions and cases[i // continuations][5] and "Avoid:" in cases[i // continuations][4]]
        out[f"repeats_avoided_move_{name}"] = sum(repeats) / max(1, len(repeats))
    out["gain"] = out.get("success_with", 0.0) - out.get("success_without", 0.0)
    kinds = [c[4].split(":")[0].split(" ")[0] for c in cases]
    out["diagnosis_kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    return out


__all__ = ["measure_gate"]
