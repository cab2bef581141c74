"""The privileged half of the sandbox: a launcher that isolates, then runs untrusted jobs.

Run as a script (``python -I -S -B _sandbox_init.py HOSTDIR``) by :mod:`leafe_fast.envs.sandbox`,
never imported by the library; it uses the standard library only, so it starts in ~20 ms without
site-packages. ``HOSTDIR`` holds ``config.json`` (written by the parent), the job inputs, and
receives the job outputs and ``status.json``.

Isolation ``namespaces`` (needs root): the launcher enters new mount, network, PID, IPC and UTS
namespaces, sets the IPC namespace's quotas to zero (no System V shared memory, message queues or
semaphores, no POSIX message queues: kernel-held memory no process limit would count), builds a
minimal read-only root (system directories, the interpreter's prefix, and a size-limited tmpfs as
``/tmp`` seeded with the work directory's files; every mount ``nosuid,nodev`` but the device nodes)
and pivots into it. It then forks the PID namespace's init, which runs each job as a fresh
unprivileged uid (``uid_base + launcher pid``: unique among live sandboxes) inside a user namespace
of its own (so keyrings and other per-user kernel state are the job's and die with it), with
``PR_SET_NO_NEW_PRIVS`` (setuid and file-capability binaries gain nothing) and a seccomp filter
(:func:`seccomp_filter`). After each job init kills everything left in the namespace and reaps it;
when init exits the kernel kills whatever remains. If the launcher dies, init follows it
(``PR_SET_PDEATHSIG``).

Every level: stdout and stderr are pipes that the launcher reads with a cap (an over-long output is
killed), so nothing the job does to its output touches the host's disk; the CPU time that decides
the verdict is that of the job's whole process tree, reaped or not (see :func:`_supervise`).

Isolation ``userns`` (unprivileged): the same, entered as root of a new user namespace that maps
the invoking user; each job runs as uid 1000 of its own nested user namespace.

Isolation ``rlimits`` (fallback): only resource limits, a new session per job, no-new-privileges
and the seccomp filter, and the Python-level network guard of the job's bootstrap. See the module
docstring of ``sandbox.py`` for what does and does not hold at each level.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_STRICTATIME = 1 << 24
# Per-mount flags a read-only remount must keep (in a user namespace they are locked).
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "relatime": MS_RELATIME,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "strictatime": MS_STRICTATIME}
MNT_DETACH = 2
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}  # syscall numbers
JOB_UID = 1000  # the job's uid inside its own user namespace (userns isolation)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")


# -- seccomp -----------------------------------------------------------------------------------
# A hand-written classic-BPF filter (no libseccomp needed), x86_64 only: syscall numbers differ per
# architecture and only this one is tested; elsewhere jobs run without it (status says so).
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
# Syscalls a judged program never needs: kernel keyrings (state that outlives processes), tracing
# and other processes' memory, mounts and namespaces (a nested user namespace could mount a tmpfs
# outside every limit), kernel modules, kexec, BPF, perf, io_uring and userfaultfd (large attack
# surface), memfd_create (shmem no limit counts: fallocate with KEEP_SIZE ignores RLIMIT_FSIZE),
# accounting, swap, reboot, quotas, file handles.
BLOCKED_SYSCALLS_X86_64 = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "vhangup": 153, "pivot_root": 155, "chroot": 161,
    "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442, "quotactl_fd": 443, "memfd_secret": 447,
}
_NR_CLONE, _NR_CLONE3, _NR_RT_SIGACTION, _NR_SOCKET, _NR_SOCKETPAIR = 56, 435, 13, 41, 53
# Socket families a program may open (unix, inet, inet6, netlink: libc's address lookups use it);
# the rest (AF_ALG, AF_VSOCK, AF_PACKET, AF_KEY, ...) is kernel surface it never needs.
SOCKET_FAMILIES = (1, 2, 10, 16)
_EAFNOSUPPORT = 97
# clone() flags that create namespaces (CLONE_NEWTIME is 0x80, which clone() reads as exit signal).
CLONE_NEW_MASK = 0x7E020000
_X32_BIT = 0x40000000


_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def _assemble(lines: list[tuple]) -> list[tuple[int, int, int, int]]:
    """Classic BPF from ``(code, k, jt_label, jf_label)`` rows and ``("label", name)`` rows; a jump
    label of None means "the next instruction". Jumps go forward only, at most 255 apart."""
    positions, n = {}, 0
    for row in lines:
        if row[0] == "label":
            positions[row[1]] = n
        else:
            n += 1
    prog, at = [], 0
    for row in lines:
        if row[0] == "label":
            continue
        code, k, jt, jf = (tuple(row) + (None, None))[:4]
        offsets = [0 if label is None else positions[label] - at - 1 for label in (jt, jf)]
        if not all(0 <= o < 256 for o in offsets):
            raise ValueError(f"seccomp filter: jump out of range at instruction {at}")
        prog.append((code, offsets[0], offsets[1], k))
        at += 1
    return prog


def seccomp_filter() -> list[tuple[int, int, int, int]]:
    """The job's filter as (code, jt, jf, k) instructions. Blocked: the syscalls above (EPERM),
    ``clone`` with namespace flags (EPERM), ``clone3`` (ENOSYS, so libc falls back to ``clone``,
    whose flags a filter can read), x32 syscalls (EPERM) and foreign-architecture ones (kill),
    sockets of families other than :data:`SOCKET_FAMILIES` (EAFNOSUPPORT), and
    setting any action for SIGCHLD (``rt_sigaction(SIGCHLD, act != NULL)``, EPERM): ignoring
    SIGCHLD makes the kernel reap children without adding their CPU time to any parent, the one way
    a process tree could hide CPU time from its init. Reading the current action stays allowed."""
    deny, nosys = SECCOMP_RET_ERRNO | _EPERM, SECCOMP_RET_ERRNO | _ENOSYS
    lines: list[tuple] = [
        (_LD_W_ABS, 4),  # seccomp_data.arch
        (_JEQ_K, AUDIT_ARCH_X86_64, "native", None),
        (_RET_K, SECCOMP_RET_KILL_PROCESS),
        ("label", "native"),
        (_LD_W_ABS, 0),  # seccomp_data.nr
        (_JGE_K, _X32_BIT, "deny", None),
    ]
    lines += [(_JEQ_K, nr, "deny", None) for nr in sorted(BLOCKED_SYSCALLS_X86_64.values())]
    lines += [
        (_JEQ_K, _NR_CLONE3, "nosys", None),
        (_JEQ_K, _NR_CLONE, "clone", None),
        (_JEQ_K, _NR_RT_SIGACTION, "sigaction", None),
        (_JEQ_K, _NR_SOCKET, "socket", None),
        (_JEQ_K, _NR_SOCKETPAIR, "socket", None),
        ("label", "allow"),
        (_RET_K, SECCOMP_RET_ALLOW),
        ("label", "clone"),
        (_LD_W_ABS, 16),  # args[0], low word: the flags
        (_JSET_K, CLONE_NEW_MASK, "deny", "allow2"),
        ("label", "sigaction"),
        (_LD_W_ABS, 16),  # args[0]: the signal number
        (_JEQ_K, int(signal.SIGCHLD), None, "allow2"),
        (_LD_W_ABS, 24),  # args[1], low word: act
        (_JSET_K, 0xFFFFFFFF, "deny", None),
        (_LD_W_ABS, 28),  # args[1], high word
        (_JSET_K, 0xFFFFFFFF, "deny", None),
        ("label", "allow2"),
        (_RET_K, SECCOMP_RET_ALLOW),
        ("label", "socket"),
        (_LD_W_ABS, 16),  # args[0], low word: the family
    ]
    lines += [(_JEQ_K, family, "allow3", None) for family in SOCKET_FAMILIES]
    lines += [
        (_RET_K, SECCOMP_RET_ERRNO | _EAFNOSUPPORT),
        ("label", "allow3"),
        (_RET_K, SECCOMP_RET_ALLOW),
        ("label", "deny"),
        (_RET_K, deny),
        ("label", "nosys"),
        (_RET_K, nosys),
    ]
    return _assemble(lines)


def seccomp_supported() -> bool:
    """Whether :func:`install_seccomp` applies here: x86_64 Linux whose kernel takes the filter
    (tried in a forked child)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return False
    pid = os.fork()
    if pid == 0:
        try:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            install_seccomp()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def compile_seccomp() -> tuple:
    """:func:`seccomp_filter` as the kernel's ``sock_fprog`` (built once per launch, before the
    jobs fork; the array is kept alive with it)."""
    prog = seccomp_filter()
    array = (_SockFilter * len(prog))(*[_SockFilter(c, jt, jf, k) for c, jt, jf, k in prog])
    return _SockFprog(len(prog), array), array


