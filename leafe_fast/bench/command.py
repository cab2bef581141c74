"""``leafe-fast bench``: run the benchmark scripts of a source checkout.

    leafe-fast bench --list                 # the benchmarks and what each measures
    leafe-fast bench pack                   # benchmarks/bench_pack.py
    leafe-fast bench loss -- --small        # everything after -- goes to the script
    leafe-fast bench all                    # every script in turn (what `make bench` runs)

Without CUDA every script picks its CPU-small shapes itself, with CUDA its GPU shapes; each writes
``benchmarks/results/<name>.json`` (+ a plot) with the device and versions. The scripts live in
``benchmarks/`` of the repository, not in the installed package (they need the peers they compare
against): they are looked up beside the package's source folder, then in the current directory and its
parents; a wheel install has no checkout, and the error says so.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

from leafe_fast.errors import UserError

BENCHMARKS = ("loss", "pack", "rollout", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", choices=(*BENCHMARKS, "all"),
                   help="which benchmark: benchmarks/bench_<name>.py, or all of them in turn")
    p.add_argument("extra", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="arguments for the script, after -- (not with all)")
    p.add_argument("--benchmarks-dir", type=Path, default=None,
                   help="folder holding bench_<name>.py (default: found from the source checkout)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")


def find_benchmarks_dir(start: Path | None = None, *, package_dir: Path | None = None) -> Path | None:
    """The ``benchmarks/`` folder beside the package's source folder, else the first one in ``start``
    (default: the current directory) or its parents that holds ``bench_*.py``; None when there is none."""
    package_dir = package_dir or Path(__file__).resolve().parent.parent
    here = (start or Path.cwd()).resolve()
    for c in [package_dir.parent / "benchmarks", *(d / "benchmarks" for d in (here, *here.parents))]:
        if c.is_dir() and any(c.glob("bench_*.py")):
            return c
    return None


def _split_extra(extra: list[str], folder: Path | None) -> tuple[list[str], Path | None]:
    """argparse hands everything after the name to ``extra``: a leading ``--benchmarks-dir DIR`` is
    ours, an optional ``--`` separates, and the rest goes to the script."""
    while extra and (extra[0] == "--benchmarks-dir" or extra[0].startswith("--benchmarks-dir=")):
        if "=" in extra[0]:
            folder, extra = Path(extra[0].split("=", 1)[1]), extra[1:]
        elif len(extra) > 1:
            folder, extra = Path(extra[1]), extra[2:]
        else:
            raise UserError("--benchmarks-dir", "needs a folder", "pass --benchmarks-dir DIR")
    if extra and extra[0] == "--":
        extra = extra[1:]
    return extra, folder


def describe(script: Path) -> str:
    """The first line of a script's docstring (read without importing it)."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text()))
    except (OSError, SyntaxError):
        doc = None
    return (doc or "").strip().splitlines()[0] if doc else ""


def _run_script(script: Path, extra: list[str]) -> int:
    root = str(script.parent.resolve().parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"running {script} {' '.join(extra)}".rstrip(), flush=True)
    return subprocess.call([sys.executable, str(script), *extra], cwd=root, env=env)


def run(args: argparse.Namespace) -> int:
    extra, folder = _split_extra(list(args.extra), args.benchmarks_dir)
    folder = folder or find_benchmarks_dir()
    if folder is None:
        raise UserError("--benchmarks-dir", "no benchmarks/ folder found",
                        "the benchmarks ship with the source repository, not the installed package: "
                        "clone it and run from there, or pass --benchmarks-dir")
    folder = Path(folder)
    if args.list:
        for name in BENCHMARKS:
            script = folder / f"bench_{name}.py"
            state = describe(script) if script.is_file() else "(missing)"
            print(f"{name:8s} {script}  {state}")
        return 0
    if args.name is None:
        raise UserError("name", "no benchmark named", f"pass one of {', '.join(BENCHMARKS)}, all, or --list")
    names = BENCHMARKS if args.name == "all" else (args.name,)
    if args.name == "all" and extra:
        raise UserError("all", "script arguments differ per benchmark",
                        "run one benchmark with `leafe-fast bench NAME -- ARGS`")
    scripts = [folder / f"bench_{n}.py" for n in names]
    for script in scripts:
        if not script.is_file():
            raise UserError("--benchmarks-dir", f"{script} does not exist", "pass the checkout's benchmarks/ folder")
    failed = []
    for name, script in zip(names, scripts):
        rc = _run_script(script, extra)
        if rc != 0:
            failed.append(f"{name} (exit {rc})")
            if len(names) == 1:
                return rc  # the script's own status passes through
    if failed:
        print(f"leafe-fast bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
