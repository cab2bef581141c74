"""Exploration trees: the ``leafe.tree/1`` schema and its append-only, resumable JSONL file.

One tree per task, one JSON object per line::

    {"schema": "leafe.tree/1", "task_id": str, "env": str, "tokenizer": str,
     "prompt_ids": [int],   # system + task + first observation, template applied, WITHOUT the
                            # assistant generation header
     "header_ids": [int],   # the assistant generation header (e.g. "<|im_start|>assistant\\n")
     "nodes": [Node], "success": bool, "stats": {...}, "meta": {...}}

A node is one agent step. The tokens of the trajectory ending at node n are (built by
``leafe_fast.trajectory.Trajectory.from_nodes``, the one place that writes this layout)::

    prompt_ids + concat over the root path p of
        (p.experience_ids or []) + header_ids + p.action_ids + p.observation_ids

``action_ids`` are the tokens exactly as generated (ending with the end-of-turn token when the
model stopped); ``observation_ids`` are the template delta of the next user message (environment
observation and feedback), without the next generation header. ``experience_ids`` is set only on
the first node of a branch: the template delta of the experience message, inserted right at the
rollback point, so the branch prompt is the parent's prefix plus new tokens. Only ``action_ids``
are ever training targets.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from leafe_fast.checks import lock_or_refuse
from leafe_fast.errors import UserError

SCHEMA = "leafe.tree/1"
_MAX_ID = 2**31 - 1  # token ids are stored as int32


class TreeFormatError(UserError):
    """A trees.jsonl line that does not follow ``leafe.tree/1``; the message names the file and line."""

    def __init__(self, where: str, problem: str | None = None, fix: str | None = None):
        if problem is None:  # one preformatted message
            where, problem = "", where
        super().__init__(where, problem, fix)


@dataclass
class Node:
    id: int
    parent: int  # -1: first step after reset
    step: int  # env steps taken before this action (= depth; root-level nodes have step 0)
    action_ids: list[int]
    observation_ids: list[int]
    action: str = ""
    observation: str = ""
    reward: float = 0.0
    done: bool = False
    success: bool = False
    feedback: str = ""
    experience_ids: list[int] | None = None
    experience: str | None = None
    rollback_from: int | None = None  # node whose reflection created this branch (None: not a branch start)
    branch: int = 0  # 0 = the first rollout, k = the k-th branch (or independent rollout) of the task
    invalid: bool = False  # the env flagged the action invalid (info["invalid"]): unparseable, or refused (a wall bump)
    noop: bool = False  # the env flagged it a no-op (info["noop"]): the state did not change
    parsed_action: str | None = None  # the env's canonical reading of the action (info["action"]), if any
    truncated: bool = False  # generation stopped at the action token limit, not at an end-of-turn token

    @property
    def is_branch_start(self) -> bool:
        """The first node after a rollback (its experience message, if any, sits right before it)."""
        return self.rollback_from is not None or bool(self.experience_ids)


@dataclass
class Tree:
    task_id: str
    env: str
    prompt_ids: list[int]
    header_ids: list[int]
    nodes: list[Node] = field(default_factory=list)
    tokenizer: str = ""
    success: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    # --- structure -------------------------------------------------------------------------
    def children(self) -> dict[int, list[int]]:
        """parent id -> child ids (root-level nodes under -1), in node order."""
        out: dict[int, list[int]] = {}
        for n in self.nodes:
            out.setdefault(n.parent, []).append(n.id)
        return out

    def path(self, node_id: int) -> list[Node]:
        """The nodes from the first step down to ``node_id``."""
        by_id = {n.id: n for n in self.nodes}
        out = []
        cur = node_id
        while cur != -1:
            node = by_id[cur]
            out.append(node)
            cur = node.parent
        return out[::-1]

    def leaves(self) -> list[Node]:
        parents = {n.parent for n in self.nodes}
        return [n for n in self.nodes if n.id not in parents]

    def path_token_ids(self, node_id: int, *, with_experience: bool = True) -> list[int]:
        """Token ids of the trajectory ending at ``node_id`` (inclusive of its observation)."""
        from leafe_fast.trajectory import Trajectory

        path = self.path(node_id)
        return Trajectory.from_nodes(self.prompt_ids, self.header_ids, path, with_experience=with_experience).ids

    # --- (de)serialisation -----------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> "Tree":
        if not isinstance(d, dict):
            raise TreeFormatError(f"expected a JSON object (one tree), got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise TreeFormatError(f"schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        raw_nodes = d.get("nodes")
        if not isinstance(raw_nodes, list) or not all(isinstance(n, dict) for n in raw_nodes):
            raise TreeFormatError("'nodes' must be a list of JSON objects")
        _check_keys(Tree, d, "tree")
        for i, n in enumerate(raw_nodes):
            _check_keys(Node, n, f"node {i}")
        tree = cls(**{**d, "nodes": [Node(**n) for n in raw_nodes]})
        tree.validate()
        return tree

    def validate(self) -> None:
        """Structure and types; raises ``TreeFormatError`` naming the task and node."""
        if not isinstance(self.task_id, str) or not isinstance(self.env, str):
            raise TreeFormatError(f"task_id and env must be strings, got {self.task_id!r} and {self.env!r}")
        if not isinstance(self.success, bool):
            raise TreeFormatError(f"task {self.task_id}: success must be true or false, got {self.success!r}")
        _check_ids(self.prompt_ids, f"task {self.task_id}: prompt_ids")
        _check_ids(self.header_ids, f"task {self.task_id}: header_ids")
        for n in self.nodes:
            for name in ("action_ids", "observation_ids"):
                _check_ids(getattr(n, name), f"task {self.task_id}: node {n.id} {name}")
            if n.experience_ids is not None:
                _check_ids(n.experience_ids, f"task {self.task_id}: node {n.id} experience_ids")
            if isinstance(n.id, bool) or not isinstance(n.id, int) or isinstance(n.parent, bool) \
                    or not isinstance(n.parent, int) or isinstance(n.step, bool) or not isinstance(n.step, int):
                raise TreeFormatError(f"task {self.task_id}: node ids, parents and steps must be integers")
            for name in ("done", "success", "invalid", "noop", "truncated"):
                if not isinstance(getattr(n, name), bool):
                    raise TreeFormatError(f"task {self.task_id}: node {n.id} {name} must be true or false, "
                                          f"got {getattr(n, name)!r}")
            if n.rollback_from is not None and (isinstance(n.rollback_from, bool)
                                                or not isinstance(n.rollback_from, int)):
                raise TreeFormatError(f"task {self.task_id}: node {n.id} rollback_from must be an integer or null")
        ids = [n.id for n in self.nodes]
        if ids != list(range(len(ids))):
            raise TreeFormatError(f"task {self.task_id}: node ids must be 0..n-1 in order")
        for n in self.nodes:
            if not (-1 <= n.parent < n.id):
                raise TreeFormatError(f"task {self.task_id}: node {n.id} has parent {n.parent}")
            want = 0 if n.parent == -1 else self.nodes[n.parent].step + 1
            if n.step != want:
                raise TreeFormatError(f"task {self.task_id}: node {n.id} step {n.step} != {want}")


def _check_keys(cls: type, record: dict, what: str) -> None:
    """Unknown or missing keys of a tree/node record, named (not a Python ``TypeError``)."""
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(set(record) - names)
    missing = sorted(required - set(record))
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
            ([f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise TreeFormatError(f"{what}: {'; '.join(parts)}")


def _check_ids(ids: Any, where: str) -> None:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TreeFormatError(f"{where} must be a list of integers")
    if ids and (min(ids) < 0 or max(ids) > _MAX_ID):
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise TreeFormatError(f"{where} holds token id {bad}, outside [0, {_MAX_ID}]")


def iter_trees(path: str | os.PathLike) -> Iterator[Tree]:
    """Read a trees.jsonl file; a malformed line raises TreeFormatError naming file and line.

    A final line without a newline is either a write cut off mid-way (a killed run: not valid
    JSON, skipped with a warning, it was never acknowledged as written) or a complete record
    whose newline is missing (a file written by other tools: read like any other line).
    """
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise TreeFormatError(str(path), "is a directory, not a trees.jsonl file", "pass the file explore wrote")
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    cut = bool(tail.strip()) and not _is_json(tail)
    if tail.strip() and not cut:
        complete.append(tail)
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise TreeFormatError(f"{path}:{lineno}", f"not valid JSON ({msg})",
                                  "pass a trees.jsonl written by `leafe-fast explore`") from None
        try:
            yield Tree.from_dict(record)
        except TreeFormatError as e:
            raise TreeFormatError(f"{path}:{lineno}", e.problem, e.fix) from None
    if cut:  # after the complete lines: a file that is not a trees file at all gets its error, not this
        warnings.warn(
            f"{path}:{len(lines)}: skipping an unterminated, incomplete last line (an append cut "
            "off by a killed run)",
            RuntimeWarning,
            stacklevel=2,
        )


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False
    return True


def read_trees(path: str | os.PathLike) -> list[Tree]:
    return list(iter_trees(path))


class TreeWriter:
    """Appends one tree per line with flush + fsync, so a finished tree survives a kill.

    A partial last line left by an earlier killed run is cut away on open, so new records start
    on a line of their own; a complete last record that only lacks its newline gets one.

    The file is locked (``flock``, exclusive) while the writer is open: a second run on the same file
    gets a ``UserError`` instead of writing every task twice. The lock dies with the process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(str(self.path), "is a directory", "pass a file path for the trees, e.g. runs/x/trees.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()  # removed again on close if nothing was written
        self._failed = False
        self._f = self.path.open("ab")
        try:
            lock_or_refuse(self._f, str(self.path))
            self.finished: set[str] = {t.task_id for t in iter_trees(self.path)}
            self._truncate_partial_tail()
        except BaseException:
            self._f.close()
            raise

    def _truncate_partial_tail(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                if _is_json(data[keep:]):  # read as a tree by iter_trees: keep it
                    f.write(b"\n")
                else:
                    f.truncate(keep)

    def write(self, tree: Tree) -> None:
        """Append one tree. A failed write (disk full, quota, I/O error) cuts the file back to its last
        complete line and is a ``UserError`` naming the file: a rerun resumes from the trees kept."""
        tree.validate()
        end = os.fstat(self._f.fileno()).st_size
        try:
            self._f.write(tree.to_json().encode() + b"\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            self._failed = True
            try:
                os.ftruncate(self._f.fileno(), end)
            except OSError:
                pass  # the partial line is cut away by the next open
            raise UserError(str(self.path), f"cannot be written ({e.strerror or e})",
                            "free disk space or pass another --out, then rerun (finished trees are kept)") from None
        self.finished.add(tree.task_id)

    def close(self) -> None:
        """Close (and unlock); a file this writer created and left empty is removed, so a run that
        failed before its first tree leaves no empty trees file that looks like a finished one."""
        if self._f.closed:
            return
        try:
            if self._created and self.path.is_file() and self.path.stat().st_size == 0:
                self.path.unlink()
        finally:
            try:
                self._f.close()
            except OSError:
                if not self._failed:  # else: the failed write's bytes, still buffered, cannot go either
                    raise

    def __enter__(self) -> "TreeWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