def install_seccomp(compiled: tuple | None = None) -> None:
    """Install the filter on this thread (no-new-privileges must be set first)."""
    fprog, _ = compiled or compile_seccomp()
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0), "seccomp")


# -- IPC quotas ----------------------------------------------------------------------------------
# Per-IPC-namespace sysctls, written right after unsharing the IPC namespace: no System V shared
# memory, message queues or semaphores, no POSIX message queues. Their memory is held by the kernel,
# charged to no process, so no rlimit bounds it; a zero quota does.
IPC_QUOTAS = (
    ("kernel/shm_rmid_forced", "1"),
    ("kernel/shmmni", "0"),
    ("kernel/shmall", "0"),
    ("kernel/shmmax", "0"),
    ("kernel/msgmni", "0"),
    ("kernel/msgmnb", "0"),
    ("kernel/sem", "0 0 0 0"),
    ("fs/mqueue/queues_max", "0"),
)


def _set_ipc_quotas() -> None:
    for name, value in IPC_QUOTAS:
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(value)


def _mount_points() -> list[tuple[str, set[str]]]:
    """Mount points of this namespace with their per-mount flags, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # octal escapes (\040 for a space) in the mount point
            target = fields[4].encode().decode("unicode_escape")
            points.append((target, set(fields[5].split(","))))
    return points


# What a program sees of the host, read-only, besides its work dir and the interpreter's prefix.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# A minimal /dev: these nodes bound from the host, nothing else (no /dev/shm shared with the host).
DEVICES = ("null", "zero", "full", "random", "urandom")


def _within(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _build_root(
    root: str, workdir: str, expose: list[str], hide: list[str], disk_bytes: int, owner: int | None
) -> None:
    """In the new mount namespace, build a minimal root in ``root`` (init pivots into it).

    The root is a small tmpfs holding: the system directories, the interpreter prefixes (bound at
    their own paths, so nothing has to be traversable on the host), ``/tmp`` (read-write): a tmpfs
    of ``disk_bytes`` owned by ``owner``, starting with a copy of the work dir's files, so the
    program's writes together cannot fill the host's disk; a minimal ``/dev`` and an empty
    ``/proc`` (init mounts its own). Everything else of the host (home directories, /work, /var,
    /opt, /mnt, the host's /tmp) does not exist inside. Directories in ``hide`` that would be visible (site-packages holding this library and its problem files)
    are covered by empty tmpfs. Then every mount but /tmp is made read-only, and checked.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    bound: list[str] = []
    for path in list(SYSTEM_DIRS) + list(expose):
        path = os.path.abspath(path)
        if _within(path, ["/tmp", "/proc", "/dev"]) or path == "/":
            raise OSError(f"cannot expose {path}: /, /tmp, /proc and /dev are the sandbox's own")
        if not os.path.lexists(path) or _within(path, bound):
            continue
        target = root + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.mkdir(target, 0o755)
            _mount(path, target, None, MS_BIND | MS_REC)
            bound.append(path)
    os.mkdir(root + "/tmp", 0o755)
    owned = f",uid={owner},gid={owner}" if owner is not None else ""
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={int(disk_bytes)}{owned}")
    for entry in os.scandir(workdir):  # the program's source, written by the parent before launch
        if not entry.is_file(follow_symlinks=False):
            continue
        target = os.path.join(root + "/tmp", entry.name)
        shutil.copyfile(entry.path, target)
        os.chmod(target, entry.stat().st_mode & 0o777)
        if owner is not None:
            os.chown(target, owner, owner)
    os.mkdir(root + "/proc", 0o555)
    os.mkdir(root + "/dev", 0o755)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{root}/dev/{name}", "w").close()
            _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    # /dev/shm (POSIX shared memory and semaphores, e.g. multiprocessing's locks) is the work
    # dir: its pages count against the same size-capped tmpfs as the program's files.
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(target, f"{root}/dev/{name}")
    for path in hide:
        path = os.path.abspath(path)
        if _within(path, bound) and os.path.isdir(path):
            _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0555,size=4k")
    devices = {f"{root}/dev/{name}" for name in DEVICES}
    targets = []
    for target, opts in _mount_points():
        if not _within(target, [root]):
            continue
        targets.append(target)
        if target == root + "/tmp":
            continue
        # nosuid everywhere (setuid and file-capability binaries gain nothing), nodev everywhere
        # but on the device nodes themselves.
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if target in devices else MS_NODEV)
        for name in opts & _KEEP_FLAGS.keys():
            flags |= _KEEP_FLAGS[name]
        try:
            _mount(None, target, None, flags)
        except OSError:
            # A mount hidden under another one (stacked mounts) cannot be addressed by path;
            # the one on top is what the program sees, and it was remounted.
            pass
    # Verify instead of trusting: what the program sees at each mount point.
    for path in [root] + [root + p for p in bound]:
        if not _is_readonly(path):
            raise OSError(f"sandbox: could not make {path} read-only")
    for path in targets:
        flags = os.statvfs(path).f_flag
        if not flags & os.ST_NOSUID or (path not in devices and not flags & os.ST_NODEV):
            raise OSError(f"sandbox: could not make {path} nosuid,nodev")


