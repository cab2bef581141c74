"""Attacks on the sandbox at the "namespaces" isolation level, one class each (issue 15), and the
proof that nothing of a run's uid survives it. Each attack program is ours; each test shows the
attack fails *and* the host is unharmed. They need root on Linux (namespaces isolation); CI and
the project machines run as root, so they run there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from leafe_fast.envs.sandbox import PYTHON, Limits, Sandbox, Verdict

LIMITS = Limits(cpu_seconds=1, wall_seconds=20, memory_bytes=96 << 20, max_processes=8, max_output_bytes=64 << 10)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="namespace isolation needs root on Linux"
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    sandbox = Sandbox(limits=LIMITS, isolation="namespaces")
    probe = sandbox.run("print(1)")
    assert probe.ok, probe.stderr
    return sandbox


def _run_ok(sandbox: Sandbox, program: str, **kwargs) -> list[str]:
    result = sandbox.run(program, **kwargs)
    assert result.verdict is Verdict.OK, (result.verdict, result.stderr)
    return result.stdout.split("\n")


_LIBC = "import ctypes, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\ndef err():\n    return errno.errorcode.get(ctypes.get_errno(), '?')\n"


# -- 1. host disk through stdout/stderr ----------------------------------------------------------


def test_fallocate_on_stdout_and_stderr_reserves_no_host_disk(sandbox: Sandbox, tmp_path: Path) -> None:
    before = shutil.disk_usage(tmp_path).used
    program = _LIBC + (
        "libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]\n"
        "out = []\n"
        "for fd in (0, 1, 2):\n"
        "    r = libc.fallocate(fd, 1, 0, 256 << 20)  # FALLOC_FL_KEEP_SIZE\n"
        "    out.append(err() if r else 'reserved')\n"
        "for path in ('/proc/self/fd/0', '/proc/self/fd/1', '/dev/stdout'):\n"
        "    try:\n"
        "        fd = os.open(path, os.O_RDWR)\n"
        "        r = libc.fallocate(fd, 1, 0, 256 << 20)\n"
        "        out.append(err() if r else 'reserved')\n"
        "    except OSError as e:\n"
        "        out.append(errno.errorcode[e.errno])\n"
        "print(*out)\n"
    )
    sandbox_here = Sandbox(limits=LIMITS, isolation="namespaces", base_dir=tmp_path)
    words = _run_ok(sandbox_here, program)[0].split()
    assert "reserved" not in words, words
    assert words[:3] == ["EBADF", "ESPIPE", "ESPIPE"]  # stdin is read-only, stdout/stderr are pipes
    assert shutil.disk_usage(tmp_path).used - before < 16 << 20


def test_shell_fallocate_on_stdout_fails(sandbox: Sandbox) -> None:
    if not shutil.which("fallocate"):
        pytest.skip("no fallocate(1)")
    program = (
        "import subprocess\n"
        "r = subprocess.run(['sh', '-c', 'fallocate -n -l 256M /dev/stdout; echo rc=$? >&2'], capture_output=False)\n"
    )
    result = sandbox.run(program)
    assert "rc=1" in result.stderr, result.stderr


def test_output_flood_on_stderr_and_stdout_is_capped_and_killed(sandbox: Sandbox) -> None:
    program = "import os\nwhile True:\n    os.write(2, b'e' * 65536)\n    os.write(1, b'o' * 65536)\n"
    start = time.monotonic()
    result = sandbox.run(program)
    assert result.verdict is Verdict.OUTPUT_LIMIT
    assert len(result.stdout) <= LIMITS.max_output_bytes and len(result.stderr) <= 4000
    assert time.monotonic() - start < 10  # killed at the cap, not at the wall limit
    only_stderr = sandbox.run("import os\nwhile True:\n    os.write(2, b'e' * 65536)\n")
    assert only_stderr.verdict is Verdict.OUTPUT_LIMIT and only_stderr.info["stopped_for"] == "output"


# -- 2/3. memory through System V / POSIX IPC ----------------------------------------------------


def test_sysv_shm_msg_sem_and_posix_mqueue_and_memfd_are_refused(sandbox: Sandbox) -> None:
    program = _LIBC + (
        "libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]\n"
        "res = {}\n"
        "res['shm_big'] = libc.shmget(0, 512 << 20, 0o1600)\n"
        "res['shm_big_err'] = err()\n"
        "res['shm_small'] = libc.shmget(0, 4096, 0o1600)\n"
        "res['msg'] = libc.msgget(0, 0o1600)\n"
        "res['sem'] = libc.semget(0, 1, 0o1600)\n"
        "rt = ctypes.CDLL('librt.so.1', use_errno=True)\n"
        "res['mq'] = rt.mq_open(b'/leafe', os.O_CREAT | os.O_RDWR, 0o600, None)\n"
        "try:\n"
        "    os.memfd_create('x')\n"
        "    res['memfd'] = 0\n"
        "except OSError as e:\n"
        "    res['memfd'] = -e.errno\n"
        "print(sorted(res.items()))\n"
    )
    out = eval(_run_ok(sandbox, program)[0])  # noqa: S307 - our own program's repr
    values = dict(out)
    assert values["shm_big"] == values["shm_small"] == values["msg"] == values["sem"] == values["mq"] == -1, values
    assert values["memfd"] < 0
    assert values["shm_big_err"] in ("EINVAL", "ENOSPC")


def test_posix_shared_memory_is_capped_with_the_work_dir_and_multiprocessing_works() -> None:
    limits = replace(LIMITS, max_disk_bytes=8 << 20, max_output_bytes=4 << 20)  # the per-file limit stays out of the way
    sandbox = Sandbox(limits=limits, isolation="namespaces")
    program = (
        "from multiprocessing import shared_memory\n"
        "held = []\n"
        "for i in range(64):\n"
        "    shm = shared_memory.SharedMemory(create=True, size=1 << 20)\n"
        "    shm.buf[:] = b'x' * (1 << 20)  # touch every page: past the cap the kernel sends SIGBUS\n"
        "    held.append(shm)\n"
        "    print(len(held), flush=True)\n"
    )
    result = sandbox.run(program)
    assert result.verdict in (Verdict.KILLED, Verdict.RUNTIME_ERROR), (result.verdict, result.stderr)
    assert 0 < int(result.stdout.split()[-1]) <= 8  # the 8 MiB work dir, never 64 MiB
    pool = "import multiprocessing as mp\nwith mp.get_context('fork').Pool(2) as pool:\n    print(pool.map(abs, [-1, -2]))\n"
    # A pool is 2 workers + 3 handler threads, and threads count against the process limit: give it room,
    # so what is checked is the semaphores (POSIX shared memory in /dev/shm), not the thread count.
    roomy = Sandbox(limits=replace(limits, max_processes=32), isolation="namespaces")
    assert _run_ok(roomy, pool)[0] == "[1, 2]"


def test_shell_ipcmk_is_refused(sandbox: Sandbox) -> None:
    if not shutil.which("ipcmk"):
        pytest.skip("no ipcmk(1)")
    program = (
        "import subprocess\n"
        "for flag in (['-M', str(256 << 20)], ['-Q'], ['-S', '1']):\n"
        "    print(subprocess.run(['ipcmk', *flag], capture_output=True).returncode)\n"
    )
    assert _run_ok(sandbox, program)[:3] == ["1", "1", "1"]


def test_shared_memory_cannot_outgrow_the_memory_limit(sandbox: Sandbox) -> None:
    """The attack of the report: detached segments adding up to 512 MiB with a 96 MiB limit."""
    program = _LIBC + (
        "libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]\n"
        "libc.shmdt.argtypes = [ctypes.c_void_p]\n"
        "held = 0\n"
        "for _ in range(8):\n"
        "    sid = libc.shmget(0, 64 << 20, 0o1600)\n"
        "    if sid < 0:\n"
        "        break\n"
        "    addr = libc.shmat(sid, None, 0)\n"
        "    ctypes.memset(addr, 1, 64 << 20)\n"
        "    libc.shmdt(addr)\n"
        "    held += 64\n"
        "print(held)\n"
    )
    assert _run_ok(sandbox, program)[0] == "0"
    assert "leafe" not in Path("/proc/sysvipc/shm").read_text()


# -- 4. CPU time of children that are never reaped -----------------------------------------------

_BURN = "def burn(seconds):\n    end = time.process_time() + seconds\n    while time.process_time() < end:\n        pass\n"


@pytest.mark.parametrize("parent", ["exits", "sleeps", "ignores_sigchld"])
def test_cpu_of_unreaped_children_counts(sandbox: Sandbox, parent: str) -> None:
    program = "import os, signal, sys, time\n" + _BURN + (
        "if sys.argv[0] and %r == 'ignores_sigchld':\n"
        "    try:\n"
        "        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel would reap, uncounted\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno, file=sys.stderr)\n"
        "r, w = os.pipe()\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        burn(0.6)\n"
        "        os.write(w, b'.')\n"
        "        os._exit(0)\n"
        "got = b''\n"
        "while len(got) < 3:  # the children's work is done; they are never reaped\n"
        "    got += os.read(r, 3)\n"
        "if %r == 'sleeps':\n"
        "    time.sleep(30)\n"
        "elif %r == 'ignores_sigchld':\n"
        "    time.sleep(3)\n"
        "print('done')\n"
    ) % (parent, parent, parent)
    result = sandbox.run(program)
    assert result.verdict is Verdict.TIMEOUT, (result.verdict, result.cpu_seconds, result.stderr)
    assert result.cpu_seconds > LIMITS.cpu_seconds  # the tree's CPU, not the parent's ~0.02 s
    if parent == "sleeps":  # stopped at the CPU limit, long before the 20 s wall limit
        assert result.info["stopped_for"] == "cpu" and result.wall_seconds < 15
    if parent == "ignores_sigchld":
        assert "refused 1" in result.stderr


def test_tree_cpu_is_measured_for_a_program_within_its_limit(sandbox: Sandbox) -> None:
    program = "import os, time\n" + _BURN + (
        "pids = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        burn(0.25)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n"
        "    os.waitpid(pid, 0)\n"
        "print('ok')\n"
    )
    result = sandbox.run(program, limits=replace(LIMITS, cpu_seconds=3))
    assert result.verdict is Verdict.OK and result.stdout == "ok\n"
    assert 0.5 <= result.cpu_seconds < 1.5
    assert result.info["main_cpu_seconds"] >= 0.5  # reaped by the program: counted either way


# -- 5. setuid and file-capability binaries ------------------------------------------------------

_C_IDS = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("euid=%d ", (int)geteuid());
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7) || !strncmp(line, "NoNewPrivs:", 11)) { line[strcspn(line, "\n")] = 0; printf("%s ", line); }
    printf("\n");
    return 0;
}
"""


