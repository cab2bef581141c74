"""Problems in the CodeContests JSONL format: the user's own files, and the ones shipped with us.

One JSON object per line. Fields read (everything else, e.g. ``incorrect_solutions``,
``cf_rating``, ``source``, is ignored):

``name``                 str, required; the task id, unique within a file.
``description``          str, required; the statement shown to the agent.
``public_tests``         ``{"input": [str], "output": [str]}``; shown in the statement and run first.
``private_tests``        same shape; hidden tests.
``generated_tests``      same shape; hidden tests too (``include_generated=False`` leaves them out).
``time_limit``           ``{"seconds": int, "nanos": int}`` or a number of seconds or null.
``memory_limit_bytes``   int; 0 or null means "use the environment's default".
``solutions``            ``{"language": [int], "solution": [str]}``; only Python 3 ones (language
                         3 in CodeContests' enum) are kept, as known-good references.

At least one test (public or hidden) is required, otherwise success could never be judged.
``.jsonl.gz`` files are read too. The problems under ``leafe_fast/envs/problems/`` were written for
this project (statements, reference solutions, tests whose outputs come from the reference).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from leafe_fast.envs.base import Task

__all__ = ["Problem", "TestCase", "builtin_problems", "builtin_tasks", "load_problems", "load_tasks"]

PYTHON3 = 3  # CodeContests' Language enum: 1 PYTHON (2), 2 CPP, 3 PYTHON3, 4 JAVA


@dataclass(frozen=True)
class TestCase:
    input: str
    output: str


@dataclass(frozen=True)
class Problem:
    name: str
    description: str
    public_tests: tuple[TestCase, ...]
    hidden_tests: tuple[TestCase, ...]
    time_limit_seconds: float | None = None
    memory_limit_bytes: int | None = None
    solutions: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, record: Any, where: str = "record", include_generated: bool = True) -> "Problem":
        """Build from one CodeContests-format object; errors name ``where`` and the field."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("name", "description"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        public = _tests(record, "public_tests", where)
        hidden = _tests(record, "private_tests", where)
        if include_generated:
            hidden += _tests(record, "generated_tests", where)
        # Already-normalized specs (see to_record) carry their hidden tests under this name.
        hidden += _tests(record, "hidden_tests", where)
        if not public and not hidden:
            raise ValueError(f"{where}: problem {record['name']!r} has no tests")
        return cls(
            name=record["name"],
            description=record["description"],
            public_tests=public,
            hidden_tests=hidden,
            time_limit_seconds=_time_limit(record.get("time_limit"), where),
            memory_limit_bytes=record.get("memory_limit_bytes") or None,
            solutions=_python_solutions(record.get("solutions"), where),
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready spec for :class:`Task` (hidden tests under ``hidden_tests``, no solutions)."""
        return {
            "name": self.name,
            "description": self.description,
            "public_tests": _pack(self.public_tests),
            "hidden_tests": _pack(self.hidden_tests),
            "time_limit": self.time_limit_seconds,
            "memory_limit_bytes": self.memory_limit_bytes,
        }

    def to_task(self) -> Task:
        return Task(task_id=self.name, env="code", spec=self.to_record())


def _pack(tests: Iterable[TestCase]) -> dict[str, list[str]]:
    tests = list(tests)
    return {"input": [t.input for t in tests], "output": [t.output for t in tests]}


def _tests(record: dict, key: str, where: str) -> tuple[TestCase, ...]:
    block = record.get(key)
    if block is None:
        return ()
    if not isinstance(block, dict):
        raise ValueError(f"{where}: field {key!r} must be an object with 'input' and 'output' lists")
    inputs, outputs = block.get("input", []), block.get("output", [])
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(f"{where}: {key}.input and {key}.output must be lists")
    if len(inputs) != len(outputs):
        raise ValueError(f"{where}: {key} has {len(inputs)} inputs but {len(outputs)} outputs")
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        if not isinstance(x, str) or not isinstance(y, str):
            raise ValueError(f"{where}: {key}[{i}] input and output must be strings")
    return tuple(TestCase(x, y) for x, y in zip(inputs, outputs))


def _time_limit(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, dict):
        seconds = float(value.get("seconds", 0) or 0) + float(value.get("nanos", 0) or 0) / 1e9
    else:
        raise ValueError(f"{where}: time_limit must be a number or {{seconds, nanos}}, got {value!r}")
    return seconds if seconds > 0 else None


def _python_solutions(value: Any, where: str) -> tuple[str, ...]:
    if not value:
        return ()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: solutions must be {{'language': [...], 'solution': [...]}}")
    langs, sols = value.get("language", []), value.get("solution", [])
    return tuple(s for lang, s in zip(langs, sols) if lang == PYTHON3 and isinstance(s, str))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_problems(path: str | Path, include_generated: bool = True) -> list[Problem]:
    """Read a CodeContests-format JSONL (or .jsonl.gz) file; blank lines are skipped.

    A malformed line raises ``ValueError`` naming the file, the line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file at {path}")
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            problem = Problem.from_record(record, where, include_generated)
            if problem.name in first_line:
                raise ValueError(f"{where}: duplicate problem name {problem.name!r} (first on line {first_line[problem.name]})")
            first_line[problem.name] = number
            problems.append(problem)
    return problems


def load_tasks(path: str | Path, include_generated: bool = True) -> list[Task]:
    """:func:`load_problems` as :class:`Task` objects for :class:`~leafe_fast.envs.code.CodeEnv`."""
    return [p.to_task() for p in load_problems(path, include_generated)]


def builtin_problems() -> list[Problem]:
    """The problems shipped in ``leafe_fast/envs/problems/*.jsonl``, sorted by file then line."""
    folder = resources.files("leafe_fast.envs").joinpath("problems")
    problems: list[Problem] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".jsonl"):
            with resources.as_file(entry) as path:
                problems += load_problems(path)
    return problems


def builtin_tasks() -> list[Task]:
    return [p.to_task() for p in builtin_problems()]
