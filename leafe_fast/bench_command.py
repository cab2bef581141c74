"""``leafe-fast bench``: run one of the benchmark scripts of a source checkout.

    leafe-fast bench pack                   # benchmarks/bench_pack.py
    leafe-fast bench loss -- --quick        # everything after -- goes to the script

The scripts live in ``benchmarks/`` of the repository, not in the installed package (they need the
peers they compare against and write ``benchmarks/results/``). They are looked up next to the
package's source folder, then in the current directory and its parents; a wheel install has no
checkout, and the error says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("loss", "pack", "rollout", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark: benchmarks/bench_<name>.py")
    p.add_argument("extra", nargs=argparse.REMAINDER, metavar="-- ARGS", help="arguments for the script, after --")
    p.add_argument("--benchmarks-dir", type=Path, default=None,
                   help="folder holding bench_<name>.py (default: found from the source checkout)")


def find_benchmarks_dir(start: Path | None = None) -> Path | None:
    """The ``benchmarks/`` folder of the source checkout, or None."""
    candidates = [Path(__file__).resolve().parent.parent / "benchmarks"]
    here = (start or Path.cwd()).resolve()
    candidates += [d / "benchmarks" for d in (here, *here.parents)]
    for c in candidates:
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
            raise SystemExit("leafe-fast bench: --benchmarks-dir needs a folder")
    if extra and extra[0] == "--":
        extra = extra[1:]
    return extra, folder


def run(args: argparse.Namespace) -> int:
    extra, folder = _split_extra(list(args.extra), args.benchmarks_dir)
    folder = folder or find_benchmarks_dir()
    if folder is None:
        print(
            "leafe-fast bench: no benchmarks/ folder found. The benchmarks ship with the source "
            "repository, not the installed package: clone it and run from there, or pass --benchmarks-dir.",
            file=sys.stderr,
        )
        return 2
    script = Path(folder) / f"bench_{args.name}.py"
    if not script.is_file():
        print(f"leafe-fast bench: {script} does not exist", file=sys.stderr)
        return 2
    root = str(Path(folder).resolve().parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"running {script} {' '.join(extra)}".rstrip(), flush=True)
    return subprocess.call([sys.executable, str(script), *extra], cwd=root, env=env)
