"""``explore()``: Stage-1 reflective tree exploration over many tasks at once.

The scheduler keeps up to ``config.concurrency`` tasks in flight. Each round it collects the one
pending request of every active task (an action or a reflection) and sends them to the engine in a
single ``generate`` call, so the engine always sees a full batch; then it steps each task's env with
its result (optionally on ``env_workers`` threads). A task that finishes is written to
``trees.jsonl`` at once (flush + fsync) and its slot goes to the next task.

Resuming: the ids already in the output file are skipped, so a killed run rerun with the same
arguments loses no finished tree and writes none twice. Trees of tasks in flight at the kill are
redone from scratch (with the same seeds, so a deterministic engine reproduces them). The output file
is locked while a run writes it: a second run on the same file stops with a ``UserError``.

One task never aborts the run: an exception raised by its environment ends that task's tree
(``stop_reason`` ``"env_error"``, the error in ``meta["error"]``), counted in the summary.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from leafe_fast.data.schema import Tree, TreeWriter
from leafe_fast.engines.base import GenerationRequest, GenerationResult, RolloutEngine
from leafe_fast.envs.base import Task
from leafe_fast.errors import UserError
from leafe_fast.explore.config import ExploreConfig
from leafe_fast.explore.progress import ExploreProgress
from leafe_fast.explore.reflectors import GroundedReflector, Reflector, make_reflector
from leafe_fast.explore.summary import ExploreSummary
from leafe_fast.explore.task import TaskExplorer, TaskGen


def as_chat_format(tokenizer_or_chat: Any) -> tuple[Any, str]:
    """(ChatFormat, tokenizer name) from a ChatFormat or a Hugging Face tokenizer."""
    if all(hasattr(tokenizer_or_chat, a) for a in ("header_ids", "message_ids", "observation_ids")):
        chat = tokenizer_or_chat
        tok = getattr(chat, "tokenizer", None)
        name = getattr(chat, "name", "") or getattr(tok, "name_or_path", "") or ""
        return chat, str(name)
    from leafe_fast.data.chat import ChatFormat

    return ChatFormat.from_tokenizer(tokenizer_or_chat), str(getattr(tokenizer_or_chat, "name_or_path", ""))


def _env_factory(env: Any, config: ExploreConfig) -> Callable[[], Any]:
    if isinstance(env, str):
        from leafe_fast.envs.registry import make_env

        return lambda: make_env(env, **config.env_kwargs)
    if isinstance(env, type):
        return env  # a class: one instance per task in flight
    if all(hasattr(env, a) for a in ("reset", "step", "snapshot", "restore")):
        if config.concurrency > 1:
            raise TypeError(
                "explore: an env instance serves one task at a time; with concurrency > 1 pass an env "
                "name or a factory (e.g. lambda: MyEnv()) so each task in flight gets its own env"
            )
        return lambda: env
    if callable(env):
        return env
    raise TypeError(f"explore: env must be a registered name, an env factory or an Env, got {type(env).__name__}")


class _LockedChat:
    """Serialises ChatFormat calls when envs step on several threads: a fast tokenizer shared
    across threads can fail with "Already borrowed"."""

    def __init__(self, chat: Any):
        self._chat = chat
        self._lock = threading.Lock()
        self.header_ids = list(chat.header_ids)
        self.stop_ids = list(chat.stop_ids)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._chat, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


@dataclass
class _Slot:
    task: Task
    env: Any
    gen: TaskGen
    pending: GenerationRequest | None = None
    tree: Tree | None = None


def _advance(slot: _Slot, result: GenerationResult | None) -> _Slot:
    """Run the task until its next request (or its end)."""
    try:
        slot.pending = next(slot.gen) if result is None else slot.gen.send(result)
    except StopIteration as stop:
        slot.pending, slot.tree = None, stop.value
    except Exception as e:
        raise RuntimeError(f"explore: task {slot.task.task_id!r} failed: {type(e).__name__}: {e}") from e
    return slot


def explore(
    tasks: Iterable[Task],
    env: str | Callable[[], Any] | Any,
    engine: RolloutEngine,
    tokenizer_or_chat: Any,
    out_path: str | Path,
    config: ExploreConfig | Mapping[str, Any] | None = None,
    *,
    reflector: Reflector | None = None,
) -> ExploreSummary:
    """Explore every task not already in ``out_path``; append one tree per task; return totals.

    ``env``: a registered env name (``leafe_fast.envs.registry``), a zero-argument factory, or (only
    with ``concurrency=1``) one Env instance. ``tokenizer_or_chat``: a ``ChatFormat`` or a tokenizer
    with a chat template. ``reflector`` overrides the one ``config.reflector`` names.
    """
    if config is None:
        config = ExploreConfig()
    elif isinstance(config, Mapping):
        config = ExploreConfig.from_dict(config)
    config.validate()
    chat, tokenizer_name = as_chat_format(tokenizer_or_chat)
    if config.env_workers > 1:
        chat = _LockedChat(chat)
    new_env = _env_factory(env, config)
    if config.mode == "independent":
        reflector = None
    else:
        reflector = reflector or make_reflector(config)

    tasks = list(tasks)
    seen: set[str] = set()
    for t in tasks:
        if t.task_id in seen:
            raise ValueError(f"explore: task id {t.task_id!r} appears twice; task ids must be unique")
        seen.add(t.task_id)

    budgets = _budgets_from(config.budget_from, tasks) if config.budget_from else {}
    from leafe_fast.envs.registry import action_token_limit

    summary = ExploreSummary(out_path=str(out_path), tasks=len(tasks), mode=config.mode,
                             reflector="none" if reflector is None else str(getattr(reflector, "name", "")),
                             ablation=reflector is not None and bool(getattr(reflector, "ablation", False)))
    start = time.perf_counter()
    with TreeWriter(out_path) as writer:
        todo = deque(t for t in tasks if t.task_id not in writer.finished)
        summary.skipped = len(tasks) - len(todo)
        progress = ExploreProgress(len(todo), enabled=config.progress)
        pool = ThreadPoolExecutor(config.env_workers) if config.env_workers > 1 else None
        free_envs: list[Any] = []
        active: list[_Slot] = []

        def advance_all(pairs: list[tuple[_Slot, GenerationResult | None]]) -> None:
            if pool is not None and len(pairs) > 1:
                list(pool.map(lambda p: _advance(*p), pairs))
            else:
                for slot, result in pairs:
                    _advance(slot, result)
            for slot, _ in pairs:
                if slot.tree is not None:
                    writer.write(slot.tree)
                    summary.add_tree(slot.tree)
                    progress.update(summary)
                    active.remove(slot)
                    free_envs.append(slot.env)

        try:
            while todo or active:
                starting = []
                while todo and len(active) < config.concurrency:
                    task = todo.popleft()
                    task_env = free_envs.pop() if free_envs else new_env()
                    _check_reflector(reflector, task_env)
                    limit = action_token_limit(task.env or (env if isinstance(env, str) else ""))
                    explorer = TaskExplorer(task, task_env, chat, reflector, config, tokenizer_name=tokenizer_name,
                                            action_tokens=limit, budget=budgets.get(task.task_id))
                    slot = _Slot(task=task, env=task_env, gen=explorer.run())
                    active.append(slot)
                    starting.append((slot, None))
                if starting:
                    advance_all(starting)
                    continue  # tasks that ended at once free their slots for the next ones
                batch = [slot.pending for slot in active]
                results = engine.generate(batch)
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"explore: the engine returned {len(results)} results for {len(batch)} requests"
                    )
                for req, res in zip(batch, results):
                    if res.request_id and res.request_id != req.request_id:
                        raise RuntimeError(
                            f"explore: the engine answered request {req.request_id!r} with a result for "
                            f"{res.request_id!r}; results must come in request order"
                        )
                summary.add_batch(len(batch))
                advance_all(list(zip(active[:], results)))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            summary.wall_s = time.perf_counter() - start
            progress.close()
            for e in free_envs + [s.env for s in active]:
                close = getattr(e, "close", None)
                if callable(close) and not (e is env):
                    close()
    if config.progress:
        print(summary.format(), file=sys.stderr)
    if summary.cut_actions:
        warnings.warn(
            f"explore: {summary.cut_actions} action(s) stopped at the token limit (max_new_tokens) instead of "
            "ending their turn; raise --max-new-tokens if the env's actions are longer", RuntimeWarning,
            stacklevel=2)
    if summary.env_errors:
        warnings.warn(f"explore: {summary.env_errors} task(s) ended by an environment error (see meta.error in "
                      f"{out_path})", RuntimeWarning, stacklevel=2)
    return summary


def _check_reflector(reflector: Any, env: Any) -> None:
    if isinstance(reflector, GroundedReflector) and not callable(getattr(env, "ground_reflection", None)):
        raise UserError("--reflector", f"{reflector.name!r} needs Env.ground_reflection, which "
                        f"{type(env).__name__} lacks", "use --reflector llm")


def _budgets_from(path: str, tasks: list[Task]) -> dict[str, dict[str, Any]]:
    """Per-task budgets equal to what a LEAFE run spent (its trees' stats): the equal-budget baseline."""
    from leafe_fast.data.schema import read_trees

    if not Path(path).is_file():
        raise UserError("--budget-from", f"{path} is not a file", "pass the trees.jsonl of a LEAFE explore run")
    spent: dict[str, dict[str, Any]] = {}
    for tree in read_trees(path):
        if tree.meta.get("mode", "leafe") != "leafe":
            raise UserError("--budget-from", f"{path} holds {tree.meta.get('mode')!r} trees",
                            "pass the trees of a LEAFE run (mode leafe)")
        steps, tokens = int(tree.stats.get("steps", 0)), int(tree.stats.get("generated_tokens", 0))
        spent[tree.task_id] = {"max_steps": max(1, steps), "max_tokens": max(1, tokens), "source": str(path)}
    missing = [t.task_id for t in tasks if t.task_id not in spent]
    if missing:
        raise UserError("--budget-from", f"{path} has no tree for {len(missing)} task(s), e.g. {missing[0]!r}",
                        "use the same --env, --split, --tasks and --task-seed as the LEAFE run")
    return spent
