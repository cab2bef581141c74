"""The sandbox's promises, one test each: limits hold, feedback is clear, the host is unharmed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from leafe_fast.envs.sandbox import (
    PYTHON,
    Language,
    Limits,
    Sandbox,
    SandboxError,
    Verdict,
    detect_isolation,
    python_language,
)

LIMITS = Limits(cpu_seconds=1, wall_seconds=3, memory_bytes=128 << 20, max_processes=8, max_output_bytes=64 << 10)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(limits=LIMITS)


@pytest.fixture(scope="module")
def namespaces(sandbox: Sandbox) -> Sandbox:
    if sandbox.isolation != "namespaces":
        pytest.skip("namespace isolation unavailable here (needs root on Linux)")
    return sandbox


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def test_root_on_linux_gets_namespace_isolation() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("namespace isolation needs root on Linux")
    assert detect_isolation() == "namespaces"


def test_runs_program_on_stdin(sandbox: Sandbox) -> None:
    result = sandbox.run("a, b = map(int, input().split())\nprint(a + b)", stdin="3 4\n")
    assert result.verdict is Verdict.OK and result.ok
    assert result.stdout == "7\n"
    assert result.exit_code == 0 and result.signal is None
    assert 0 < result.cpu_seconds < LIMITS.cpu_seconds


def test_syntax_error_is_a_compile_error_with_its_line(sandbox: Sandbox) -> None:
    result = sandbox.run("x = 1\nprint(x +)\n")
    assert result.verdict is Verdict.COMPILE_ERROR
    assert "SyntaxError" in result.stderr and "line 2" in result.stderr
    assert result.describe().startswith("compile error: SyntaxError")


def test_runtime_error_names_the_exception_and_the_user_line(sandbox: Sandbox) -> None:
    result = sandbox.run("def f(x):\n    return 1 // x\nprint(f(0))\n")
    assert result.verdict is Verdict.RUNTIME_ERROR
    assert "ZeroDivisionError" in result.describe()
    assert "line 2, in f" in result.stderr
    assert "_boot" not in result.stderr  # the bootstrap's own frame is not shown


def test_nonzero_exit_is_a_runtime_error(sandbox: Sandbox) -> None:
    result = sandbox.run("import sys\nprint('partial')\nsys.exit(3)")
    assert result.verdict is Verdict.RUNTIME_ERROR and result.exit_code == 3
    assert result.stdout == "partial\n"


def test_timeout_kills_infinite_loop(sandbox: Sandbox) -> None:
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass\n", limits=Limits(cpu_seconds=1, wall_seconds=2))
    assert result.verdict is Verdict.TIMEOUT
    assert "time limit exceeded" in result.describe()
    assert time.monotonic() - start < 2 + 3  # the wall limit plus launch overhead on a busy machine


def test_wall_timeout_kills_a_sleeping_program(sandbox: Sandbox) -> None:
    start = time.monotonic()
    result = sandbox.run("import time\ntime.sleep(60)", limits=Limits(cpu_seconds=1, wall_seconds=0.5))
    assert result.verdict is Verdict.TIMEOUT
    assert result.cpu_seconds < 0.5  # it was the wall clock, not the CPU limit
    assert time.monotonic() - start < 3


def test_memory_bomb_gets_memory_limit(sandbox: Sandbox) -> None:
    result = sandbox.run("b = bytearray()\nwhile True:\n    b += bytearray(8 << 20)\n")
    assert result.verdict is Verdict.MEMORY_LIMIT
    assert result.describe() == "memory limit exceeded"


def test_output_flood_gets_output_limit(sandbox: Sandbox) -> None:
    result = sandbox.run("while True:\n    print('x' * 999)\n")
    assert result.verdict is Verdict.OUTPUT_LIMIT
    assert len(result.stdout.encode()) <= LIMITS.max_output_bytes


def test_fork_limit_holds_and_children_are_reaped(sandbox: Sandbox) -> None:
    program = (
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print(n, e.errno)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
    )
    start = time.monotonic()
    result = sandbox.run(program)
    assert result.verdict is Verdict.OK, result.stderr
    forked, errno = map(int, result.stdout.split())
    if result.isolation in ("namespaces", "userns"):
        assert forked == LIMITS.max_processes - 1  # itself plus its children: the limit is its own
    else:
        assert forked <= LIMITS.max_processes  # rlimits as a plain user: counted with the user's others
    assert errno == 11  # EAGAIN
    assert time.monotonic() - start < LIMITS.wall_seconds  # the sleeping children did not hold it up
    if result.info["uid"] is not None:
        assert _processes_of(result.info["uid"]) == []


def test_fork_bomb_is_contained_and_host_unharmed(sandbox: Sandbox) -> None:
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    result = sandbox.run(bomb, limits=Limits(cpu_seconds=1, wall_seconds=1.5, max_processes=8))
    assert result.verdict is Verdict.TIMEOUT
    if result.info["uid"] is not None:
        assert _processes_of(result.info["uid"]) == []  # every bomb process is gone
    assert subprocess.run([sys.executable, "-c", "print('alive')"], capture_output=True, text=True).stdout == "alive\n"


def test_child_that_leaves_the_session_is_killed(namespaces: Sandbox) -> None:
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    result = namespaces.run(program)
    assert result.verdict is Verdict.OK and result.stdout == "parent done\n"
    assert _processes_of(result.info["uid"]) == []


def test_write_outside_work_dir_fails_and_file_is_unchanged(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "host_file.txt"
    target.write_text("original")
    program = f"open({str(target)!r}, 'w').write('overwritten')\n"
    result = sandbox.run(program)
    assert result.verdict is Verdict.RUNTIME_ERROR
    assert "Error" in result.describe()
    assert target.read_text() == "original"


def test_world_writable_host_dir_is_read_only_inside(namespaces: Sandbox) -> None:
    # A directory anyone may write on the host, made visible inside like the interpreter's
    # prefix: only the read-only mount can stop the program there.
    if not os.path.isdir("/var/tmp"):
        pytest.skip("no /var/tmp")
    outside = Path(tempfile.mkdtemp(prefix="leafe-test-", dir="/var/tmp"))
    try:
        _check_read_only_inside(outside)
    finally:
        shutil.rmtree(outside)


def _check_read_only_inside(outside: Path) -> None:
    os.chmod(outside, 0o777)
    victim = outside / "victim.txt"
    victim.write_text("original")
    os.chmod(victim, 0o666)
    exposing = Sandbox(limits=LIMITS, language=replace(PYTHON, expose=PYTHON.expose + (str(outside),)))
    program = (
        "import errno, os\n"
        f"print(sorted(os.listdir({str(outside)!r})))\n"
        f"for path, mode in (({str(victim)!r}, 'w'), ({str(outside / 'new.txt')!r}, 'x')):\n"
        "    try:\n"
        "        open(path, mode).write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])\n"
    )
    result = exposing.run(program)
    assert result.stdout.split("\n")[:3] == ["['victim.txt']", "EROFS", "EROFS"]
    assert victim.read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_host_files_and_this_library_are_invisible(namespaces: Sandbox) -> None:
    import leafe_fast.envs

    problems = Path(leafe_fast.envs.__file__).parent / "problems"
    probes = [str(p) for p in problems.glob("*.jsonl")] + [os.getcwd()]
    probes += [d for d in namespaces.hidden_paths if os.path.isdir(d)]
    assert all(os.path.exists(p) for p in probes)
    program = (
        "import os, sys\n"
        "for p in sys.stdin.read().split():\n"
        "    print(os.path.exists(p) and bool(os.path.isfile(p) or os.listdir(p)))\n"
    )
    result = namespaces.run(program, stdin="\n".join(probes))
    assert result.verdict is Verdict.OK, result.stderr
    assert result.stdout.split() == ["False"] * len(probes)


def test_network_connection_to_host_listener_is_blocked(sandbox: Sandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
        result = sandbox.run(program)
        assert result.verdict is Verdict.RUNTIME_ERROR
        assert ("Network is unreachable" in result.stderr) or ("network access is disabled" in result.stderr)
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever arrived
    finally:
        listener.close()


def test_work_dir_is_cwd_home_tmpdir_and_is_removed(tmp_path: Path) -> None:
    base = tmp_path / "sandboxes"
    base.mkdir()
    sandbox = Sandbox(limits=LIMITS, base_dir=base)
    program = (
        "import os, tempfile\n"
        "open('here.txt', 'w').write('x' * 1000)\n"
        "os.makedirs('nested/deeper')\n"
        "os.chmod('nested', 0)\n"
        "fd, path = tempfile.mkstemp()\n"
        "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'] == os.path.dirname(path))\n"
    )
    result = sandbox.run(program)
    assert result.verdict is Verdict.OK, result.stderr
    assert result.stdout == "True\n"
    assert list(base.iterdir()) == []  # the whole temporary directory is gone


def test_file_size_limit_applies_to_files_it_writes(sandbox: Sandbox) -> None:
    program = "f = open('big.bin', 'wb')\nf.write(b'0' * (1 << 20))\nf.close()\n"
    result = sandbox.run(program)
    assert result.verdict is Verdict.RUNTIME_ERROR
    assert "File too large" in result.stderr


def test_total_disk_use_is_capped_and_host_disk_untouched(namespaces: Sandbox, tmp_path: Path) -> None:
    # Many files, each under the per-file limit: together they hit the work dir's quota, not the host's disk.
    limits = replace(LIMITS, max_disk_bytes=1 << 20)
    sandbox = Sandbox(limits=limits, base_dir=tmp_path)
    program = (
        "import os\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        open(f'f{n}', 'wb').write(b'x' * (60 << 10))\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, os.strerror(e.errno))\n"
    )
    result = sandbox.run(program)
    assert result.verdict is Verdict.OK, result.stderr
    written, reason = result.stdout.split(" ", 1)
    assert 0 < int(written) * (60 << 10) <= 1 << 20
    assert reason.strip() == "No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_environment_is_stripped(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAFE_TEST_SECRET", "hunter2")
    result = sandbox.run("import os\nprint(sorted(os.environ))")
    assert result.stdout.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_runs_unprivileged(sandbox: Sandbox) -> None:
    result = sandbox.run("import os\nprint(os.getuid(), os.geteuid())")
    uid, euid = map(int, result.stdout.split())
    if os.geteuid() == 0:
        assert uid != 0 and euid != 0
        assert uid == result.info["uid"]
    else:
        assert uid == os.getuid()


def test_run_many_gives_each_input_its_own_job(sandbox: Sandbox) -> None:
    inputs = [f"{i}\n" for i in range(5)]
    results = sandbox.run_many("n = int(input())\nprint(10 // n)", inputs)
    assert [r.verdict for r in results] == [Verdict.RUNTIME_ERROR] + [Verdict.OK] * 4
    assert [r.stdout for r in results[1:]] == ["10\n", "5\n", "3\n", "2\n"]
    stopped = sandbox.run_many("n = int(input())\nprint(10 // n)", ["2", "0", "5"], stop_on_error=True)
    assert [r.verdict for r in stopped] == [Verdict.OK, Verdict.RUNTIME_ERROR]


def test_concurrent_sandboxes_do_not_interfere(sandbox: Sandbox) -> None:
    from concurrent.futures import ThreadPoolExecutor

    program = "import os\nn = int(input())\nprint(n * n, sorted(os.listdir('.')))\nopen('mine.txt', 'w').write(str(n))"

    def work(k: int) -> list[str]:
        return [r.stdout for r in sandbox.run_many(program, [str(k), str(k + 100)])]

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(work, range(4)))
    for k, (first, second) in enumerate(outputs):
        assert first == f"{k * k} ['main.py']\n"
        assert second == f"{(k + 100) ** 2} ['main.py', 'mine.txt']\n"  # jobs of one launch share the dir


def test_host_mounts_and_tmp_unchanged(sandbox: Sandbox) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    sandbox.run("print(1)")
    assert Path("/proc/self/mountinfo").read_text() == before
    with tempfile.NamedTemporaryFile() as f:  # the host's /tmp is still writable
        f.write(b"ok")


def test_bad_limits_are_refused_with_names() -> None:
    with pytest.raises(ValueError, match="cpu_seconds"):
        Limits(cpu_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="docker")


def test_rlimits_fallback_still_limits_and_blocks_sockets() -> None:
    interpreter = "/usr/bin/python3"
    if not os.path.exists(interpreter) or not os.stat(os.path.realpath(interpreter)).st_mode & stat.S_IXOTH:
        pytest.skip("needs a world-executable system python for the unprivileged fallback")
    sandbox = Sandbox(limits=LIMITS, isolation="rlimits", language=python_language(interpreter))
    assert sandbox.run("print(input())", stdin="hi").stdout == "hi\n"
    blocked = sandbox.run("import socket\nsocket.socket()")
    assert blocked.verdict is Verdict.RUNTIME_ERROR and "network access is disabled" in blocked.stderr
    assert sandbox.run("b = bytearray()\nwhile True:\n    b += bytearray(8 << 20)\n").verdict is Verdict.MEMORY_LIMIT
    if os.geteuid() == 0:  # as root the fallback still runs jobs as a fresh uid and kills by uid
        start = time.monotonic()
        escaped = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('ok')")
        assert escaped.stdout == "ok\n" and time.monotonic() - start < 5
        assert _processes_of(escaped.info["uid"]) == []


def test_language_with_a_compile_step(sandbox: Sandbox) -> None:
    """The extension point for compiled languages, exercised with Python's own byte compiler."""
    interpreter = PYTHON.run_argv[0]
    checked = Language(
        name="python-compiled",
        source_name="prog.py",
        compile_argv=(interpreter, "-I", "-S", "-m", "py_compile", "{source}"),
        run_argv=(interpreter, "-I", "-S", "-B", "{source}"),
        expose=PYTHON.expose,
    )
    runner = Sandbox(limits=LIMITS, language=checked)
    good = runner.run_many("print(int(input()) + 1)", ["1", "41"])
    assert [r.stdout for r in good] == ["2\n", "42\n"]
    bad = runner.run_many("print(", ["1", "2"])
    assert [r.verdict for r in bad] == [Verdict.COMPILE_ERROR] * 2
    assert "SyntaxError" in bad[0].stderr