def _enter_root(root: str) -> None:
    """Make ``root`` this mount namespace's root and drop the host tree (pivot_root, then a lazy
    unmount of the old root). Not chroot: a chrooted process may not create user namespaces, and
    the old root would stay reachable to anyone with CAP_SYS_CHROOT."""
    number = _PIVOT_ROOT.get(os.uname().machine)
    if number is None:  # unknown architecture: chroot still confines an unprivileged job
        os.chroot(root)
        os.chdir("/")
        return
    os.chdir(root)
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _is_readonly(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _set_limits(limits: dict, nproc: int | None) -> None:
    cpu = max(1, math.ceil(limits["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_output_bytes"], limits["max_output_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))  # POSIX message queues hold kernel memory
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _user_process_count(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _map_ids(uid_line: str, gid_line: str) -> None:
    """Write this process's uid and gid maps (one line each) right after unsharing a user
    namespace; setgroups must be denied first for an unprivileged writer."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_line), ("gid_map", gid_line)):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _own_user_namespace(uid: int) -> None:
    """Enter a user namespace of this job's own, as the same uid (so ``getuid()`` is unchanged):
    keyrings and other per-user kernel state then belong to this namespace and die with the job,
    whatever uid a later run gets. It may create no nested user namespace."""
    _prctl(PR_SET_DUMPABLE, 1)  # setuid cleared it; its /proc files must be its own to write the maps
    _check(_libc.unshare(CLONE_NEWUSER), "unshare user namespace")
    _map_ids(f"{uid} {uid} 1", f"{uid} {uid} 1")
    try:  # defence in depth: the seccomp filter refuses namespaces already
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError:
        pass


# Signals a Python launcher ignores and exec would pass on ignored; the job gets the defaults.
_RESET_SIGNALS = ("SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP")


def _exec_job(job: dict, cfg: dict, host_fd: int, uid: int | None, in_pid_namespace: bool,
              err_w: int, out_w: int, errpipe_w: int) -> None:
    """In the forked child: wire stdio (stdin from its file, stdout and stderr to the launcher's
    pipes), drop privileges, limit, exec. Never returns."""
    try:
        stdin = os.open(job["stdin"], os.O_RDONLY, dir_fd=host_fd)
        for target, fd in enumerate((stdin, out_w, errpipe_w)):
            os.dup2(fd, target)
        for fd in {stdin, out_w, errpipe_w}:
            if fd > 2:
                os.close(fd)
        os.umask(0o077)
        os.chdir(cfg["cwd"])  # before dropping privileges: the path may not be traversable
        limits = cfg["limits"]
        if not in_pid_namespace:
            os.setsid()  # own process group, so the whole group can be killed afterwards
        if uid is not None:  # a fresh uid: RLIMIT_NPROC counts this sandbox's processes only
            _set_limits(limits, limits["max_processes"])
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if in_pid_namespace and cfg.get("job_userns"):
                _own_user_namespace(uid)
        elif cfg["isolation"] == "userns":
            # A nested user namespace where the job is uid 1000: exec drops every capability, and
            # the mounts above are locked. Since Linux 5.14 RLIMIT_NPROC is counted per user
            # namespace, so the limit is this job's own.
            # The count one level up also holds the launcher and init: the new namespace's limit
            # there is the RLIMIT_NPROC at its creation, so allow those two, then set the job's.
            _set_limits(limits, limits["max_processes"] + 2)
            _check(_libc.unshare(CLONE_NEWUSER), "unshare user namespace")
            _map_ids(f"{JOB_UID} 0 1", f"{JOB_UID} 0 1")
            _set_limits(limits, limits["max_processes"])
        else:  # unprivileged fallback: the count is per user, so allow the current count plus the limit
            _set_limits(limits, _user_process_count(os.getuid()) + limits["max_processes"])
        for name in _RESET_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid and file-capability binaries run unprivileged
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the credential changes, which clear it
        if cfg.get("seccomp"):
            install_seccomp(_COMPILED_SECCOMP)  # last: it refuses the unshare above
        os.execve(job["argv"][0], job["argv"], job["env"])
    except BaseException as e:  # report through the close-on-exec pipe, then die
        try:
            os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


_CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_SAMPLE_SECONDS = 0.05  # how often the tree's CPU time is checked while a job runs
STDERR_KEEP = 16384  # bytes of stderr kept (its end: where tracebacks are)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _live_tree_cpu(in_pid_namespace: bool, uid: int | None) -> float:
    """CPU seconds of the job's processes alive now (zombies included), each with the children it
    has reaped: in a PID namespace every process but init (pid 1); otherwise the job uid's."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or (in_pid_namespace and name == "1"):
            continue
        try:
            if not in_pid_namespace and os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _CLOCK_TICK


class _Capture:
    """Reads a job's stdout (the first ``cap`` bytes) and stderr (its last bytes kept); either
    passing ``cap`` bytes in all sets ``overflow``."""

    def __init__(self, out_r: int, err_r: int, cap: int) -> None:
        self.fds = {out_r: bytearray(), err_r: bytearray()}
        self.out_r, self.cap, self.overflow = out_r, cap, False
        self.err_total = 0
        for fd in self.fds:
            os.set_blocking(fd, False)

    def read(self, fd: int) -> bool:
        """Read what is there; False at end of file."""
        buf = self.fds[fd]
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return True
            if not data:
                return False
            if fd == self.out_r:
                room = self.cap + 1 - len(buf)
                if room > 0:
                    buf += data[:room]
                if len(buf) > self.cap:
                    self.overflow = True
            else:
                buf += data
                self.err_total += len(data)
                if self.err_total > self.cap:
                    self.overflow = True
                if len(buf) > 2 * STDERR_KEEP:
                    del buf[:-STDERR_KEEP]

    def drain(self, seconds: float) -> None:
        """Read until every writer is gone, or for at most ``seconds`` (an escaped process of the
        unprivileged fallback may hold a pipe open)."""
        deadline = time.monotonic() + seconds
        open_fds = set(self.fds)
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                if fd in open_fds and not self.read(fd):
                    open_fds.discard(fd)
                    poller.unregister(fd)

    def close(self) -> tuple[bytes, bytes]:
        for fd in self.fds:
            os.close(fd)
        out, err = self.fds[self.out_r], self.fds[[fd for fd in self.fds if fd != self.out_r][0]]
        return bytes(out[: self.cap + 1]), bytes(err[-STDERR_KEEP:])


def _supervise(pid: int, wall: float, cpu_limit: float, capture: _Capture, in_pid_namespace: bool,
               uid: int | None, cpu_before: float) -> tuple[int, resource.struct_rusage, str | None]:
    """Wait for the job ``pid`` while reading its output; kill it at the wall limit, when its
    stdout passes the cap, or when its process tree's CPU time passes ``cpu_limit`` (two samples
    in a row, ``_SAMPLE_SECONDS`` apart: the processes alive, plus everything this process has
    reaped since ``cpu_before``). Returns (status, rusage of ``pid``, reason it was killed or None)."""
    start = time.monotonic()
    deadline = start + wall
    next_sample = start + _SAMPLE_SECONDS
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    poller = select.poll()
    for fd in capture.fds:
        poller.register(fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    reason = None
    was_over = False
    sample = in_pid_namespace or uid is not None
    try:
        while True:
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got == pid:
                return status, usage, None
            now = time.monotonic()
            if now >= deadline:
                reason = "wall"
            elif sample and now >= next_sample:
                next_sample = now + _SAMPLE_SECONDS
                # Two samples in a row: one can count a child twice (read as a zombie, then in
                # its parent's cutime once reaped); the exact total decides the verdict anyway.
                over = _children_cpu() - cpu_before + _live_tree_cpu(in_pid_namespace, uid) > cpu_limit
                if over and was_over:
                    reason = "cpu"
                was_over = over
            if capture.overflow:
                reason = "output"
            if reason is not None:
                _kill_job(pid, in_pid_namespace, uid)
                _, status, usage = os.wait4(pid, 0)
                return status, usage, reason
            timeout = min(deadline, next_sample if sample else deadline) - now
            for fd, _ in poller.poll(max(1, int(timeout * 1000)) if pidfd is not None else 5):
                if fd in capture.fds and not capture.read(fd):
                    poller.unregister(fd)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_job(pid: int, in_pid_namespace: bool, uid: int | None) -> None:
    """Stop a job at once (its whole tree where it can be named: the PID namespace, or the uid)."""
    for kill in ((lambda: os.kill(-1, signal.SIGKILL)) if in_pid_namespace else (lambda: os.killpg(pid, signal.SIGKILL)),
                 lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _cleanup_after_job(pid: int, in_pid_namespace: bool, uid: int | None) -> None:
    """Kill whatever the job left behind and reap it."""
    if in_pid_namespace:
        try:
            os.kill(-1, signal.SIGKILL)  # as the namespace's init: everyone in it but us
        except ProcessLookupError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:  # the job's uid is its own: kill(-1) as that uid reaches escaped children too
        killer = os.fork()
        if killer == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # every process of this uid except the caller
            finally:
                os._exit(0)
        os.waitpid(killer, 0)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # reap what died; never block on an escaped process
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if got == 0:
            time.sleep(0.002)


_COMPILED_SECCOMP: tuple | None = None


def _can_unshare_user_as(uid: int) -> bool:
    """Whether ``uid`` may create a user namespace here (some hosts forbid it to unprivileged
    users, e.g. Ubuntu's AppArmor restriction); jobs then run without one (the filter still
    refuses keyrings)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os._exit(0 if _libc.unshare(CLONE_NEWUSER) == 0 else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _run_jobs(cfg: dict, host_fd: int, uid: int | None, in_pid_namespace: bool) -> list[dict]:
    global _COMPILED_SECCOMP
    if cfg.get("seccomp") and _COMPILED_SECCOMP is None:
        _COMPILED_SECCOMP = compile_seccomp()
    results = []
    limits = cfg["limits"]
    for job in cfg["jobs"]:
        err_r, err_w = os.pipe()  # both close-on-exec: EOF with no data means exec succeeded
        out_r, out_w = os.pipe()
        errpipe_r, errpipe_w = os.pipe()
        cpu_before = _children_cpu()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            for fd in (err_r, out_r, errpipe_r):
                os.close(fd)
            _exec_job(job, cfg, host_fd, uid, in_pid_namespace, err_w, out_w, errpipe_w)
        for fd in (err_w, out_w, errpipe_w):
            os.close(fd)
        capture = _Capture(out_r, errpipe_r, limits["max_output_bytes"])
        status, usage, reason = _supervise(pid, job["wall_seconds"], limits["cpu_seconds"], capture,
                                           in_pid_namespace, uid, cpu_before)
        wall = time.monotonic() - start
        exec_error = os.read(err_r, 4096).decode(errors="replace")
        os.close(err_r)
        capture.drain(0.0)
        _cleanup_after_job(pid, in_pid_namespace, uid)
        capture.drain(0.5)
        stdout, stderr = capture.close()
        for name, data in ((job["stdout"], stdout), (job["stderr"], stderr)):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=host_fd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        # Every process of the job has now been reaped, by init or by a parent that init reaped
        # in turn (the filter forbids auto-reaping), so this is the CPU time of the whole tree.
        tree_cpu = _children_cpu() - cpu_before
        result = {
            "exit_code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": reason == "wall",
            "cpu_exceeded": reason == "cpu",
            "output_exceeded": capture.overflow,
            "wall_seconds": wall,
            "cpu_seconds": tree_cpu,
            "main_cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "exec_error": exec_error or None,
        }
        results.append(result)
        failed = reason is not None or result["exit_code"] != 0
        if exec_error or (failed and (job.get("stop_on_error") or cfg.get("stop_on_error"))):
            break
    return results


def _write_status(host_fd: int, status: dict) -> None:
    fd = os.open("status.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=host_fd)
    with os.fdopen(fd, "w") as f:
        json.dump(status, f)
    os.rename("status.json.tmp", "status.json", src_dir_fd=host_fd, dst_dir_fd=host_fd)


def main(hostdir: str) -> int:
    host_fd = os.open(hostdir, os.O_RDONLY | os.O_DIRECTORY)
    with open(os.path.join(hostdir, "config.json")) as f:
        cfg = json.load(f)
    status: dict = {"isolation": cfg["isolation"], "uid": None, "error": None, "jobs": [],
                    "seccomp": False, "ipc_quotas": False, "job_userns": False}
    if cfg.get("seccomp", True) and seccomp_supported():
        cfg["seccomp"] = status["seccomp"] = True
    else:
        cfg["seccomp"] = False
    try:
        uid = None
        if os.geteuid() == 0:  # never run untrusted code as root
            uid = cfg["uid_base"] + os.getpid()
            status["uid"] = uid
            os.chown(cfg["workdir"], uid, uid)
            os.chmod(cfg["workdir"], 0o700)
        if cfg["isolation"] == "rlimits":
            _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a job come back to us to be reaped
            status["jobs"] = _run_jobs(cfg, host_fd, uid, in_pid_namespace=False)
            _write_status(host_fd, status)
            return 0
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if cfg["isolation"] == "userns":  # unprivileged: become root of a new user namespace first
            outer_uid, outer_gid = os.getuid(), os.getgid()
            _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
            _map_ids(f"0 {outer_uid} 1", f"0 {outer_gid} 1")
        elif uid is None:
            raise OSError("namespace isolation needs root (use 'userns' or 'rlimits')")
        else:
            _check(_libc.unshare(flags), "unshare")
        try:
            _set_ipc_quotas()
            status["ipc_quotas"] = True
        except OSError:
            if cfg["isolation"] == "namespaces":  # root can always write them: a failure is a bug
                raise
        _build_root(cfg["root"], cfg["workdir"], cfg["expose"], cfg["hide"],
                    cfg["limits"].get("max_disk_bytes", 64 << 20), uid)
    except OSError as e:
        status["error"] = f"sandbox set-up failed ({cfg['isolation']}): {e}"
        _write_status(host_fd, status)
        return 2
    init = os.fork()
    if init == 0:  # PID 1 of the new namespace
        code = 0
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # A /proc that shows only this namespace, mounted by its init and before the host's
            # /proc goes away (the kernel wants one visible to allow it); writable, since each job
            # writes the map of its own user namespace (an unprivileged job can write only its
            # own processes' files there).
            _mount("proc", cfg["root"] + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _enter_root(cfg["root"])
            cfg["job_userns"] = status["job_userns"] = uid is not None and _can_unshare_user_as(uid)
            status["jobs"] = _run_jobs(cfg, host_fd, uid, in_pid_namespace=True)
        except BaseException as e:
            status["error"] = f"sandbox init failed: {type(e).__name__}: {e}"
            code = 3
        _write_status(host_fd, status)
        os._exit(code)
    _, init_status = os.waitpid(init, 0)
    return os.waitstatus_to_exitcode(init_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
