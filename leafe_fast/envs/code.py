"""A CodeContests-style programming environment: each step submits a whole program.

``reset(task)`` shows the statement and the public tests. ``step(action)`` takes the Python
program from the action (the last ```python block; tolerant of other fences, a missing closing
fence, or no fence at all), runs it in the :mod:`~leafe_fast.envs.sandbox` on the public tests,
and, if they all pass, on the hidden tests. An episode is up to ``max_attempts`` submissions; it
ends at the first accepted one.

Feedback names the compile or runtime error, or the first failing public test with its input,
the expected and the actual output (each truncated to ``feedback_chars``). A failing hidden test is
named only by its number and the kind of failure ("Runtime error on hidden test 3."): no input,
output, error message or size, in the feedback, in ``info`` or in grounded reflections, so neither
training data nor evaluation leaks hidden tests. ``reveal_hidden_tests=True`` (off by default;
``--env-arg reveal_hidden_tests=true``) shows them like public ones, for debugging a problem set.

Reward: 1.0 when every hidden test passes (success). Otherwise 0.0, or, with
``partial_credit=True``, the fraction of all tests (public and hidden) passed; that mode runs every
test on every attempt instead of stopping at the first failing set.

Outputs are compared as whitespace-separated tokens (:func:`outputs_match`, which never raises):
an expected integer must be matched by the same integer; other tokens match exactly or, when both
are finite decimal numbers, within 1e-6 absolute or relative error (the usual checker).

Snapshots are immutable records of the attempts so far; judging is cached per (problem, program,
limits), so replaying the same actions after ``restore`` gives the same observations even for a
program whose running time sits at the time limit.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from leafe_fast.envs.base import GROUNDING_MODES, GroundedReflection, Observation, StepResult, Task
from leafe_fast.envs.codecontests import Problem, TestCase
from leafe_fast.envs.sandbox import Limits, RunResult, Sandbox, Verdict
from leafe_fast.errors import UserError

__all__ = ["CodeEnv", "extract_program", "outputs_match"]

WRONG_ANSWER = "wrong_answer"
NO_CODE = "no_code"
ACCEPTED = "accepted"

_FENCE_OPEN = re.compile(r"^[ \t]*```+[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*$", re.M)
_PYTHON_TAGS = {"python", "python3", "py", "py3"}


def extract_program(text: str) -> str | None:
    """The program in a model's answer: the last ```python block, else the last untagged block,
    else (no fences at all) the whole text. An unclosed last fence runs to the end of the text.
    None when there is nothing, or only blocks in other languages."""
    blocks: list[tuple[str, str]] = []
    pos = 0
    while True:
        opening = _FENCE_OPEN.search(text, pos)
        if opening is None:
            break
        body_start = opening.end() + 1
        closing = re.compile(r"^[ \t]*```+[ \t]*$", re.M).search(text, body_start)
        end = closing.start() if closing else len(text)
        blocks.append((opening.group(1).lower(), text[body_start:end]))
        pos = closing.end() if closing else len(text)
    if not blocks:
        stripped = text.strip()
        return stripped + "\n" if stripped else None
    for wanted in (_PYTHON_TAGS, {""}):
        for tag, body in reversed(blocks):
            if tag in wanted and body.strip():
                return body.rstrip() + "\n"
    return None


# Only ASCII counts: str.isdigit() accepts '²' and other digits int() refuses, and int() of a long
# digit string raises past 4300 digits; the judge never converts an integer, it compares digits.
_ASCII_WS = re.compile(rb"[ \t\n\r\x0b\x0c]+")
_INT = re.compile(rb"([+-]?)0*([0-9]+)")
_FLOAT = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    return text.encode("utf-8", "surrogatepass")  # any str, lone surrogates included


def _int_key(token: bytes) -> bytes | None:
    """An ASCII integer as sign + digits without leading zeros (-0 is 0); None if not one."""
    m = _INT.fullmatch(token)
    if m is None:
        return None
    digits = m.group(2).lstrip(b"0") or b"0"
    return (b"-" if m.group(1) == b"-" and digits != b"0" else b"") + digits


def _float(token: bytes) -> float | None:
    if _FLOAT.fullmatch(token) is None:  # float() alone would take '1_0', 'nan', ' 1', '١'
        return None
    try:
        value = float(token)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def outputs_match(expected: str | bytes, actual: str | bytes, tolerance: float = 1e-6) -> bool:
    """Token-wise comparison (see the module docstring). Never raises: any output, binary or not
    valid UTF-8 included, is either a match or a wrong answer. Tokens are split on ASCII
    whitespace; an expected ASCII integer must be the same integer (compared as normalised digit
    strings, so of any length); other tokens match exactly or, when both are ASCII decimal
    numbers, within ``tolerance`` absolute or relative error."""
    want = [t for t in _ASCII_WS.split(_as_bytes(expected)) if t]
    got = [t for t in _ASCII_WS.split(_as_bytes(actual)) if t]
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if a == b:
            continue
        key = _int_key(a)
        if key is not None:  # an integer answer must be that integer
            if _int_key(b) != key:
                return False
            continue
        x, y = _float(a), _float(b)
        if x is None or y is None or abs(x - y) > tolerance * max(1.0, abs(x)):
            return False
    return True


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


@dataclass(frozen=True)
class Judgement:
    """The outcome of one submission; ``failing`` describes the first failing test, if any."""

    verdict: str
    passed: int
    total: int
    feedback: str
    failing: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict == ACCEPTED


@dataclass(frozen=True)
class Attempt:
    code: str | None
    judgement: Judgement
    reward: float


@dataclass(frozen=True)
class CodeEnvState:
    """What ``snapshot`` returns: immutable, picklable, cheap."""

    task: Task | None
    attempts: tuple[Attempt, ...] = ()
    done: bool = False


@dataclass
class CodeEnv:
    """See the module docstring. ``limits`` are the defaults; a problem's own time and memory
    limits replace ``cpu_seconds`` and ``memory_bytes`` (capped by ``max_cpu_seconds``)."""

    max_attempts: int = 3
    limits: Limits = field(default_factory=lambda: Limits(cpu_seconds=2, wall_seconds=6))
    max_cpu_seconds: float = 4.0
    partial_credit: bool = False
    reveal_hidden_tests: bool = False
    feedback_chars: int = 300
    cache_size: int = 256
    sandbox: Sandbox | None = None
    name: str = "code"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if isinstance(self.limits, dict):  # from a config file or --env-arg limits='{"cpu_seconds": 1}'
            unknown = sorted(set(self.limits) - set(Limits.__dataclass_fields__))
            if unknown:
                raise UserError("code env limits", f"unknown fields {unknown}",
                                f"use only {sorted(Limits.__dataclass_fields__)}")
            try:
                self.limits = Limits(**self.limits)
            except (TypeError, ValueError) as e:
                raise UserError("code env limits", str(e), "give positive numbers") from None
        if not isinstance(self.limits, Limits):
            raise UserError("code env limits", f"expected a Limits or a JSON object, got {type(self.limits).__name__}",
                            'e.g. --env-arg limits=\'{"cpu_seconds": 2}\'')
        if not isinstance(self.reveal_hidden_tests, bool):
            raise UserError("code env reveal_hidden_tests", f"expected true or false, got {self.reveal_hidden_tests!r}")
        if self.sandbox is None:
            self.sandbox = Sandbox(limits=self.limits)
        self._state = CodeEnvState(task=None)
        self._problem: Problem | None = None
        self._cache: OrderedDict[tuple, Judgement] = OrderedDict()

    # -- Env protocol ------------------------------------------------------------------------

    def instructions(self) -> str:
        return (
            "You solve competitive programming problems in Python 3. Each answer must contain one "
            "complete program in a single ```python code block; it reads the input from standard "
            "input and writes the answer to standard output. Only the standard library is "
            "available; there is no network and no file system outside the working directory. "
            f"You have up to {self.max_attempts} attempts; after a failed attempt you see the "
            "error or the first failing test, and you answer with a corrected full program."
        )

    def reset(self, task: Task) -> Observation:
        if task.env != self.name:
            raise ValueError(f"CodeEnv got a task for environment {task.env!r} (task {task.task_id!r})")
        self._problem = Problem.from_record(task.spec, where=f"task {task.task_id!r}")
        self._state = CodeEnvState(task=task)
        return self._statement()

    def step(self, action: str) -> StepResult:
        state = self._state
        if state.task is None or self._problem is None:
            raise RuntimeError("CodeEnv.step called before reset")
        if state.done:
            raise RuntimeError("CodeEnv.step called after the episode ended; call reset")
        code = extract_program(action)
        judgement = self._judge(code)
        success = judgement.accepted
        if success:
            reward = 1.0
        elif self.partial_credit and judgement.total:
            reward = judgement.passed / judgement.total
        else:
            reward = 0.0
        attempts = state.attempts + (Attempt(code, judgement, reward),)
        done = success or len(attempts) >= self.max_attempts
        self._state = CodeEnvState(task=state.task, attempts=attempts, done=done)
        n = len(attempts)
        if success:
            observation = f"{judgement.feedback}\nThe problem is solved."
        elif done:
            observation = f"{judgement.feedback}\nAttempt {n} of {self.max_attempts} failed; no attempts left."
        else:
            observation = (
                f"{judgement.feedback}\nAttempt {n} of {self.max_attempts} failed. Answer with a corrected "
                "complete program in a ```python block."
            )
        info = {
            "verdict": judgement.verdict,
            "passed": judgement.passed,
            "total": judgement.total,
            "attempt": n,
            "failing": judgement.failing,
            "signature": _signature(judgement),
        }
        return StepResult(observation, reward, done, success, judgement.feedback, info)

    def snapshot(self) -> CodeEnvState:
        return self._state

    def restore(self, snapshot: CodeEnvState) -> None:
        if not isinstance(snapshot, CodeEnvState):
            raise TypeError(f"CodeEnv.restore expects a CodeEnvState, got {type(snapshot).__name__}")
        if snapshot.task is not None and (self._state.task is None or snapshot.task != self._state.task):
            self._problem = Problem.from_record(snapshot.task.spec, where=f"task {snapshot.task.task_id!r}")
        self._state = snapshot

    def ground_reflection(self, history: list[StepResult], mode: str = "diagnosis") -> GroundedReflection | None:
        """Roll back to just before the first attempt of the trailing run of attempts that all
        failed the same way (same verdict on the same test), and state that failure as the
        experience. Attempts are independent programs, so the steps before that run stay useful
        context; re-trying after them with the failing case in mind is the counterfactual.

        ``mode="oracle"`` gives the same diagnosis: this environment hands out no reference
        solution, and a hidden test stays as hidden as in the feedback."""
        if mode not in GROUNDING_MODES:
            raise ValueError(f"ground_reflection mode must be one of {GROUNDING_MODES}, got {mode!r}")
        if not history or history[-1].success:
            return None
        signatures = [step.info.get("signature") for step in history]
        last = signatures[-1]
        first = len(history) - 1
        while last is not None and first > 0 and signatures[first - 1] == last:
            first -= 1
        info = history[-1].info
        if info.get("verdict") is None:  # not produced by this environment: fall back to the text
            return GroundedReflection(len(history) - 1, "The previous attempt failed: " + _clip(history[-1].feedback, 600))
        return GroundedReflection(first, _experience(info))

    # -- judging -----------------------------------------------------------------------------

    def _statement(self) -> str:
        p = self._problem
        assert p is not None
        parts = [p.description.strip(), ""]
        for i, t in enumerate(p.public_tests, 1):
            parts += [f"Example {i} input:", "```", t.input.rstrip("\n"), "```", f"Example {i} output:", "```", t.output.rstrip("\n"), "```", ""]
        limits = self._limits()
        parts.append(f"Time limit: {limits.cpu_seconds:g} s. Memory limit: {limits.memory_bytes >> 20} MiB.")
        parts.append("Answer with a complete Python 3 program in one ```python block.")
        return "\n".join(parts)

    def _limits(self) -> Limits:
        p = self._problem
        cpu = self.limits.cpu_seconds
        memory = self.limits.memory_bytes
        if p is not None and p.time_limit_seconds:
            cpu = min(p.time_limit_seconds, self.max_cpu_seconds)
        if p is not None and p.memory_limit_bytes:
            memory = max(p.memory_limit_bytes, 64 << 20)
        wall = max(self.limits.wall_seconds, 2 * cpu + 1)
        return Limits(
            cpu_seconds=cpu,
            wall_seconds=wall,
            memory_bytes=memory,
            max_processes=self.limits.max_processes,
            max_output_bytes=self.limits.max_output_bytes,
            max_open_files=self.limits.max_open_files,
            max_disk_bytes=self.limits.max_disk_bytes,
        )

    def _judge(self, code: str | None) -> Judgement:
        p = self._problem
        assert p is not None
        total = len(p.public_tests) + len(p.hidden_tests)
        if code is None:
            return Judgement(NO_CODE, 0, total, "No Python program found: put the complete program in a ```python block.")
        limits = self._limits()
        # Keyed by the whole problem (tests included), not its name: two files may reuse a name.
        key = (p, hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(), limits, self.partial_credit, self.reveal_hidden_tests)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        judgement = self._run_tests(code, p, limits)
        self._cache[key] = judgement
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return judgement

    def _run_tests(self, code: str, p: Problem, limits: Limits) -> Judgement:
        assert self.sandbox is not None
        sets = [(name, tests) for name, tests in (("public", p.public_tests), ("hidden", p.hidden_tests)) if tests]
        total = sum(len(tests) for _, tests in sets)
        if self.partial_credit:  # every test runs, in one launch
            flat = self.sandbox.run_many(code, [t.input for _, tests in sets for t in tests], limits=limits)
            per_set, start = [], 0
            for _, tests in sets:
                per_set.append(flat[start : start + len(tests)])
                start += len(tests)
        passed = 0
        first_failure: Judgement | None = None
        for k, (set_name, tests) in enumerate(sets):
            if self.partial_credit:
                results = per_set[k]
            else:  # the hidden set runs only after the public one passed
                results = self.sandbox.run_many(code, [t.input for t in tests], limits=limits, stop_on_error=True)
            for i, (test, result) in enumerate(zip(tests, results), 1):
                ok = result.ok and outputs_match(test.output, result.stdout)
                passed += ok
                if not ok and first_failure is None:
                    first_failure = self._failure(set_name, i, test, result, limits)
            if first_failure is not None and not self.partial_credit:
                break
        if first_failure is not None:
            return Judgement(first_failure.verdict, passed, total, first_failure.feedback, first_failure.failing)
        counts = f"{len(p.public_tests)} public, {len(p.hidden_tests)} hidden"
        return Judgement(ACCEPTED, passed, total, f"Accepted: all {total} tests passed ({counts}).")

    def _failure(self, set_name: str, index: int, test: TestCase, result: RunResult, limits: Limits) -> Judgement:
        verdict = WRONG_ANSWER if result.ok else result.verdict.value
        show = set_name == "public" or self.reveal_hidden_tests
        c = self.feedback_chars
        where = f"{set_name} test {index}"
        failing: dict[str, Any] = {"set": set_name, "index": index, "verdict": verdict}
        if result.verdict is Verdict.COMPILE_ERROR:
            detail = _compile_message(result.stderr)
            failing["detail"] = detail
            return Judgement(verdict, 0, 0, f"Compile error: {detail}\n{_clip(result.stderr.strip(), c)}", failing)
        if verdict == WRONG_ANSWER:
            headline = f"Wrong answer on {where}."
        elif result.verdict is Verdict.TIMEOUT:
            headline = f"Time limit exceeded on {where} (limit {limits.cpu_seconds:g} s of CPU time)."
        elif result.verdict is Verdict.MEMORY_LIMIT:
            headline = f"Memory limit exceeded on {where} (limit {limits.memory_bytes >> 20} MiB)."
        elif result.verdict is Verdict.OUTPUT_LIMIT:
            headline = f"Output limit exceeded on {where} (limit {limits.max_output_bytes} bytes)."
        elif not show:  # an error message or exit code could carry the hidden input out
            headline = f"{'Runtime error' if result.verdict is Verdict.RUNTIME_ERROR else 'Program killed'} on {where}."
        elif result.verdict is Verdict.RUNTIME_ERROR:
            headline = f"Runtime error on {where}: {result.describe().removeprefix('runtime error: ')}"
        else:
            headline = f"Program {result.describe()} on {where}."
        lines = [headline]
        if not show:  # the number and the kind of failure, nothing else
            failing["detail"] = verdict.replace("_", " ")
            return Judgement(verdict, 0, 0, headline, failing)
        failing["detail"] = "wrong answer" if verdict == WRONG_ANSWER else result.describe()
        failing["input_chars"] = len(test.input)
        failing.update(input=_clip(test.input, c), expected=_clip(test.output, c), actual=_clip(result.stdout, c))
        lines += ["Input:", failing["input"].rstrip("\n"), "Expected output:", failing["expected"].rstrip("\n")]
        if verdict == WRONG_ANSWER or result.stdout:
            lines += ["Your output:", failing["actual"].rstrip("\n") or "(nothing)"]
        if result.verdict is Verdict.RUNTIME_ERROR and result.stderr.strip():
            lines += ["Error output (end):", _clip_tail(result.stderr.strip(), c)]
        return Judgement(verdict, 0, 0, "\n".join(lines), failing)


def _clip_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _compile_message(stderr: str) -> str:
    """'SyntaxError: ... (line N)' from a Python traceback."""
    line_no = re.findall(r'line (\d+)', stderr)
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    message = last[-1].strip() if last else "the program does not compile"
    return f"{message} (line {line_no[-1]})" if line_no else message


def _signature(j: Judgement) -> str:
    if j.failing is None:
        return j.verdict
    return f"{j.verdict}@{j.failing['set']}:{j.failing['index']}"


def _experience(info: dict[str, Any]) -> str:
    """Advice for the branch, in the second person, from the failing attempt's info."""
    verdict = info.get("verdict")
    failing = info.get("failing") or {}
    where = f"{failing.get('set', '')} test {failing.get('index', '')}".strip()
    case = ""
    if "input" in failing:
        case = f" For input {failing['input']!r} the expected output is {failing['expected']!r}"
        if verdict == WRONG_ANSWER:
            case += f", but the program printed {failing['actual']!r}."
        else:
            case += "."
    if verdict == NO_CODE:
        return "The answer contained no program. Reply with the complete Python program in one ```python block."
    if verdict == Verdict.COMPILE_ERROR.value:
        return (f"The program did not compile: {failing.get('detail', '')}. Submit complete, syntactically valid "
                "Python 3 in one ```python block.")
    if verdict == WRONG_ANSWER:
        return (f"The program gave a wrong answer on {where}.{case} Work through this input by hand, find the "
                "case the algorithm mishandles, and fix it before submitting.")
    if verdict == Verdict.TIMEOUT.value:
        size = f" (input of {failing['input_chars']} characters)" if "input_chars" in failing else ""
        return (f"The program was too slow on {where}{size}. "
                "Use an asymptotically faster algorithm and read input with sys.stdin; avoid loops nested "
                "over the whole input.")
    if verdict == Verdict.MEMORY_LIMIT.value:
        return f"The program ran out of memory on {where}. Store less: avoid large intermediate lists and tables."
    if verdict == Verdict.OUTPUT_LIMIT.value:
        return f"The program printed far too much on {where}. Print only the answer, once."
    detail = failing.get("detail", "it crashed")
    return (f"The program failed on {where} ({detail}).{case} Handle this case (check edge cases such as "
            "minimal input, and the input format) before submitting.")