def test_exposing_the_sandbox_own_paths_is_refused() -> None:
    clash = Sandbox(limits=LIMITS, language=replace(PYTHON, expose=PYTHON.expose + ("/tmp/whatever",)))
    if clash.isolation == "rlimits":
        pytest.skip("rlimits isolation exposes nothing")
    with pytest.raises(SandboxError, match="cannot expose /tmp/whatever"):
        clash.run("print(1)")


def test_missing_interpreter_is_a_sandbox_error() -> None:
    broken = python_language("/nonexistent/python3")
    with pytest.raises(SandboxError, match="could not start"):
        Sandbox(limits=LIMITS, language=broken).run("print(1)")


_UNPRIVILEGED_SCRIPT = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
from leafe_fast.envs.sandbox import Limits, Sandbox, detect_isolation
level = detect_isolation()
out = {"isolation": level}
if level == "userns":
    sb = Sandbox(limits=Limits(cpu_seconds=1, wall_seconds=3, max_processes=6))
    out["echo"] = sb.run("print(input()[::-1])", stdin="abc").stdout
    net = sb.run("import socket\\nsocket.create_connection(('127.0.0.1', %d), timeout=2)" % int(sys.argv[2]))
    out["net"] = net.verdict.value + " " + net.describe()
    out["ids"] = sb.run("import os\\nprint(os.getuid(), os.listdir('/'))").stdout
    fork = "import os, time\\nn = 0\\nwhile True:\\n    try:\\n        pid = os.fork()\\n    except OSError:\\n        break\\n    if pid == 0:\\n        time.sleep(30)\\n        os._exit(0)\\n    n += 1\\nprint(n)"
    out["forked"] = sb.run(fork).stdout
    out["write"] = sb.run("open('/usr/leafe-test', 'w')").describe()
    ipc = sb.run("import ctypes\\nlibc = ctypes.CDLL(None)\\nprint(libc.shmget(0, 4096, 0o1600), libc.msgget(0, 0o1600), libc.syscall(250, 0, 0, 0, 0, 0), open('/proc/self/status').read().count('NoNewPrivs:\\t1'))")
    out["ipc"] = [ipc.stdout, ipc.info["ipc_quotas"], ipc.info["seccomp"]]
