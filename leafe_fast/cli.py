"""The ``leafe-fast`` command: one subcommand per pipeline stage.

    leafe-fast explore | build-data | train | eval | demo | bench | repro   (each with --help)

Layout: each subcommand lives in the module that owns its stage (``COMMANDS`` below); that module
defines ``add_arguments(parser)`` and ``run(args) -> int``, and its flags are generated from its
config dataclasses (:mod:`leafe_fast.flags`). Only the chosen subcommand's module is imported, so
``leafe-fast --help`` stays fast and an optional dependency only matters to the stage that uses it.

Errors: this module is the one place that turns a user's mistake into one line on stderr and exit
status 2: a :class:`~leafe_fast.errors.UserError` raised anywhere below ``run``, a bad flag (argparse),
or a third-party package the stage needs that is not installed. Anything else is a bug and keeps its
traceback.

The flag surface of every subcommand is frozen in ``tests/data/cli_surface.json``; after changing
flags on purpose, regenerate it with ``python -m leafe_fast.cli --dump-surface > tests/data/cli_surface.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, NoReturn, Sequence

from leafe_fast.errors import UserError

PROG = "leafe-fast"

# subcommand -> (owning module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "explore": ("leafe_fast.explore.command", "Stage 1: reflective tree exploration -> trees.jsonl"),
    "build-data": ("leafe_fast.data.command", "trees.jsonl -> rehearsal + counterfactual samples"),
    "train": ("leafe_fast.train.command", "Stage 2: experience distillation on packed varlen batches"),
    "eval": ("leafe_fast.eval.command", "pass@k of a model on an environment's held-out tasks"),
    "demo": ("leafe_fast.demo", "the whole pipeline on the CPU with a tiny model, with a report"),
    "bench": ("leafe_fast.bench.command", "run one of benchmarks/ (loss, pack, rollout, train)"),
    "repro": ("leafe_fast.repro.command", "Sokoban reproduction: LEAFE vs RS-SFT pass@k from a cloned policy"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (``leafe-fast train: error: argument --lr: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}{hint}\n")


def load_command(name: str) -> ModuleType:
    """The module of subcommand ``name``. A missing or broken leafe_fast module is a bug (a broken
    install) and raises as is; ``main`` turns a missing third-party package into one line."""
    module = COMMANDS[name][0]
    mod = importlib.import_module(module)
    for attr in ("add_arguments", "run"):
        if not callable(getattr(mod, attr, None)):
            raise AttributeError(f"{module} is registered as `{PROG} {name}` but defines no {attr}()")
    return mod


def build_parser(commands: Iterable[str] | None = None, *, load: bool = True) -> argparse.ArgumentParser:
    """The whole parser. Every subcommand is listed; only those in ``commands`` (all when None) get
    their flags, which imports their modules; ``load=False`` lists the subcommands without flags."""
    wanted = set(COMMANDS if commands is None else commands) if load else set()
    # No abbreviations: `--max-branch` must not silently mean `--max-branches` (a flag added later would
    # break it, and the frozen surface would not be the whole surface).
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    from leafe_fast import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.set_defaults(_command=name)
        if name in wanted:
            load_command(name).add_arguments(p)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``leafe-fast``; returns the exit status (argparse errors and ``--help`` raise SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--dump-surface"]:
        print(json.dumps(cli_surface(), indent=1, sort_keys=True))
        return 0
    chosen = _chosen(argv)
    label = f"{PROG} {chosen}" if chosen in COMMANDS else PROG
    if not sys.stderr.isatty():  # transformers' weight loading/saving bars, quiet like our own (read at import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: (  # one line, no source path and code line
        f"{label}: warning: {' '.join(str(message).split())}\n")
    try:
        args = build_parser([chosen] if chosen in COMMANDS else []).parse_args(argv)
        return int(load_command(args._command).run(args) or 0)
    except ModuleNotFoundError as exc:  # an optional package a stage imports when it runs
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "leafe_fast":
            raise
        print(f"{label}: error: needs the Python package {missing!r}, which is not installed; "
              f"pip install {missing} (or the leafe-fast extra that provides it)", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{label}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


# --- the frozen CLI surface ----------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def cli_surface() -> dict[str, dict[str, Any]]:
    """Every subcommand's arguments: flag names, dest, default (the config default for generated
    flags), choices, nargs, required. ``tests/data/cli_surface.json`` stores it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, dict[str, Any]] = {}
    for name, p in sub.choices.items():
        args: dict[str, Any] = {}
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            key = a.option_strings[0] if a.option_strings else a.dest
            args[key] = {
                "flags": list(a.option_strings),
                "dest": a.dest,
                "default": _jsonable(getattr(a, "config_default", a.default)),
                "choices": _jsonable(list(a.choices)) if a.choices is not None else None,
                "nargs": _jsonable(a.nargs),
                "required": bool(a.required),
                "documented": bool(a.help) and a.help != argparse.SUPPRESS,
            }
        out[name] = args
    return out


if __name__ == "__main__":
    raise SystemExit(main())
