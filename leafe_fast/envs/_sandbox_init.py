"""The privileged half of the sandbox: a launcher that isolates, then runs untrusted jobs.

Run as a script (``python -I -S -B _sandbox_init.py HOSTDIR``) by :mod:`leafe_fast.envs.sandbox`,
never imported by the library; it uses the standard library only, so it starts in ~20 ms without
site-packages. ``HOSTDIR`` holds ``config.json`` (written by the parent), the job inputs, and
receives the job outputs and ``status.json``.

Isolation ``namespaces`` (needs root): the launcher enters new mount, network, PID, IPC and UTS
namespaces, builds a minimal read-only root (system directories, the interpreter's prefix, and a
size-limited tmpfs as ``/tmp`` seeded with the work directory's files) and pivots into it. It then
forks the PID namespace's init, which runs each job as a fresh unprivileged uid (``uid_base +
launcher pid``: unique among live sandboxes, so ``RLIMIT_NPROC``, counted per uid, is this
sandbox's alone). After each job init kills everything left in the namespace; when init exits the
kernel kills whatever remains. If the launcher dies, init follows it (``PR_SET_PDEATHSIG``).

Isolation ``userns`` (unprivileged): the same, entered as root of a new user namespace that maps
the invoking user; each job runs as uid 1000 of its own nested user namespace.

Isolation ``rlimits`` (fallback): only resource limits, a new session per job, and the
Python-level network guard of the job's bootstrap. See the module docstring of ``sandbox.py`` for
what does and does not hold at each level.
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
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for path in hide:
        path = os.path.abspath(path)
        if _within(path, bound) and os.path.isdir(path):
            _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0555,size=4k")
    for target, opts in _mount_points():
        if not _within(target, [root]) or target == root + "/tmp":
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name in opts & _KEEP_FLAGS.keys():
            flags |= _KEEP_FLAGS[name]
        try:
            _mount(None, target, None, flags)
        except OSError:
            # A mount hidden under another one (stacked mounts) cannot be addressed by path;
            # the one on top is what the program sees, and it was remounted.
            pass
    # Verify instead of trusting.
    for path in [root] + [root + p for p in bound]:
        if not _is_readonly(path):
            raise OSError(f"sandbox: could not make {path} read-only")


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


def _exec_job(job: dict, cfg: dict, host_fd: int, uid: int | None, in_pid_namespace: bool, err_w: int) -> None:
    """In the forked child: wire stdio, drop privileges, limit, exec. Never returns."""
    try:
        fds = [
            os.open(job["stdin"], os.O_RDONLY, dir_fd=host_fd),
            os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=host_fd),
            os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=host_fd),
        ]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
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
        elif cfg["isolation"] == "userns":
            # A nested user namespace where the job is uid 1000: exec drops every capability, and
            # the mounts above are locked. Since Linux 5.14 RLIMIT_NPROC is counted per user
            # namespace, so the limit is this job's own.
            _check(_libc.unshare(CLONE_NEWUSER), "unshare user namespace")
            _map_ids(f"{JOB_UID} 0 1", f"{JOB_UID} 0 1")
            _set_limits(limits, limits["max_processes"])
        else:  # unprivileged fallback: the count is per user, so allow the current count plus the limit
            _set_limits(limits, _user_process_count(os.getuid()) + limits["max_processes"])
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # last: a credential change clears it
        os.execve(job["argv"][0], job["argv"], job["env"])
    except BaseException as e:  # report through the close-on-exec pipe, then die
        try:
            os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


def _wait(pid: int, wall: float) -> tuple[int, resource.struct_rusage, bool]:
    """Wait for ``pid`` at most ``wall`` seconds; kill it on timeout. Returns (status, rusage, timed_out)."""
    deadline = time.monotonic() + wall
    timed_out = False
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got == pid:
                return status, usage, timed_out
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                return status, usage, timed_out
            if pidfd is not None:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(max(1, int(left * 1000)))
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


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


def _run_jobs(cfg: dict, host_fd: int, uid: int | None, in_pid_namespace: bool) -> list[dict]:
    results = []
    for job in cfg["jobs"]:
        err_r, err_w = os.pipe()  # both close-on-exec: EOF with no data means exec succeeded
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            _exec_job(job, cfg, host_fd, uid, in_pid_namespace, err_w)
        os.close(err_w)
        status, usage, timed_out = _wait(pid, job["wall_seconds"])
        wall = time.monotonic() - start
        exec_error = os.read(err_r, 4096).decode(errors="replace")
        os.close(err_r)
        _cleanup_after_job(pid, in_pid_namespace, uid)
        result = {
            "exit_code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": timed_out,
            "wall_seconds": wall,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "exec_error": exec_error or None,
        }
        results.append(result)
        failed = timed_out or result["exit_code"] != 0
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
    status: dict = {"isolation": cfg["isolation"], "uid": None, "error": None, "jobs": []}
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
            # /proc goes away (the kernel wants one visible to allow it); writable under userns,
            # where each job writes its own uid map.
            readonly = 0 if cfg["isolation"] == "userns" else MS_RDONLY
            _mount("proc", cfg["root"] + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | readonly)
            _enter_root(cfg["root"])
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
