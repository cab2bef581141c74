"""Episodes of a policy in lock step on ``FastLM``: evaluation, the experience gate, the random walk.

The token stream of an episode is exactly the one ``leafe_fast.eval.evaluate`` and exploration build
(``ChatFormat`` deltas of the messages in ``leafe_fast.explore.prompts``): prompt, then per turn the
generation header, the generated action, and the observation delta. ``tests/test_repro.py`` checks
greedy episodes against ``evaluate`` with the stock ``HFEngine``. An episode may start from a saved
state with a conversation prefix (a rollback point, with or without an experience message): that is
how the gate measures whether the policy reads its experience.

Template deltas are memoised by message text (boards repeat across episodes), which removes the
per-turn chat-template rendering that would otherwise cost more than the model on the CPU.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from leafe_fast.envs.base import Task
from leafe_fast.eval import pass_at_k
from leafe_fast.trajectory import experience_message, observation_message, opening_messages
from leafe_fast.repro.fastlm import FastLM, compact_cache, pad_rows, sample_tokens


class MemoChat:
    """``ChatFormat`` deltas with a cache keyed by message text (same ids, computed once)."""

    def __init__(self, chat: Any):
        self.chat = chat
        self.header_ids = list(chat.header_ids)
        self.stop_ids = set(chat.stop_ids)
        self._obs: dict[tuple[bool, str], list[int]] = {}
        self._msg: dict[str, list[int]] = {}
        self._prompt: dict[tuple[str, str], list[int]] = {}

    def prompt_ids(self, instructions: str, observation: str) -> list[int]:
        key = (instructions, observation)
        if key not in self._prompt:
            self._prompt[key] = list(self.chat.prompt_ids(opening_messages(instructions, observation)))
        return self._prompt[key]

    def observation_ids(self, action_ids: Sequence[int], content: str) -> list[int]:
        key = (self.chat.ends_turn(action_ids), content)
        if key not in self._obs:
            self._obs[key] = list(self.chat.observation_ids(action_ids, content))
        return self._obs[key]

    def experience_ids(self, experience: str) -> list[int]:
        """The experience message's delta (``leafe_fast.trajectory.experience_message``)."""
        if experience not in self._msg:
            self._msg[experience] = list(self.chat.message_ids(experience_message(experience)))
        return self._msg[experience]

    def decode_action(self, ids: Sequence[int]) -> str:
        return self.chat.decode_action(ids)


def episode_key(task_id: str, index: int) -> int:
    """The noise key of episode ``index`` of a task: the same in every arm."""
    return (zlib.crc32(task_id.encode()) * 1009 + index) & 0x7FFFFFFF


@dataclass
class Episode:
    """One episode to play: from ``reset`` (default) or from ``snapshot`` with the conversation
    ``prefix_ids`` (which must end where the next generation header goes)."""

    task: Task
    key: int
    snapshot: Any = None
    prefix_ids: list[int] | None = None
    turn0: int = 0  # turns already taken (noise counter and step count of a continuation)
    # results
    success: bool = False
    steps: int = 0
    ret: float = 0.0
    gen_tokens: int = 0
    actions: list[str] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # with keep_ids: the whole conversation
    step_ends: list[int] = field(default_factory=list)  # with keep_ids: len(ids) after each step
    prompt_len: int = 0  # with keep_ids: tokens before the first step
    action_ids: list[list[int]] = field(default_factory=list)  # with keep_ids: each generated action
    cut: bool = False


def play(
    lm: FastLM,
    chat: MemoChat,
    env: Any,
    episodes: list[Episode],
    *,
    seed: int,
    temperature: float = 1.0,
    max_new_tokens: int = 4,
    max_turns: int = 100,
    chunk: int = 256,
    keep_ids: bool = False,
    keep_history: bool = False,
) -> list[Episode]:
    """Play every episode to its end (env done, or ``max_turns`` turns: then ``cut``)."""
    for start in range(0, len(episodes), chunk):
        _play_chunk(lm, chat, env, episodes[start:start + chunk], seed, temperature, max_new_tokens,
                    max_turns, keep_ids, keep_history)
    return episodes


