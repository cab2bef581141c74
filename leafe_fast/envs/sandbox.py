"""Run untrusted programs (model-generated solutions) with hard limits and no network.

Each call gets its own temporary directory, removed afterwards, and runs one or several jobs (the
same program on several test inputs) in one launch of the privileged helper
:mod:`leafe_fast.envs._sandbox_init`. Every job has: CPU time, wall time (killed by the launcher),
address space (``RLIMIT_AS``), process count (``RLIMIT_NPROC``), size of any file it writes
(``RLIMIT_FSIZE``), open files, no core dumps, no POSIX message queues; stdin from the test input;
stdout and stderr on pipes the launcher reads with a cap (past ``Limits.max_output_bytes`` the job
is killed: ``output_limit``), so nothing the job does to its stdio reaches the host's disk; an
environment of a few fixed variables; ``PR_SET_NO_NEW_PRIVS`` (setuid and file-capability
binaries run with the job's own rights); a seccomp filter on x86_64 (keyrings, ptrace, mount,
namespaces, BPF, perf, modules, kexec, io_uring, userfaultfd, memfd, socket families other than
unix/inet/inet6/netlink, and other calls a judged program never needs fail). Python runs isolated (``-I -S -B``).

The CPU time that decides the verdict (and ``RunResult.cpu_seconds``) is that of the job's whole
process tree, children reaped or not: every process is reaped in the end by init or by a parent
init reaped, and the filter refuses the one way around it (ignoring SIGCHLD, which makes the kernel
reap children without counting their time). While the job runs, the tree is sampled every 50 ms
and killed once two samples in a row are over the limit.

Isolation levels (``Sandbox(isolation=...)``; ``"auto"`` picks the strongest that works here):

``namespaces`` (needs root; what CI and the project machines use). Verified by the tests
(``tests/test_sandbox.py``, ``tests/test_sandbox_containment.py``):
  * network: a fresh network namespace with only a loopback device that is down, so no
    connection leaves the sandbox, not even to the host's 127.0.0.1;
  * files: a fresh mount namespace and a minimal root (pivot_root into a small tmpfs) that holds
    only /usr, /bin, /lib*, /sbin, /etc and the interpreter's prefix, all read-only, a /dev with
    null, zero, full, random and urandom, its own /proc, and the work directory as ``/tmp`` (also
    cwd, HOME, TMPDIR), the only writable place: a tmpfs of ``Limits.max_disk_bytes``, so the
    program's files together cannot fill the host's disk (they count against memory); /dev/shm
    points there too, so POSIX shared memory and semaphores are capped with them. Every
    mount is ``nosuid,nodev`` (the device nodes keep dev). Home directories, /work, /var, /opt,
    /dev/shm and the host's /tmp do not exist inside; site-packages and this library's own
    directory (which holds the shipped problems with their hidden tests) are covered by empty
    tmpfs, so a policy cannot read the answers;
  * kernel-held memory: a fresh IPC namespace whose quotas are zero (no System V shared memory,
    message queues or semaphores, ``shm_rmid_forced``, no POSIX message queues), and no
    ``memfd_create`` (filter), so no memory escapes the per-process limits that way;
  * processes: each launch runs as a fresh uid (``1_000_000 + launcher pid``), so the per-uid
    ``RLIMIT_NPROC`` really is this sandbox's limit (root ignores it; a shared uid such as
    ``nobody`` would share it between concurrent sandboxes); each job in a user namespace of its
    own (same uid), so keyrings and other per-user kernel state die with the job and a later run
    that gets the same uid finds nothing (where the host lets an unprivileged uid create one,
    ``info["job_userns"]``; elsewhere the filter alone refuses keyrings); a PID namespace whose init kills everything left after
    each job, and which the kernel empties when init exits;
  * the program cannot signal or trace host processes (other uid) nor see them (own ``/proc``).
  Not covered: total memory is per process (``RLIMIT_AS`` x process limit) plus kernel buffers
  bounded by the fd and process limits (pipes, sockets); threads count as processes; no cgroup
  (the machines this was built on offer cgroup v1 only, the memory hierarchy owned by the host's
  own supervisor); the kernel attack surface is that of an unprivileged process minus the filter.

``userns`` (unprivileged users, where the kernel allows user namespaces; Linux >= 5.14): the same
  namespaces, quotas (where the kernel lets a namespace root set them; ``info["ipc_quotas"]``),
  filter and minimal root, entered as root of a new user namespace; each job then runs as uid
  1000 of its own nested user namespace, so exec leaves it no capabilities and the read-only
  mounts are locked. ``RLIMIT_NPROC`` is counted per user namespace on these kernels, so it is the
  job's own. The difference from ``namespaces``: on the host the job is the invoking user, so the
  host grants it that user's file permissions, which only matter for the read-only system
  directories it sees.

``rlimits`` (fallback where neither works): the same resource limits, output pipes, no-new-privs
  and filter (but the work directory is on the host's disk, bounded only per file and by CPU
  time; System V IPC is the host's), a new session per job whose process group is killed
  afterwards, and a Python audit hook that refuses socket creation, connect, bind and name
  resolution. Weaker, and said so: native code (ctypes) bypasses the audit hook; the program sees
  the host's files (writes limited by permissions), and what it leaves in world-writable host
  directories outlives the run. As root, jobs still run as a fresh uid, and
  everything of that uid is killed after each job. As another user, ``RLIMIT_NPROC`` counts all
  of the user's processes, so it is set to the current count plus the limit, and a child that
  calls ``setsid`` escapes the group kill (and its CPU time the verdict).

Adding a language: a :class:`Language` with its run command (and compile command, run as a first
job in the same work directory); see :data:`PYTHON`.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

__all__ = [
    "Limits",
    "Language",
    "PYTHON",
    "RunResult",
    "Sandbox",
    "SandboxError",
    "Verdict",
    "detect_isolation",
    "library_dirs",
    "python_language",
]

UID_BASE = 1_000_000
ISOLATION_LEVELS = ("namespaces", "userns", "rlimits")  # strongest first
COMPILE_ERROR_EXIT = 121  # exit code of the Python bootstrap when the source does not compile
_LAUNCHER = Path(__file__).with_name("_sandbox_init.py")
_TAIL_CHARS = 4000


class SandboxError(RuntimeError):
    """The sandbox itself failed (set-up, launcher crash); says nothing about the program."""


class Verdict(str, enum.Enum):
    OK = "ok"
    COMPILE_ERROR = "compile_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"


@dataclass(frozen=True)
class Limits:
    """Per-job limits. ``cpu_seconds`` bounds the CPU time of the job's whole process tree
    (sampled every 50 ms while it runs, decided exactly once everything is reaped; each process
    also has it as ``RLIMIT_CPU`` in whole seconds, rounded up); ``max_processes`` is the number
    of processes (threads included) alive at once; ``max_output_bytes`` caps stdout (read from a
    pipe) and every file written; ``max_disk_bytes`` caps all files in the work directory
    together (namespace isolation)."""

    cpu_seconds: float = 2.0
    wall_seconds: float = 5.0
    memory_bytes: int = 256 << 20
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64
    max_disk_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes", "max_output_bytes",
                     "max_disk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")
        if self.memory_bytes < 32 << 20:
            raise ValueError(f"Limits.memory_bytes={self.memory_bytes} is below 32 MiB; the interpreter cannot start")
        if self.max_open_files < 8:
            raise ValueError(f"Limits.max_open_files must be at least 8, got {self.max_open_files}")


# Runs the user's program as __main__ after compiling it, so a syntax error is told apart from a
# runtime error by exit code; optionally installs the network audit hook (rlimits isolation).
_PYTHON_BOOT = f"""
import sys
def _guard(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                 "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
                 "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in this sandbox")
