"""A non-editable install works away from the checkout, and the Makefile targets do what they say.

The editable install of the development set-up hides packaging mistakes: the ``kernels`` ->
``leafe_fast.kernels`` mapping, the compiled ``_C`` and the package data only prove themselves when
the package is built and installed like a user's ``pip install .`` and imported from another folder.
That build compiles the C++ extension (about 25 s of CPU), so the test is marked ``install``
(``-m "not install"`` skips it locally; CI runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.util, pathlib, sys
import numpy as np
import leafe_fast, leafe_fast._C as C, leafe_fast.kernels as k, leafe_fast.kernels.leafe_ce_torch
site = pathlib.Path(sys.argv[1]).resolve()
for m in (leafe_fast, C, k):
    assert site in pathlib.Path(m.__file__).resolve().parents, f"{m.__name__} from {m.__file__}, not the install"
assert k.__name__ == "leafe_fast.kernels"
assert importlib.util.find_spec("kernels") is None and not (site / "kernels").exists(), "a top-level kernels"
assert C.lengths_to_offsets(np.array([3, 0, 5], dtype=np.int64)).tolist() == [0, 3, 3, 8]
for data in ("envs/problems/basic.jsonl", "configs/explore_sokoban.json"):
    assert (site / "leafe_fast" / data).is_file(), f"package data {data} missing"
print("ok")
"""


def _source_files() -> list[Path]:
    """What a fresh clone holds: tracked files plus untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return [Path(p) for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


@pytest.mark.install
def test_non_editable_install_imports_from_another_folder(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files a clone holds")
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    for rel in _source_files():
        if rel.parts[0] in ("tests", "benchmarks"):
            continue  # not part of the package; keeps the copy small
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    # the installed CLI runs, and its bench command says the benchmarks ship with the repository
    cli = subprocess.run([sys.executable, "-m", "leafe_fast.cli", "bench", "--list"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "source repository" in cli.stderr, cli.stderr[-3000:]


def _make_n(target: str, **variables: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    args = ["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout


def test_make_clean_removes_the_install_stamp(tmp_path):
    # without the stamp gone, the next `make test` would skip the install and fail to import _C
    venv = tmp_path / "venv"
    assert f"{venv}/.leafe-installed" in _make_n("clean", VENV=str(venv))


def test_make_bench_runs_the_benchmarks(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".leafe-installed").write_text("")
    os.utime(venv / ".leafe-installed", (2**31, 2**31))  # newer than every prerequisite: no reinstall
    text = _make_n("bench", VENV=str(venv))
    assert f"{venv}/bin/leafe-fast bench all" in text
