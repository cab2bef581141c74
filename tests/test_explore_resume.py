"""A run killed with SIGKILL and rerun loses no finished tree and writes none twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_explore_fakes import run_explore_subprocess

from leafe_fast.data.schema import read_trees

TESTS = Path(__file__).resolve().parent
N_TASKS = 12


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_rerun_keeps_every_finished_tree_once(tmp_path):
    out = tmp_path / "trees.jsonl"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
        f"from test_explore_fakes import run_explore_subprocess; "
        f"run_explore_subprocess({str(out)!r}, {N_TASKS}, 0.01)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while _complete_lines(out) < 3:
            assert proc.poll() is None, f"the child ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the child wrote too slowly"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    written = out.read_bytes()
    finished_bytes = written[: written.rfind(b"\n") + 1]
    first = [t.task_id for t in read_trees(out)]
    assert 3 <= len(first) < N_TASKS, "kill the child before it finishes (raise its step delay)"
    # a kill in the middle of an append leaves an unterminated line; make sure there is one
    with out.open("ab") as f:
        f.write(b'{"schema": "leafe.tree/1", "task_id": "line-99", "nod')
    assert [t.task_id for t in read_trees(out)] == first  # the torn tail is not a tree

    run_explore_subprocess(str(out), N_TASKS, 0.0)  # the rerun, in-process
    after = read_trees(out)
    ids = [t.task_id for t in after]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(N_TASKS))  # none lost, none twice
    assert out.read_bytes().startswith(finished_bytes)  # finished trees kept byte for byte
    assert b"line-99" not in out.read_bytes()

    # the trees redone after the kill equal those of an uninterrupted run (same seeds, same script)
    clean = tmp_path / "clean.jsonl"
    run_explore_subprocess(str(clean), N_TASKS, 0.0)
    by_id = {t.task_id: t for t in read_trees(clean)}
    cache_dependent = {"cached_tokens", "branch_cached_tokens"}  # depends on the batch neighbours
    for tree in after:
        want = by_id[tree.task_id]
        assert tree.nodes == want.nodes
        assert {k: v for k, v in tree.stats.items() if k not in cache_dependent} == {
            k: v for k, v in want.stats.items() if k not in cache_dependent}