def _play_chunk(lm, chat, env, eps, seed, temperature, max_new, max_turns, keep_ids, keep_history) -> None:
    pending: list[list[int]] = []
    snaps: list[Any] = []
    for e in eps:
        if e.snapshot is None:
            obs = env.reset(e.task)
            e.snapshot = env.snapshot()
            prefix = chat.prompt_ids(env.instructions(), obs)
        else:
            if e.prefix_ids is None:
                raise ValueError("Episode: a snapshot needs its conversation prefix_ids")
            prefix = list(e.prefix_ids)
        pending.append(prefix + chat.header_ids)
        snaps.append(e.snapshot)
        if keep_ids:
            e.ids = list(prefix)
            e.prompt_len = len(prefix)
    cache = lm.new_cache(len(eps), max(len(p) for p in pending) + 512)
    lengths = torch.zeros(len(eps), dtype=torch.int64)
    slots = list(range(len(eps)))  # cache row -> episode index, -1 once the episode is over
    keys = torch.tensor([e.key for e in eps], dtype=torch.int64)
    turn0 = torch.tensor([e.turn0 for e in eps], dtype=torch.int64)
    turn = 0
    while any(i >= 0 for i in slots):
        alive = torch.tensor([i >= 0 for i in slots])
        # dead rows get one dummy token at their end, which their (frozen) length lets the next write overwrite
        ids, counts = pad_rows([pending[i] if i >= 0 else [0] for i in slots])
        need = int(lengths.max()) + ids.shape[1] + max_new  # padded slots are written too
        if need > cache[0].shape[3]:
            grow = max(need, cache[0].shape[3] * 3 // 2) - cache[0].shape[3]
            cache = [torch.cat([kv, kv.new_zeros(*kv.shape[:3], grow, kv.shape[4])], 3) for kv in cache]
        logits = lm.forward_step(ids, counts, lengths, cache)
        lengths += counts * alive
        row_keys = keys[[max(i, 0) for i in slots]]
        row_turns = turn0[[max(i, 0) for i in slots]] + turn
        gen: list[list[int]] = [[] for _ in slots]
        live = [r for r, i in enumerate(slots) if i >= 0]
        for pos in range(max_new):
            toks = sample_tokens(logits, temperature, seed, row_keys, row_turns, pos)
            live = [r for r in live if not _append_stop(gen[r], int(toks[r]), chat.stop_ids)]
            if not live or pos == max_new - 1:
                break
            step = torch.zeros(len(slots), 1, dtype=torch.int64)
            fed = torch.zeros(len(slots), dtype=torch.int64)
            for r in live:
                step[r, 0] = gen[r][-1]
                fed[r] = 1
            logits = lm.forward_step(step, torch.ones(len(slots), dtype=torch.int64), lengths, cache)
            lengths += fed
        for r, i in enumerate(slots):
            if i < 0:
                continue
            e, out = eps[i], gen[r]
            env.restore(snaps[i])
            result = env.step(chat.decode_action(out))
            snaps[i] = env.snapshot()
            e.steps += 1
            e.ret += float(result.reward)
            e.gen_tokens += len(out)
            e.actions.append(result.info.get("action") if isinstance(result.info, dict) else None)
            if keep_history:
                e.history.append(result)
            obs_ids = chat.observation_ids(out, observation_message(result))
            if keep_ids:
                e.ids += chat.header_ids + out + obs_ids
                e.step_ends.append(len(e.ids))
                e.action_ids.append(list(out))
            if result.done or e.turn0 + turn + 1 >= max_turns:  # turns of the whole episode, rollback prefix included
                e.success = bool(result.success)
                e.cut = not result.done
                slots[r] = -1
                continue
            # the last generated token was sampled but not fed yet: it leads the next input
            pending[i] = [out[-1]] + obs_ids + chat.header_ids
        turn += 1
        live_rows = [r for r, i in enumerate(slots) if i >= 0]
        if live_rows and len(live_rows) <= 3 * len(slots) // 4:  # drop finished rows now and then
            idx = torch.tensor(live_rows, dtype=torch.int64)
            cache = compact_cache(cache, idx)
            lengths = lengths[idx]
            slots = [slots[r] for r in live_rows]
    for i, e in enumerate(eps):
        e.snapshot = snaps[i]


def _append_stop(gen: list[int], tok: int, stops: set[int]) -> bool:
    gen.append(tok)
    return tok in stops


# --- evaluation ------------------------------------------------------------------------------


def evaluate_policy(lm: FastLM, chat: MemoChat, env: Any, tasks: Sequence[Task], n: int, seed: int,
                    max_turns: int, chunk: int = 256, temperature: float = 1.0,
                    max_new_tokens: int = 4) -> dict[str, Any]:
    """``n`` episodes per task; successes per task and pass@k for k = 1, 2, 4, ..., n."""
    eps = [Episode(t, episode_key(t.task_id, j)) for t in tasks for j in range(n)]
    play(lm, chat, env, eps, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens,
         max_turns=max_turns, chunk=chunk)
    return summarize(tasks, n, [e.success for e in eps], steps=sum(e.steps for e in eps),
                     gen_tokens=sum(e.gen_tokens for e in eps), cut=sum(e.cut for e in eps))


def ks_for(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def summarize(tasks: Sequence[Task], n: int, successes: Sequence[bool], **extra: Any) -> dict[str, Any]:
    c = np.asarray(successes, dtype=np.int64).reshape(len(tasks), n).sum(1)
    return {
        "n": n,
        "num_tasks": len(tasks),
        "success_rate": float(c.sum() / (n * len(tasks))),
        "pass@k": {str(k): float(np.mean(pass_at_k(n, c, k))) for k in ks_for(n)},
        "successes": {t.task_id: int(x) for t, x in zip(tasks, c)},
        **extra,
    }


def random_walk(env: Any, tasks: Sequence[Task], n: int, seed: int, max_turns: int) -> dict[str, Any]:
    """A uniform random walk over u/d/l/r, ``n`` episodes per task: the split's floor."""
    rng = random.Random(seed)
    wins = []
    steps = 0
    for t in tasks:
        for _ in range(n):
            env.reset(t)
            for _ in range(max_turns):
                r = env.step(rng.choice(("up", "down", "left", "right")))
                steps += 1
                if r.done:
                    break
            wins.append(bool(r.done and r.success))
    return summarize(tasks, n, wins, steps=steps)
