"""Environments by name: ``make_env("sokoban")``, ``list_tasks("sokoban", "train", 8, seed=0)``.

Every entry imports its module only when used, so the optional adapters (ALFWorld, ScienceWorld,
WebShop, TextArena) cost nothing unless chosen, and a missing package fails with an error that
names it. Users add their own environments with :func:`register_env`.

Built in: ``sokoban``, ``code`` (``leafe_fast.envs.code.CodeEnv``; tasks from its ``list_tasks`` if
it defines one, else the problems shipped in ``leafe_fast/envs/problems/`` or a user's JSONL),
``alfworld``, ``scienceworld``, ``webshop``, ``textarena``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable

from leafe_fast.envs.base import Env, Task


DEFAULT_ACTION_TOKENS = 128  # action token limit of an env registered without one


@dataclass(frozen=True)
class EnvEntry:
    """How to build an environment and list its tasks; both callables import lazily."""

    make: Callable[..., Env]
    tasks: Callable[..., list[Task]]
    description: str = ""
    action_tokens: int = DEFAULT_ACTION_TOKENS  # token limit of one action (exploration and evaluation)
    mask_invalid_actions: bool = False  # Stage-2 default: invalid / no-op moves are not training targets


_ENTRIES: dict[str, EnvEntry] = {}


def register_env(
    name: str,
    make: Callable[..., Env],
    tasks: Callable[..., list[Task]],
    description: str = "",
    overwrite: bool = False,
    *,
    action_tokens: int = DEFAULT_ACTION_TOKENS,
    mask_invalid_actions: bool = False,
) -> None:
    """Add an environment. ``tasks(split=, n=, seed=, **kwargs)`` must give disjoint splits.

    ``action_tokens``: the longest action the env expects (a move: a few tokens; a program: many);
    exploration and evaluation cut generation there and warn when it happens. ``mask_invalid_actions``:
    whether Stage 2 by default leaves actions the env flagged ``info["invalid"]``/``info["noop"]`` out
    of the training targets."""
    if name in _ENTRIES and not overwrite:
        raise ValueError(f"environment {name!r} is already registered (pass overwrite=True to replace it)")
    if action_tokens < 1:
        raise ValueError(f"register_env: action_tokens must be >= 1, got {action_tokens}")
    _ENTRIES[name] = EnvEntry(make, tasks, description, action_tokens, mask_invalid_actions)


def available_envs() -> list[str]:
    """Registered names (whether or not their optional packages are installed)."""
    return sorted(_ENTRIES)


def _entry(name: str) -> EnvEntry:
    if name not in _ENTRIES:
        raise KeyError(f"unknown environment {name!r}; registered: {', '.join(available_envs())}")
    return _ENTRIES[name]


def action_token_limit(name: str) -> int:
    """The env's action token limit (``DEFAULT_ACTION_TOKENS`` for names not registered)."""
    entry = _ENTRIES.get(name)
    return entry.action_tokens if entry is not None else DEFAULT_ACTION_TOKENS


def masks_invalid_actions(name: str) -> bool:
    """Whether Stage 2 masks the env's invalid / no-op actions by default (False for unknown names)."""
    entry = _ENTRIES.get(name)
    return entry.mask_invalid_actions if entry is not None else False


