"""The ``leafe-fast`` command: one subcommand per pipeline stage.

    leafe-fast explore | build-data | train | eval | demo | bench   (each with --help)

Each subcommand lives in the module that owns the stage (``COMMANDS`` below); that module defines
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand is
used, so ``leafe-fast --help`` stays fast and a missing optional dependency only affects its stage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# subcommand -> (owning module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "explore": ("leafe_fast.explore.command", "Stage 1: reflective tree exploration -> trees.jsonl"),
    "build-data": ("leafe_fast.data.command", "trees.jsonl -> rehearsal + counterfactual samples"),
    "train": ("leafe_fast.train.command", "Stage 2: experience distillation on packed varlen batches"),
    "eval": ("leafe_fast.eval_command", "pass@k of a model on an environment's held-out tasks"),
    "demo": ("leafe_fast.demo", "the whole pipeline on the CPU with a tiny model, with a report"),
    "bench": ("leafe_fast.bench_command", "run one of benchmarks/ (loss, pack, rollout, train)"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None  # the stage itself is not built yet
        raise


def build_parser(load: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leafe-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _name=name)
        mod = _load(module) if load else None
        if mod is not None:
            mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen stage's module; --help at the top level imports nothing heavy.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="leafe-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _name=name)
        if name == chosen:
            mod = _load(module)
            if mod is None:
                p.set_defaults(_missing=True)
            else:
                mod.add_arguments(p)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"leafe-fast {args._name}: not built yet ({args._module} is missing).", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
