"""The hand-written seccomp filter against its plain rule: a small classic-BPF interpreter runs the
filter on random and edge-case syscalls and must give the rule's action every time. (The filter in
the kernel is exercised by tests/test_sandbox_containment.py.)"""

from __future__ import annotations

import random
import struct
import sys

import pytest

if sys.platform != "linux":
    pytest.skip("the sandbox launcher is Linux-only", allow_module_level=True)

from leafe_fast.envs import _sandbox_init as si  # noqa: E402

ALLOW, KILL = si.SECCOMP_RET_ALLOW, si.SECCOMP_RET_KILL_PROCESS
DENY, NOSYS = si.SECCOMP_RET_ERRNO | 1, si.SECCOMP_RET_ERRNO | 38


def plain_rule(arch: int, nr: int, args: list[int]) -> int:
    if arch != si.AUDIT_ARCH_X86_64:
        return KILL
    if nr >= 0x40000000 or nr in si.BLOCKED_SYSCALLS_X86_64.values():
        return DENY
    if nr == 435:  # clone3
        return NOSYS
    if nr == 56 and args[0] & 0xFFFFFFFF & si.CLONE_NEW_MASK:  # clone making namespaces
        return DENY
    if nr == 13 and args[0] & 0xFFFFFFFF == 17 and args[1] != 0:  # rt_sigaction(SIGCHLD, act)
        return DENY
    if nr in (41, 53) and args[0] & 0xFFFFFFFF not in (1, 2, 10, 16):  # socket, socketpair
        return si.SECCOMP_RET_ERRNO | 97
    return ALLOW


def run_bpf(prog: list[tuple[int, int, int, int]], data: bytes) -> int:
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # ret k
            return k
        elif code in (0x15, 0x35, 0x45):  # jeq / jge / jset, k
            taken = a == k if code == 0x15 else a >= k if code == 0x35 else bool(a & k)
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def _data(arch: int, nr: int, args: list[int]) -> bytes:
    return struct.pack("<iIQ6Q", nr, arch, 0, *args)


def test_filter_matches_its_plain_rule() -> None:
    prog = si.seccomp_filter()
    assert len(prog) < 4096 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog)
    rng = random.Random(15)
    interesting = [0, 1, 13, 41, 53, 56, 57, 435, 0x40000000, 0x40000001, 0x3FFFFFFF] + list(si.BLOCKED_SYSCALLS_X86_64.values())
    cases = []
    for nr in interesting:
        for first in (0, 1, 2, 10, 16, 17, 38, 40, 0x1_00000002, 0x10000000 | 17, 0x00020000, 0x80 | 17, 0x1_00000011, 0x7E020000):
            for second in (0, 1, 1 << 32, 0xFFFFFFFF_FFFFFFFF):
                cases.append((si.AUDIT_ARCH_X86_64, nr, [first, second, 0, 0, 0, 0]))
    for _ in range(3000):
        arch = rng.choice([si.AUDIT_ARCH_X86_64] * 9 + [0x40000003, 0xC00000B7])  # i386, aarch64
        nr = rng.choice(interesting + [rng.randrange(0, 600), rng.randrange(0, 1 << 31)])
        cases.append((arch, nr, [rng.randrange(0, 1 << 64) if rng.random() < 0.5 else rng.choice([0, 17]) for _ in range(6)]))
    for arch, nr, args in cases:
        assert run_bpf(prog, _data(arch, nr, args)) == plain_rule(arch, nr, args), (hex(arch), nr, args)


def test_rule_blocks_the_calls_the_issue_names() -> None:
    for name in ("keyctl", "add_key", "request_key", "ptrace", "mount", "umount2", "bpf", "perf_event_open",
                 "kexec_load", "init_module", "finit_module", "unshare", "setns", "memfd_create", "userfaultfd"):
        nr = si.BLOCKED_SYSCALLS_X86_64[name]
        assert run_bpf(si.seccomp_filter(), _data(si.AUDIT_ARCH_X86_64, nr, [0] * 6)) == DENY, name
    for nr in (0, 1, 2, 9, 57, 59, 60, 231):  # read write open mmap fork execve exit exit_group
        assert run_bpf(si.seccomp_filter(), _data(si.AUDIT_ARCH_X86_64, nr, [0] * 6)) == ALLOW