print(json.dumps(out))
"""


def test_userns_isolation_for_unprivileged_users() -> None:
    """The non-root path, run here as ``nobody`` with the system Python."""
    import leafe_fast

    runuser, python = shutil.which("runuser"), "/usr/bin/python3"
    repo = Path(leafe_fast.__file__).resolve().parents[1]
    if os.geteuid() != 0 or runuser is None or not os.path.exists(python):
        pytest.skip("needs root, runuser and /usr/bin/python3 to act as an unprivileged user")
    if any(not os.stat(p).st_mode & stat.S_IXOTH for p in [repo, *repo.parents]):
        pytest.skip(f"{repo} is not reachable by other users")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        done = subprocess.run(
            [runuser, "-u", "nobody", "--", python, "-c", _UNPRIVILEGED_SCRIPT, str(repo), str(port)],
            capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if out["isolation"] != "userns":
            pytest.skip("this kernel refuses unprivileged user namespaces")
        assert out["echo"] == "cba\n"
        assert out["net"].startswith("runtime_error") and "Network is unreachable" in out["net"]
        uid, listing = out["ids"].split(" ", 1)
        assert uid == "1000" and "work" not in listing and "home" not in listing
        assert out["forked"] == "5\n"  # the limit of 6 holds per user namespace
        assert "Read-only file system" in out["write"]
        stdout, quotas, seccomp = out["ipc"]
        assert quotas and stdout.split()[:2] == ["-1", "-1"] and stdout.split()[3] == "1"  # no shm, no msg; no-new-privs
        if seccomp:
            assert stdout.split()[2] == "-1"  # keyctl refused
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