def check_task_args(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``UserError`` for keys the env's task list does not take, before anything expensive runs."""
    _check_args(name, _entry(name).tasks, kwargs, "--task-arg", {"split", "n", "seed"})


def check_env_args(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``UserError`` for keys the env's constructor does not take (checked without building it)."""
    _check_args(name, _entry(name).make, kwargs, "--env-arg", set())


def _check_args(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], flag: str, reserved: set[str]) -> None:
    from leafe_fast.errors import UserError

    taken = sorted(set(kwargs) & reserved)
    if taken:
        raise UserError(flag, f"{taken} is set by its own flag, not by {flag}", f"drop {flag} {taken[0]}=...")
    target = getattr(fn, "target", None)
    try:
        target = target() if callable(target) else fn
        sig = inspect.signature(target)
    except (ImportError, TypeError, ValueError):
        return  # an optional package is missing or the signature is hidden: the call itself will say
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - reserved
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(flag, f"environment {name!r} does not take {unknown}",
                        f"use only {sorted(accepted) or 'no extra arguments'}")


def make_env(name: str, **kwargs: Any) -> Env:
    """A fresh environment instance; ``kwargs`` go to its constructor."""
    return _entry(name).make(**kwargs)


def list_tasks(name: str, split: str = "train", n: int = 8, seed: int = 0, **kwargs: Any) -> list[Task]:
    """``n`` tasks of ``split`` ("train", "val" or "test"), deterministic in ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _entry(name).tasks(split=split, n=n, seed=seed, **kwargs)


def env_from_flags(name: str, kwargs: dict[str, Any]) -> Env:
    """``make_env`` for command-line input: the constructor's ``TypeError``/``ValueError`` is a bad
    ``--env-arg`` value (a ``UserError`` naming the flag); build one early as a probe, before a model loads."""
    from leafe_fast.errors import UserError

    check_env_args(name, kwargs)
    try:
        return make_env(name, **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError("--env-arg", f"{name}: {e}", "see the env's constructor for the values it takes") from None
    except (ImportError, FileNotFoundError) as e:
        raise _setup_error(name, e) from None


def tasks_from_flags(name: str, split: str, n: int, seed: int, kwargs: dict[str, Any]) -> list[Task]:
    """``list_tasks`` for command-line input: a bad ``--task-arg`` value or an empty split is a ``UserError``."""
    from leafe_fast.errors import UserError

    check_task_args(name, kwargs)
    try:
        tasks = list_tasks(name, split, n, seed=seed, **kwargs)
    except (TypeError, ValueError) as e:  # a bad value, or a task list that hides its keys behind **kwargs
        if isinstance(e, UserError):
            raise
        raise UserError("--task-arg", f"{name} tasks: {e}", "see the env's task list for the values it takes") from None
    except (ImportError, FileNotFoundError) as e:
        raise _setup_error(name, e) from None
    if not tasks:
        raise UserError("--split", f"environment {name!r} has no {split!r} tasks", "choose another split")
    return tasks


def _setup_error(name: str, e: ImportError | FileNotFoundError) -> Exception:
    """An env whose optional package or data is not installed: the env's own message, as one line. An
    import failing inside leafe_fast itself is a bug and keeps its traceback."""
    from leafe_fast.errors import UserError

    if isinstance(e, ImportError) and (e.name or "").startswith("leafe_fast"):
        return e
    return UserError(f"--env {name}", f"{e}", "install what it names, or choose another --env")


# ---------------------------------------------------------------------------- built-ins


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        target = getattr(importlib.import_module(module), attr, None)
        if target is None:
            raise ImportError(f"{module} does not define {attr!r}, which the environment registry expects")
        return target(*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    call.target = lambda: getattr(importlib.import_module(module), attr)  # for argument checks
    return call


def _adapter(name: str, attr: str) -> tuple[Callable[..., Env], Callable[..., list[Task]]]:
    def make(**kwargs: Any) -> Env:
        from leafe_fast.envs import adapters

        return getattr(adapters, attr)(**kwargs)

    def tasks(**kwargs: Any) -> list[Task]:
        from leafe_fast.envs import adapters

        return getattr(adapters, attr).tasks(**kwargs)

    return make, tasks


register_env(
    "sokoban",
    _lazy("leafe_fast.envs.sokoban", "SokobanEnv"),
    _lazy("leafe_fast.envs.sokoban", "sokoban_tasks"),
    "procedural, solver-checked Sokoban levels with deadlock feedback",
    action_tokens=32,
    mask_invalid_actions=True,
)
def _code_tasks(split: str, n: int, seed: int, path: str | None = None, **kwargs: Any) -> list[Task]:
    """The code env's own ``list_tasks`` when it has one; otherwise the shipped problems (or the
    CodeContests JSONL at ``path``), split by a stable hash of the task id (1/4 test, 1/4 val,
    1/2 train), shuffled by ``seed``. Returns fewer than ``n`` when the split has fewer."""
    code = importlib.import_module("leafe_fast.envs.code")
    own = getattr(code, "list_tasks", None)
    if own is not None:
        return own(split=split, n=n, seed=seed, **({"path": path} if path else {}), **kwargs)
    if kwargs:
        raise TypeError(f"code tasks take only split, n, seed and path; got {sorted(kwargs)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; use one of ['test', 'train', 'val']")
    from leafe_fast.envs import codecontests

    pool = codecontests.load_tasks(path) if path else codecontests.builtin_tasks()
    bucket = {"test": (0,), "val": (1,), "train": (2, 3)}[split]
    chosen = [t for t in pool if int(hashlib.sha256(t.task_id.encode()).hexdigest(), 16) % 4 in bucket]
    random.Random(seed).shuffle(chosen)
    return chosen[:n]


register_env(
    "code",
    _lazy("leafe_fast.envs.code", "CodeEnv"),
    _code_tasks,
    "programming problems with public and hidden tests, run in a sandbox",
    action_tokens=1024,
)
for _name, _attr, _text in [
    ("alfworld", "ALFWorldEnv", "ALFWorld household text games (pip install alfworld)"),
    ("scienceworld", "ScienceWorldEnv", "ScienceWorld science tasks (pip install scienceworld)"),
    ("webshop", "WebShopEnv", "WebShop text shopping (install from the WebShop repository)"),
    ("textarena", "TextArenaEnv", "single-player TextArena games (pip install textarena)"),
]:
    register_env(_name, *_adapter(_name, _attr), _text)