def test_setuid_and_file_capability_binaries_gain_nothing(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    if cc is None or not os.path.isdir("/var/tmp"):
        pytest.skip("needs a C compiler and /var/tmp")
    outside = Path(tempfile.mkdtemp(prefix="leafe-suid-", dir="/var/tmp"))
    try:
        os.chmod(outside, 0o755)
        source = outside / "ids.c"
        source.write_text("#include <string.h>\n" + _C_IDS)
        suid, fcap = outside / "suid", outside / "fcap"
        subprocess.run([cc, "-O1", "-o", str(suid), str(source)], check=True)
        shutil.copy(suid, fcap)
        os.chmod(suid, 0o4755)  # setuid root
        os.chmod(fcap, 0o755)
        # file capabilities (vfs_cap_data v2): every capability permitted and effective
        caps = (0x02000000 | 1).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little") + bytes(4) + (0x1FF).to_bytes(4, "little") + bytes(4)
        try:
            os.setxattr(fcap, "security.capability", caps)
        except OSError:
            fcap = None
        host = subprocess.run(["runuser", "-u", "nobody", "--", str(suid)], capture_output=True, text=True)
        if host.returncode == 0:
            assert host.stdout.startswith("euid=0 ")  # the binary really is setuid root on the host
        exposing = Sandbox(limits=LIMITS, isolation="namespaces", language=replace(PYTHON, expose=PYTHON.expose + (str(outside),)))
        program = (
            "import os, subprocess\n"
            f"for exe in [{str(suid)!r}, {str(fcap) if fcap else ''!r}] + [p for p in ('/usr/bin/newgrp', '/usr/bin/chfn', '/usr/bin/gpasswd', '/usr/bin/su', '/bin/su') if os.path.exists(p)]:\n"
            "    if not exe:\n"
            "        continue\n"
            "    print(exe, os.statvfs(exe).f_flag & os.ST_NOSUID != 0)\n"
            "    if not exe.startswith('/usr') and not exe.startswith('/bin'):\n"
            "        print(subprocess.run([exe], capture_output=True, text=True).stdout.strip())\n"
            "print(open('/proc/self/status').read().count('NoNewPrivs:\\t1'))\n"
        )
        out = _run_ok(exposing, program)
        assert out[-2] == "1"  # no-new-privileges
        for line in out:
            if line.startswith("/"):
                assert line.endswith(" True"), line  # every binary sits on a nosuid mount
            if line.startswith("euid="):
                assert not line.startswith("euid=0 ") and "CapEff:\t0000000000000000" in line, line
        assert sum(line.startswith("euid=") for line in out) == (2 if fcap else 1)
    finally:
        shutil.rmtree(outside)


def test_every_mount_is_nosuid_and_nodev_but_device_nodes(sandbox: Sandbox) -> None:
    program = (
        "for line in open('/proc/self/mountinfo'):\n"
        "    f = line.split()\n"
        "    print(f[4], f[5])\n"
    )
    lines = [line for line in _run_ok(sandbox, program) if line]
    assert lines
    for line in lines:
        target, opts = line.split(" ", 1)
        opts = set(opts.split(","))
        assert "nosuid" in opts, line
        if not target.startswith("/dev/"):
            assert "nodev" in opts, line


# -- 6. keyrings and other per-uid kernel state --------------------------------------------------

_KEYS = _LIBC + (
    "def add(name):\n"
    "    r = libc.syscall(248, b'user', name, b'secret', 6, ctypes.c_int(-4))  # add_key to @u\n"
    "    return r if r >= 0 else err()\n"
    "def find(name):\n"
    "    r = libc.syscall(250, 10, ctypes.c_int(-4), b'user', name, 0)  # KEYCTL_SEARCH @u\n"
    "    return 'found' if r >= 0 else err()\n"
    "import sys\n"
    "cmd = sys.stdin.read().strip()\n"
    "print(add(b'leafe-key') if cmd == 'add' else find(b'leafe-key'))\n"
)


def test_keyring_syscalls_are_refused(sandbox: Sandbox) -> None:
    first, second = sandbox.run_many(_KEYS, ["add", "find"])
    assert first.stdout.strip() == "EPERM" and second.stdout.strip() == "EPERM"


def test_keys_do_not_outlive_a_job_even_without_seccomp() -> None:
    """Two jobs of one launch share a uid; each has its own user namespace, so a key the first
    stores in its user keyring is not there for the second (the layer under the seccomp filter)."""
    bare = Sandbox(limits=LIMITS, isolation="namespaces", seccomp=False)
    first, second = bare.run_many(_KEYS, ["add", "find"])
    assert first.stdout.strip().isdigit(), first.stdout + first.stderr  # stored
    assert second.stdout.strip() == "ENOKEY"
    assert first.info["uid"] == second.info["uid"] and first.info["job_userns"] is True
    assert _key_user_gone(first.info["uid"])


def _key_user_gone(uid: int, seconds: float = 5.0) -> bool:
    """The kernel frees a dead namespace's keys asynchronously; give its collector a moment."""
    deadline = time.monotonic() + seconds
    while True:
        users = [line.split(":")[0].strip() for line in Path("/proc/key-users").read_text().splitlines()]
        if str(uid) not in users:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


_C_SYSCALLS = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    long r = syscall(SYS_keyctl, 0, 0, 0, 0, 0);
    printf("keyctl %s\n", r < 0 ? strerror(errno) : "allowed");
    r = syscall(SYS_unshare, 0x10000000);
    printf("unshare %s\n", r < 0 ? strerror(errno) : "allowed");
    fflush(stdout);
    /* the same call through the i386 entry point, where the syscall numbers differ (keyctl = 288) */
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(288L), "b"(0L), "c"(0L), "d"(0L) : "memory");
    printf("int80 %ld\n", r);
    return 0;
}
"""


def test_c_program_cannot_reach_refused_syscalls_by_another_abi(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    if cc is None or os.uname().machine != "x86_64" or not os.path.isdir("/var/tmp"):
        pytest.skip("needs cc on x86_64 and /var/tmp")
    outside = Path(tempfile.mkdtemp(prefix="leafe-c-", dir="/var/tmp"))
    try:
        os.chmod(outside, 0o755)
        (outside / "attack.c").write_text(_C_SYSCALLS)
        subprocess.run([cc, "-O1", "-o", str(outside / "attack"), str(outside / "attack.c")], check=True)
        exposing = Sandbox(limits=LIMITS, isolation="namespaces", language=replace(PYTHON, expose=PYTHON.expose + (str(outside),)))
        program = f"import os\nos.execv({str(outside / 'attack')!r}, ['attack'])\n"
        result = exposing.run(program)
        assert result.stdout.splitlines() == ["keyctl Operation not permitted", "unshare Operation not permitted"]
        assert result.verdict is Verdict.KILLED and result.signal == 31  # SIGSYS: foreign ABI kills
    finally:
        shutil.rmtree(outside)


# -- nothing of a run's uid survives it ----------------------------------------------------------

_LITTER = _LIBC + (
    "import subprocess, time\n"
    "open('/tmp/left.txt', 'w').write('x')\n"
    "libc.shmget(0, 4096, 0o1600); libc.msgget(0, 0o1600); libc.semget(0, 1, 0o1600)\n"
    "libc.syscall(248, b'user', b'leafe-litter', b'v', 1, ctypes.c_int(-4))\n"
    "libc.syscall(248, b'user', b'leafe-litter', b'v', 1, ctypes.c_int(-3))  # session keyring\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60)\n"
    "        os._exit(0)\n"
    "subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
    "print('littered')\n"
)


@pytest.mark.parametrize("seccomp", [True, False])
def test_nothing_of_the_run_uid_survives(tmp_path: Path, seccomp: bool) -> None:
    sandbox = Sandbox(limits=LIMITS, isolation="namespaces", base_dir=tmp_path, seccomp=seccomp)
    result = sandbox.run(_LITTER)
    assert result.stdout == "littered\n", result.stderr
    uid = result.info["uid"]
    # processes
    owners = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                owners.append(os.stat(f"/proc/{name}").st_uid)
            except OSError:
                pass
    assert uid not in owners
    # files: the work tree is gone, and nothing of the uid in the usual shared places
    assert list(tmp_path.iterdir()) == []
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(folder):
            assert all(os.lstat(os.path.join(folder, n)).st_uid != uid for n in os.listdir(folder))
    # System V IPC objects (the host's namespace; the job's own died with it)
    for kind in ("shm", "msg", "sem"):
        path = Path(f"/proc/sysvipc/{kind}")
        if path.exists():
            rows = [line.split() for line in path.read_text().splitlines()[1:]]
            header = path.read_text().splitlines()[0].split()
            column = header.index("uid")
            assert all(int(row[column]) != uid for row in rows)
    # keys
    assert _key_user_gone(uid)


# -- the seccomp filter ---------------------------------------------------------------------------


def test_seccomp_filter_refuses_what_a_judged_program_never_needs(sandbox: Sandbox) -> None:
    program = _LIBC + (
        "calls = {'ptrace': (101, 0, 1), 'mount': (165, 0, 0), 'unshare': (272, 0x10000000), 'bpf': (321, 0, 0, 0),\n"
        "         'perf_event_open': (298, 0, 0, -1, -1, 0), 'init_module': (175, 0, 0, 0), 'keyctl': (250, 0, 0),\n"
        "         'kexec_load': (246, 0, 0, 0, 0), 'setns': (308, 0, 0), 'userfaultfd': (323, 0), 'io_uring_setup': (425, 1, 0)}\n"
        "for name, args in calls.items():\n"
        "    r = libc.syscall(*args)\n"
        "    print(name, 'allowed' if r >= 0 else err())\n"
        "print('clone_newuser', 'allowed' if libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0) == 0 else err())\n"
        "import socket\n"
        "for family in (38, 40, 17):  # AF_ALG, AF_VSOCK, AF_PACKET\n"
        "    try:\n"
        "        socket.socket(family, socket.SOCK_SEQPACKET if family != 17 else socket.SOCK_RAW)\n"
        "        print('family', family, 'allowed')\n"
        "    except OSError as e:\n"
        "        print('family', family, errno.errorcode[e.errno])\n"
        "a, b = socket.socketpair(); a.sendall(b'x'); print('socketpair', b.recv(1).decode())\n"
        "import subprocess, threading\n"
        "t = threading.Thread(target=print, args=('thread ok',)); t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'spawn ok'], capture_output=True, text=True).stdout.strip())\n"
    )
    result = sandbox.run(program)
    assert result.info["seccomp"] is True or os.uname().machine != "x86_64"
    if not result.info["seccomp"]:
        pytest.skip("no seccomp filter on this architecture")
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if not line.startswith("family"))
    assert lines.pop("thread") == "ok" and lines.pop("spawn") == "ok" and lines.pop("socketpair") == "x"
    assert set(lines.values()) == {"EPERM"}, lines
    families = [line for line in result.stdout.splitlines() if line.startswith("family")]
    assert families == [f"family {f} EAFNOSUPPORT" for f in (38, 40, 17)], families
