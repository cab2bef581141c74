"""CodeEnv: statements, judging and feedback, episodes, exact snapshot/restore, grounded
reflection; the CodeContests loader; the shipped problems are solvable by their references."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafe_fast.envs.base import Env, Task
from leafe_fast.envs.code import CodeEnv, extract_program, outputs_match
from leafe_fast.envs.codecontests import Problem, builtin_problems, builtin_tasks, load_problems, load_tasks
from leafe_fast.envs.sandbox import Limits

LIMITS = Limits(cpu_seconds=1, wall_seconds=3, memory_bytes=128 << 20, max_processes=8)

ADD = {
    "name": "add-two",
    "description": "Read two integers a and b and print a + b.",
    "public_tests": {"input": ["1 2\n", "10 -3\n"], "output": ["3\n", "7\n"]},
    "private_tests": {"input": ["0 0\n"], "output": ["0\n"]},
    "generated_tests": {"input": ["1000000000 1000000000\n"], "output": ["2000000000\n"]},
    "time_limit": {"seconds": 1, "nanos": 0},
}
ADD_TASK = Problem.from_record(ADD).to_task()
RIGHT = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG_ON_PUBLIC_2 = "```python\na, b = map(int, input().split())\nprint(a + abs(b))\n```"
WRONG_ON_HIDDEN_2 = "```python\na, b = map(int, input().split())\nprint(min(a + b, 10**9))\n```"
SYNTAX = "```python\nprint(1 +\n```"
CRASH = "```python\nprint(1 // 0)\n```"


@pytest.fixture(scope="module")
def env() -> CodeEnv:
    return CodeEnv(max_attempts=3, limits=LIMITS)


def test_code_env_satisfies_the_env_protocol(env: CodeEnv) -> None:
    assert isinstance(env, Env)
    assert "```python" in env.instructions()


@pytest.mark.parametrize("problem", builtin_problems(), ids=lambda p: p.name)
def test_shipped_problem_is_solved_by_its_reference(problem: Problem) -> None:
    assert problem.public_tests and len(problem.hidden_tests) >= 4 and problem.solutions
    env = CodeEnv(max_attempts=1)
    env.reset(problem.to_task())
    result = env.step(f"My solution:\n```python\n{problem.solutions[0]}```\n")
    assert result.success and result.reward == 1.0 and result.done, result.feedback


def test_shipped_problems_are_a_dozen_distinct_tasks() -> None:
    tasks = builtin_tasks()
    assert 8 <= len(tasks) <= 12
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert all(t.env == "code" for t in tasks)
    assert all(json.loads(json.dumps(t.spec)) == t.spec for t in tasks)  # specs are plain JSON


def test_reset_shows_statement_and_public_tests_but_no_hidden_test(env: CodeEnv) -> None:
    problem = next(p for p in builtin_problems() if p.name == "reverse-words")
    observation = env.reset(problem.to_task())
    assert problem.description.strip() in observation
    for test in problem.public_tests:
        assert test.input.strip() in observation and test.output.strip() in observation
    assert "leafe learns from its errors" not in observation  # a hidden input
    assert "Time limit: 2 s" in observation


def test_accepted_program(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step(RIGHT)
    assert (result.success, result.done, result.reward) == (True, True, 1.0)
    assert result.info["verdict"] == "accepted" and result.info["passed"] == result.info["total"] == 4
    assert "Accepted" in result.feedback


def test_wrong_answer_names_first_failing_test_with_input_expected_actual(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step(WRONG_ON_PUBLIC_2)
    assert (result.success, result.done, result.reward) == (False, False, 0.0)
    assert result.feedback.splitlines()[0] == "Wrong answer on public test 2."
    assert "10 -3" in result.feedback and "Expected output:\n7" in result.feedback
    assert "Your output:\n13" in result.feedback
    assert result.info["failing"]["actual"] == "13\n"
    assert "Attempt 1 of 3 failed" in result.observation


def test_hidden_tests_run_after_public_ones_pass(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step(WRONG_ON_HIDDEN_2)
    assert not result.success
    assert result.feedback.startswith("Wrong answer on hidden test 2.")
    assert result.info["passed"] == 3  # two public, one hidden


def test_hidden_test_data_stays_secret_by_default() -> None:
    env = CodeEnv(limits=LIMITS)
    assert env.reveal_hidden_tests is False
    env.reset(ADD_TASK)
    result = env.step(WRONG_ON_HIDDEN_2)
    assert result.feedback == "Wrong answer on hidden test 2."
    assert "1000000000" not in json.dumps(result.info)
    for mode in ("diagnosis", "oracle"):
        reflection = env.ground_reflection([result], mode=mode)
        assert "hidden test 2" in reflection.experience and "1000000000" not in reflection.experience


def test_hidden_test_failure_names_only_number_and_kind() -> None:
    # A program that puts the hidden input into its error message, its exit code and its output size.
    leak = "```python\nimport sys\ns = input()\nif s.startswith('1000'):\n    raise ValueError(s)\nprint(sum(map(int, s.split())))\n```"
    slow = "```python\ns = input()\nif s.startswith('1000'):\n    while True: pass\nprint(sum(map(int, s.split())))\n```"
    env = CodeEnv(limits=LIMITS)
    env.reset(ADD_TASK)
    crashed = env.step(leak)
    assert crashed.feedback == "Runtime error on hidden test 2."
    timed = env.step(slow)
    assert timed.feedback == "Time limit exceeded on hidden test 2 (limit 1 s of CPU time)."
    for result in (crashed, timed):
        text = json.dumps(result.info) + env.ground_reflection([result]).experience
        assert "1000000000" not in text and "input_chars" not in text
    shown = CodeEnv(limits=LIMITS, reveal_hidden_tests=True)
    shown.reset(ADD_TASK)
    assert "ValueError: 1000000000 1000000000" in shown.step(leak).feedback


def test_env_options_from_the_command_line_shape() -> None:
    """--env-arg values arrive as JSON scalars or objects: limits as a dict, flags as booleans."""
    from leafe_fast.envs.registry import make_env

    env = make_env("code", reveal_hidden_tests=True, limits={"cpu_seconds": 1, "wall_seconds": 3}, max_attempts=2)
    assert env.reveal_hidden_tests is True and env.limits.cpu_seconds == 1 and env.max_attempts == 2
    from leafe_fast.errors import UserError

    with pytest.raises(UserError, match=r"code env limits: unknown fields \['cpu_secs'\]"):
        CodeEnv(limits={"cpu_secs": 1})
    with pytest.raises(UserError, match="cpu_seconds must be positive"):
        CodeEnv(limits={"cpu_seconds": 0})
    with pytest.raises(UserError, match="reveal_hidden_tests"):
        CodeEnv(reveal_hidden_tests="yes")


def test_compile_error_feedback_names_error_and_line(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step(SYNTAX)
    assert result.info["verdict"] == "compile_error"
    assert result.feedback.startswith("Compile error: SyntaxError")
    assert "(line 1)" in result.feedback


def test_runtime_error_feedback_names_exception_and_test(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step(CRASH)
    assert result.info["verdict"] == "runtime_error"
    assert result.feedback.startswith("Runtime error on public test 1: ZeroDivisionError")
    assert "Input:\n1 2" in result.feedback


def test_slow_program_gets_time_limit_feedback(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step("```python\nwhile True:\n    pass\n```")
    assert result.info["verdict"] == "timeout"
    assert result.feedback.startswith("Time limit exceeded on public test 1 (limit 1 s")


def test_missing_program_counts_as_an_attempt(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    result = env.step("```cpp\nint main() {}\n```")
    assert result.info["verdict"] == "no_code" and not result.done
    assert "```python" in result.feedback


def test_episode_ends_after_max_attempts(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    results = [env.step(WRONG_ON_PUBLIC_2) for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert "no attempts left" in results[-1].observation
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(RIGHT)


def test_step_before_reset_and_foreign_task_are_refused() -> None:
    env = CodeEnv(limits=LIMITS)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(RIGHT)
    with pytest.raises(ValueError, match="sokoban"):
        env.reset(Task("level-1", "sokoban", {}))


def test_partial_credit_reward_is_fraction_of_all_tests() -> None:
    env = CodeEnv(limits=LIMITS, partial_credit=True)
    env.reset(ADD_TASK)
    result = env.step(WRONG_ON_HIDDEN_2)
    assert result.reward == pytest.approx(3 / 4)
    result = env.step(WRONG_ON_PUBLIC_2)  # 1 2, 0 0 and 1e9 1e9 pass; 10 -3 fails
    assert result.reward == pytest.approx(3 / 4)
    assert result.feedback.startswith("Wrong answer on public test 2.")


def _play(env: CodeEnv, actions: list[str]) -> list[tuple]:
    out = []
    for action in actions:
        if env.snapshot().done:
            break
        r = env.step(action)
        out.append((r.observation, r.reward, r.done, r.success, r.feedback, json.dumps(r.info, sort_keys=True)))
    return out


def test_snapshot_restore_is_exact_on_random_action_sequences() -> None:
    pool = [WRONG_ON_PUBLIC_2, WRONG_ON_HIDDEN_2, SYNTAX, CRASH, "no code at all (", RIGHT]
    rng = random.Random(1234)
    env = CodeEnv(max_attempts=4, limits=LIMITS)
    other = CodeEnv(max_attempts=4, limits=LIMITS)
    for _ in range(6):
        env.reset(ADD_TASK)
        actions = [rng.choice(pool) for _ in range(5)]
        cut = rng.randint(0, 3)
        _play(env, actions[:cut])
        snap = env.snapshot()
        first = _play(env, actions[cut:])
        env.restore(snap)
        assert env.snapshot() == snap
        assert _play(env, actions[cut:]) == first
        other.restore(pickle.loads(pickle.dumps(snap)))
        assert _play(other, actions[cut:]) == first  # a pickled snapshot restores another env


def test_ground_reflection_rolls_back_to_start_of_repeated_failure(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    history = [env.step(SYNTAX), env.step(WRONG_ON_PUBLIC_2), env.step(WRONG_ON_PUBLIC_2)]
    reflection = env.ground_reflection(history)
    assert reflection is not None
    assert reflection.rollback_step == 1  # keep the syntax-error attempt, redo from the first wrong answer
    assert "public test 2" in reflection.experience
    assert "'10 -3\\n'" in reflection.experience and "'7\\n'" in reflection.experience
    assert "'13\\n'" in reflection.experience


def test_ground_reflection_on_single_failure_and_success(env: CodeEnv) -> None:
    env.reset(ADD_TASK)
    crash = env.step(CRASH)
    reflection = env.ground_reflection([crash])
    assert reflection is not None and reflection.rollback_step == 0
    assert "ZeroDivisionError" in reflection.experience
    solved = env.step(RIGHT)
    assert env.ground_reflection([crash, solved]) is None
    assert env.ground_reflection([]) is None


@pytest.mark.parametrize(
    "text, program",
    [
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("Idea first.\n```py\nx = 1\n```\nThen:\n```python3\nprint(2)\n```\nDone.", "print(2)\n"),
        ("```\nprint(3)\n```", "print(3)\n"),
        ("```python\nprint(4)\n", "print(4)\n"),  # unclosed fence: runs to the end
        ("```python\nprint(5)\n```\n```\nplain text block\n```", "print(5)\n"),  # tagged beats untagged
        ("print(6)", "print(6)\n"),  # no fences: the whole text
        ("```cpp\nint main() {}\n```", None),
        ("   \n", None),
    ],
)
def test_extract_program(text: str, program: str | None) -> None:
    assert extract_program(text) == program


def test_outputs_match() -> None:
    assert outputs_match("1 2\n3\n", "1  2 3")  # whitespace-insensitive
    assert not outputs_match("1 2", "1 2 3")
    assert not outputs_match("10", "10.0000001")  # an integer answer is exact
    assert outputs_match("-7", "-07")
    assert outputs_match("2.5", "2.5000000001")
    assert outputs_match("0.3333333", "0.33333334")
    assert not outputs_match("0.333", "0.334")
    assert outputs_match("YES", "YES\n\n")
    assert not outputs_match("YES", "yes")
    assert not outputs_match("nan", "nan0")


@pytest.mark.parametrize(
    "expected, actual, match",
    [
        ("3", "+-3", False), ("3", "²", False), ("2", "²", False), ("-3", "+-3", False),
        ("1" * 5000, "1" * 5000, True), ("1" * 5000, "0" + "1" * 5000, True), ("1" * 5000, "1" * 4999 + "2", False),
        ("0", "-0", True), ("0", "+000", True), ("5", "٥", False), ("5", "5_0", False), ("50", "5_0", False),
        ("1.5", "1.5e0", True), ("1.5", "inf", False), ("1.5", "1e400", False), ("inf", "inf", True),
        ("2.5", "2.5" + "0" * 5000 + "1", True), ("7", b"\xff7", False), ("7", b"7\n\xff", False),
        (b"\xff\xfe", b"\xff\xfe", True), ("x", "\udc80", False), ("1 2", "1\u00a02", False),
    ],
)
def test_outputs_match_edge_cases(expected, actual, match: bool) -> None:
    assert outputs_match(expected, actual) is match


def _reference_match(expected: str, actual: str, tolerance: float = 1e-6) -> bool:
    """The plain rule, on well-formed ASCII tokens only (where int() cannot fail)."""
    want, got = expected.split(), actual.split()
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if a == b:
            continue
        if a.lstrip("+-").isdigit() and a.count("-") + a.count("+") <= 1:
            if not (b.lstrip("+-").isdigit() and b.count("-") + b.count("+") <= 1 and int(a) == int(b)):
                return False
            continue
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > tolerance * max(1.0, abs(x)):
            return False
    return True


_ASCII_TOKEN = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.text(alphabet="0123456789+-.eE", min_size=1, max_size=6),
    st.sampled_from(["YES", "NO", "0", "-0", "+1", "007"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ASCII_TOKEN, max_size=5), st.lists(_ASCII_TOKEN, max_size=5))
def test_outputs_match_agrees_with_the_plain_rule_on_ascii_tokens(want: list[str], got: list[str]) -> None:
    expected, actual = " ".join(want), " ".join(got)
    assert outputs_match(expected, actual) == _reference_match(expected, actual)
    assert outputs_match(expected, expected)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)), st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_outputs_match_never_raises(expected, actual) -> None:
    assert outputs_match(expected, actual) in (True, False)


class _FakeSandbox:
    """Answers every test with the given bytes as the program's stdout: the judge's input space."""

    def __init__(self) -> None:
        self.stdout = ""

    def run_many(self, source, inputs, limits=None, stop_on_error=False):
        from leafe_fast.envs.sandbox import RunResult, Verdict

        return [RunResult(Verdict.OK, self.stdout, "", 0, None, 0.01, 0.01, 0, "fake") for _ in inputs]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_code_env_step_never_raises_on_any_program_output(data: bytes) -> None:
    fake = _FakeSandbox()
    fake.stdout = data.decode("utf-8", errors="replace")
    env = CodeEnv(limits=LIMITS, sandbox=fake, cache_size=0)
    env.reset(ADD_TASK)
    result = env.step(RIGHT)
    assert result.info["verdict"] in ("accepted", "wrong_answer")
    assert isinstance(result.feedback, str)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=120), st.text(max_size=40))
def test_code_env_step_survives_real_programs_printing_arbitrary_bytes(data: bytes, junk: str) -> None:
    env = CodeEnv(limits=LIMITS, max_attempts=2)
    env.reset(ADD_TASK)
    printed = env.step(f"```python\nimport sys\nsys.stdout.buffer.write({data!r})\n```")
    assert printed.info["verdict"] in ("wrong_answer", "runtime_error")
    anything = env.step(junk)  # any text as the answer, lone surrogates and NUL included
    assert anything.done and isinstance(anything.feedback, str)


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_loader_reads_codecontests_fields(tmp_path: Path) -> None:
    record = dict(ADD, solutions={"language": [2, 3, 1], "solution": ["int main(){}", "print(sum(map(int, input().split())))", "print 1"]})
    record.update(cf_rating=800, incorrect_solutions={"language": [], "solution": []}, memory_limit_bytes=0)
    path = tmp_path / "problems.jsonl"
    _write_jsonl(path, [record, "", dict(ADD, name="add-three", time_limit=2.5, memory_limit_bytes=64 << 20)])
    first, second = load_problems(path)
    assert first.name == "add-two" and len(first.public_tests) == 2
    assert [t.input for t in first.hidden_tests] == ["0 0\n", "1000000000 1000000000\n"]  # private, then generated
    assert first.time_limit_seconds == 1.0 and first.memory_limit_bytes is None
    assert first.solutions == ("print(sum(map(int, input().split())))",)  # Python 3 only
    assert second.time_limit_seconds == 2.5 and second.memory_limit_bytes == 64 << 20
    assert len(load_problems(path, include_generated=False)[0].hidden_tests) == 1
    gz = tmp_path / "problems.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [t.task_id for t in load_tasks(gz)] == ["add-two", "add-three"]
    assert Problem.from_record(first.to_record()) == Problem.from_record(dict(record, solutions=None))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ({"description": "x", "public_tests": {"input": ["1"], "output": ["1"]}}, "bad.jsonl:2: field 'name'"),
        (dict(ADD, public_tests={"input": ["1", "2"], "output": ["1"]}), "2 inputs but 1 outputs"),
        (dict(ADD, name="empty", public_tests=None, private_tests=None, generated_tests=None), "has no tests"),
        (dict(ADD, time_limit="fast"), "time_limit"),
        (ADD, "duplicate problem name 'add-two' \\(first on line 1\\)"),
    ],
)
def test_loader_errors_name_line_and_field(tmp_path: Path, bad, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [ADD, bad])
    with pytest.raises(ValueError, match=message):
        load_problems(path)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no problem file"):
        load_problems(tmp_path / "absent.jsonl")


def test_judgement_cache_tells_apart_problems_that_share_a_name() -> None:
    # Two user files may reuse a problem name; a cached verdict must not leak between them.
    env = CodeEnv(limits=LIMITS)
    env.reset(ADD_TASK)
    assert env.step(RIGHT).success
    other = {**ADD, "private_tests": {"input": ["2 2\n"], "output": ["5\n"]}, "generated_tests": {"input": [], "output": []}}
    env.reset(Problem.from_record(other).to_task())
    result = env.step(RIGHT)
    assert not result.success and result.info["verdict"] == "wrong_answer"


def test_eval_refuses_to_reveal_hidden_tests(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from leafe_fast.cli import main

    (tmp_path / "config.json").write_text("{}")
    argv = ["eval", "--model", str(tmp_path), "--env", "code", "--env-arg", "reveal_hidden_tests=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--env-arg reveal_hidden_tests" in err and err.count("\n") == 1