def _boot():
    path = sys.argv[1]
    if sys.argv[2] == "1":
        sys.addaudithook(_guard)
    with open(path, "rb") as f:
        source = f.read()
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as e:
        import traceback
        traceback.print_exception(type(e), e, None)
        sys.exit({COMPILE_ERROR_EXIT})
    import types
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    sys.argv = [path]
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
_boot()
"""


@dataclass(frozen=True)
class Language:
    """How to run (and optionally first compile) a program. ``{source}`` and ``{workdir}`` in the
    commands are replaced by paths as the program sees them; ``{guard}`` by 1 when the runtime
    should install its own network guard (rlimits isolation), else 0. ``expose`` lists directories
    the program needs to read (the interpreter's prefix) even if they sit under a directory the
    sandbox user cannot enter."""

    name: str
    source_name: str
    run_argv: tuple[str, ...]
    compile_argv: tuple[str, ...] | None = None
    expose: tuple[str, ...] = ()


def python_language(interpreter: str | None = None) -> Language:
    """Python 3 programs run by ``interpreter`` (default: the base interpreter of this process,
    not a venv shim; the program gets the standard library only, ``-S``)."""
    if interpreter is None:
        interpreter = sys.executable
        prefixes = {os.path.realpath(sys.base_prefix)}
    else:
        prefixes = set()
    interpreter = os.path.realpath(interpreter)
    prefixes.add(os.path.dirname(os.path.dirname(interpreter)))
    prefixes.discard("/")  # an interpreter in /bin or /usr/bin is visible anyway
    return Language(
        name="python",
        source_name="main.py",
        run_argv=(interpreter, "-I", "-S", "-B", "-c", _PYTHON_BOOT, "{source}", "{guard}"),
        expose=tuple(sorted(prefixes)),
    )


PYTHON = python_language()


@dataclass
class RunResult:
    """One job's outcome. ``stdout`` is complete up to ``Limits.max_output_bytes``; ``stderr`` is
    its last few thousand characters (where tracebacks end)."""

    verdict: Verdict
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    cpu_seconds: float
    wall_seconds: float
    max_rss_bytes: int
    isolation: str
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    def describe(self) -> str:
        """One line for feedback: the verdict and its cause."""
        if self.verdict is Verdict.OK:
            return "ran successfully"
        if self.verdict is Verdict.TIMEOUT:
            return f"time limit exceeded (cpu {self.cpu_seconds:.2f}s, wall {self.wall_seconds:.2f}s)"
        if self.verdict is Verdict.MEMORY_LIMIT:
            return "memory limit exceeded"
        if self.verdict is Verdict.OUTPUT_LIMIT:
            return "output limit exceeded"
        if self.verdict is Verdict.KILLED:
            name = signal.Signals(self.signal).name if self.signal else "a signal"
            return f"killed by {name}"
        last = _last_line(self.stderr)
        kind = "compile error" if self.verdict is Verdict.COMPILE_ERROR else "runtime error"
        return f"{kind}: {last}" if last else f"{kind} (exit code {self.exit_code})"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


@functools.lru_cache(maxsize=1)
def library_dirs() -> tuple[str, ...]:
    """Where this library and its problem files may be installed: the site-packages of this
    interpreter and of its base, and the package itself. Hidden from programs (namespaces
    isolation), so a policy cannot read hidden tests from the shipped problem files."""
    dirs = set(site.getsitepackages())
    for base in (sys.prefix, sys.base_prefix):
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
        dirs.update((paths["purelib"], paths["platlib"]))
    dirs.add(site.getusersitepackages())
    dirs.add(str(Path(__file__).resolve().parents[1]))
    return tuple(sorted(os.path.realpath(d) for d in dirs if d))


@functools.lru_cache(maxsize=1)
def detect_isolation() -> str:
    """The strongest isolation that works on this machine, found by a probe run in each:
    ``namespaces`` (root on Linux), ``userns`` (unprivileged user namespaces), else ``rlimits``
    (with a warning that says what is lost). Raises :class:`SandboxError` when not even that runs
    (e.g. root without CAP_SYS_ADMIN and an interpreter other users cannot execute)."""
    reasons = []
    candidates = ["namespaces"] if os.geteuid() == 0 else ["userns"]
    if sys.platform != "linux":
        candidates, reasons = [], ["not Linux"]
    for level in candidates:
        try:
            probe = Sandbox(isolation=level, limits=Limits(cpu_seconds=5, wall_seconds=20)).run("print(6 * 7)")
            if probe.ok and probe.stdout.strip() == "42":
                return level
            reasons.append(f"{level}: probe gave {probe.verdict.value}: {probe.stderr[-300:]}")
        except SandboxError as e:
            reasons.append(f"{level}: {e}")
    try:
        probe = Sandbox(isolation="rlimits", limits=Limits(cpu_seconds=5, wall_seconds=20)).run("print(6 * 7)")
    except SandboxError as e:
        raise SandboxError(f"no sandbox works on this machine ({'; '.join(reasons)}; rlimits: {e})") from None
    if not (probe.ok and probe.stdout.strip() == "42"):
        raise SandboxError(f"no sandbox works on this machine; the rlimits probe gave {probe.verdict.value}: {probe.stderr[-300:]}")
    warnings.warn(
        f"sandbox: namespace isolation unavailable ({'; '.join(reasons)}); falling back to rlimits "
        "only: no network/file-system isolation beyond a Python audit hook and file permissions",
        RuntimeWarning,
        stacklevel=2,
    )
    return "rlimits"


class Sandbox:
    """Runs programs of one language under :class:`Limits`.

    >>> Sandbox(limits=Limits(cpu_seconds=1)).run("print(input()[::-1])", stdin="abc").stdout
    'cba\\n'
    """

    def __init__(
        self,
        limits: Limits | None = None,
        language: Language = PYTHON,
        isolation: str = "auto",
        base_dir: str | os.PathLike | None = None,
        hidden_paths: Sequence[str] | None = None,
        seccomp: bool = True,
    ) -> None:
        if isolation not in ISOLATION_LEVELS + ("auto",):
            raise ValueError(f"isolation must be 'auto' or one of {ISOLATION_LEVELS}, got {isolation!r}")
        if isolation == "namespaces" and os.geteuid() != 0:
            raise SandboxError("isolation='namespaces' needs root; use 'userns', 'rlimits' or 'auto'")
        if isolation == "userns" and os.geteuid() == 0:
            # Root's user namespace would map the job back to uid 0 on the host: use a fresh uid.
            raise SandboxError("isolation='userns' is for unprivileged users; as root use 'namespaces'")
        self.limits = limits or Limits()
        self.language = language
        self._isolation = isolation
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.hidden_paths = tuple(hidden_paths) if hidden_paths is not None else library_dirs()
        self.seccomp = seccomp  # False only to test the other layers on their own

    @property
    def isolation(self) -> str:
        if self._isolation == "auto":
            self._isolation = detect_isolation()
        return self._isolation

    def run(self, source: str, stdin: str = "", limits: Limits | None = None) -> RunResult:
        """Run ``source`` once with ``stdin``."""
        return self.run_many(source, [stdin], limits=limits)[0]

    def run_many(
        self,
        source: str,
        inputs: Sequence[str],
        limits: Limits | None = None,
        stop_on_error: bool = False,
    ) -> list[RunResult]:
        """Run ``source`` once per input, in one sandbox launch (one work directory, so files a
        job leaves behind are visible to the next; each job has fresh limits and processes).

        With ``stop_on_error`` the jobs after the first one that crashes or times out are not
        run and are absent from the result. A compile step, if the language has one, runs first;
        if it fails every input gets its ``compile_error`` result.
        """
        if not inputs:
            return []
        limits = limits or self.limits
        isolation = self.isolation
        hostdir = Path(tempfile.mkdtemp(prefix="leafe-sbx-", dir=self.base_dir))
        try:
            return self._launch(hostdir, source, list(inputs), limits, isolation, stop_on_error)
        finally:
            _remove_tree(hostdir)

    # -- internals ---------------------------------------------------------------------------

    def _launch(
        self, hostdir: Path, source: str, inputs: list[str], limits: Limits, isolation: str, stop_on_error: bool
    ) -> list[RunResult]:
        workdir = hostdir / "work"
        workdir.mkdir(mode=0o700)
        if isolation == "rlimits":  # the program reaches its work dir by path; the rest stays 0600
            os.chmod(hostdir, 0o711)
        _write_file(workdir / self.language.source_name, source, 0o644)
        namespaced = isolation in ("namespaces", "userns")
        seen_dir = "/tmp" if namespaced else str(workdir)
        subst = {
            "source": f"{seen_dir}/{self.language.source_name}",
            "workdir": seen_dir,
            "guard": "0" if namespaced else "1",
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": seen_dir, "TMPDIR": seen_dir, "LANG": "C.UTF-8"}
        jobs = []
        if self.language.compile_argv:
            _write_file(hostdir / "compile.in", "")
            jobs.append(self._job("compile", self.language.compile_argv, subst, env, limits, stop=True))
        for i, text in enumerate(inputs):
            _write_file(hostdir / f"{i}.in", text)
            jobs.append(self._job(str(i), self.language.run_argv, subst, env, limits, stop=stop_on_error))
        if namespaced:
            (hostdir / "root").mkdir(mode=0o755)
        config = {
            "isolation": isolation,
            "uid_base": UID_BASE,
            "root": str(hostdir / "root"),
            "hide": list(self.hidden_paths),
            "workdir": str(workdir),
            "cwd": seen_dir,
            "expose": list(self.language.expose),
            "seccomp": self.seccomp,
            "limits": {
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
                "max_processes": limits.max_processes,
                "max_output_bytes": limits.max_output_bytes,
                "max_open_files": limits.max_open_files,
                "max_disk_bytes": limits.max_disk_bytes,
            },
            "jobs": jobs,
        }
        _write_file(hostdir / "config.json", json.dumps(config))
        status = self._run_launcher(hostdir, sum(j["wall_seconds"] for j in jobs), isolation)
        job_status = status["jobs"]
        compiled = not self.language.compile_argv
        if not compiled:
            comp = self._result(hostdir, "compile", job_status[0], limits, isolation, status)
            job_status = job_status[1:]
            if comp.verdict is not Verdict.OK:
                comp.verdict = Verdict.COMPILE_ERROR
                return [replace(comp) for _ in inputs]
        return [self._result(hostdir, str(i), s, limits, isolation, status) for i, s in enumerate(job_status)]

    @staticmethod
    def _job(name: str, argv: Sequence[str], subst: dict, env: dict, limits: Limits, stop: bool) -> dict:
        return {
            "argv": [a.replace("{source}", subst["source"]).replace("{workdir}", subst["workdir"]).replace("{guard}", subst["guard"]) for a in argv],
            "env": env,
            "stdin": f"{name}.in",
            "stdout": f"{name}.out",
            "stderr": f"{name}.err",
            "wall_seconds": limits.wall_seconds,
            "stop_on_error": stop,
        }

    def _run_launcher(self, hostdir: Path, total_wall: float, isolation: str) -> dict:
        argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", str(_LAUNCHER), str(hostdir)]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        # The launcher enforces every job's wall limit; this backstop only catches a stuck launcher.
        backstop = total_wall + 10.0
        try:
            _, err = proc.communicate(timeout=backstop)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise SandboxError(f"sandbox launcher did not finish within {backstop:.0f}s; killed")
        status_path = hostdir / "status.json"
        if not status_path.exists():
            raise SandboxError(f"sandbox launcher exited with {proc.returncode} without a status: {err.decode(errors='replace')[-2000:]}")
        status = json.loads(status_path.read_text())
        if status.get("error"):
            raise SandboxError(status["error"])
        for job in status["jobs"]:
            if job.get("exec_error"):
                hint = ""
                if "Permission denied" in job["exec_error"] and isolation == "rlimits":
                    hint = (" (the program runs as an unprivileged uid: its interpreter must be readable"
                            " by others, or use isolation='namespaces', which exposes it)")
                raise SandboxError(f"sandbox could not start the program: {job['exec_error']}{hint}")
        return status

    def _result(self, hostdir: Path, name: str, job: dict, limits: Limits, isolation: str, status: dict) -> RunResult:
        stdout = _read_head(hostdir / f"{name}.out", limits.max_output_bytes)
        stderr = _read_tail(hostdir / f"{name}.err", _TAIL_CHARS)
        exit_code, sig = job["exit_code"], job["signal"]
        cpu = job["cpu_seconds"]  # the whole process tree's, reaped or not
        if job["timed_out"] or job["cpu_exceeded"] or sig == signal.SIGXCPU or cpu > limits.cpu_seconds:
            verdict = Verdict.TIMEOUT
        elif job["output_exceeded"] or sig == signal.SIGXFSZ:
            verdict = Verdict.OUTPUT_LIMIT
        elif exit_code == 0:
            verdict = Verdict.OK
        elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            verdict = Verdict.MEMORY_LIMIT
        elif exit_code == COMPILE_ERROR_EXIT and self.language.name == "python":
            verdict = Verdict.COMPILE_ERROR
        elif sig is not None:
            verdict = Verdict.KILLED
        else:
            verdict = Verdict.RUNTIME_ERROR
        return RunResult(
            verdict=verdict,
            stdout=stdout,
            stderr=stderr,
            exit_code=exit_code,
            signal=sig,
            cpu_seconds=cpu,
            wall_seconds=job["wall_seconds"],
            max_rss_bytes=job["max_rss_bytes"],
            isolation=isolation,
            info={"uid": status.get("uid"), "hostdir": str(hostdir), "seccomp": status.get("seccomp"),
                  "ipc_quotas": status.get("ipc_quotas"), "job_userns": status.get("job_userns"), "main_cpu_seconds": job.get("main_cpu_seconds"),
                  "stopped_for": "cpu" if job["cpu_exceeded"] else "wall" if job["timed_out"]
                  else "output" if job["output_exceeded"] else None},
        )


def _write_file(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:  # any str, lone surrogates included (they reach the program as bytes)
        f.write(text.encode("utf-8", "surrogatepass"))


def _read_head(path: Path, limit: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _read_tail(path: Path, chars: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: Path) -> None:
    """Remove a work tree even if the program left unwritable directories in it."""

    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        func(p)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)
