"""``leafe-fast build-data``: trees.jsonl -> training samples (.npz), by recipe.

    leafe-fast build-data runs/x/trees.jsonl --out runs/x/samples.npz                      # LEAFE
    leafe-fast build-data runs/x/trees.jsonl --out runs/x/rehearsal.npz --recipe rehearsal-only
    leafe-fast build-data runs/rs/trees.jsonl --out runs/rs/samples.npz --recipe rejection-sampling

The flags come from ``leafe_fast.data.recipes.BuildConfig``. The output is ``SampleColumns.save``
(one .npz, written atomically), read by ``leafe-fast train``. The statistics (samples and target
tokens per group, dropped corrections, failed branches, lengths) are printed and, with
``--stats-json``, written as JSON. No trees, or no sample out of them, is an error (exit 2) unless
``--allow-empty``: an empty file must not look like valid training data.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from leafe_fast.checks import check_out_path
from leafe_fast.errors import UserError
from leafe_fast.flags import add_config_flags, config_from_args
from leafe_fast.outputs import write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leafe_fast.data.recipes import BuildConfig

    p.add_argument("trees", nargs="+", type=Path, help="trees.jsonl file(s) written by `leafe-fast explore`")
    p.add_argument("--out", type=Path, required=True, help="output samples file (.npz)")
    p.add_argument("--stats-json", type=Path, default=None, help="also write the statistics as JSON here")
    group = p.add_argument_group("samples (BuildConfig)")
    add_config_flags(group, BuildConfig, exclude=("counterfactual_steps",))
    steps = next(f for f in fields(BuildConfig) if f.name == "counterfactual_steps")
    # by hand only to check K|all at parse time (one line, exit 2); the field stays the one default
    group.add_argument("--counterfactual-steps", dest="counterfactual_steps", type=_steps, default=None,
                       metavar="K|all", help=f"{steps.metadata['help']} (default: {steps.default})")


def _steps(text: str) -> str:
    from leafe_fast.data.recipes import parse_counterfactual_steps

    try:
        parse_counterfactual_steps(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(e.problem) from None
    return text


def run(args: argparse.Namespace) -> int:
    from leafe_fast.data.columns import SampleColumns
    from leafe_fast.data.recipes import BuildConfig, build_recipe, parse_counterfactual_steps
    from leafe_fast.data.schema import read_trees

    config = config_from_args(BuildConfig, args, exclude=("counterfactual_steps",))
    if args.counterfactual_steps is not None:
        config.counterfactual_steps = args.counterfactual_steps
    parse_counterfactual_steps(config.counterfactual_steps, "--counterfactual-steps")
    for path in args.trees:
        if not path.exists():
            raise UserError(str(path), "no such file", "pass the trees.jsonl written by `leafe-fast explore`")
        if path.is_dir():
            raise UserError(str(path), "is a directory, not a trees.jsonl file", "pass the file explore wrote")
        if not path.is_file():  # a pipe would block, a device never ends
            raise UserError(str(path), "is not a regular file", "pass the trees.jsonl file explore wrote")
    if args.out.is_dir():
        raise UserError("--out", f"{args.out} is a directory", "pass a file path, e.g. runs/x/samples.npz")
    check_out_path(args.out)
    if args.stats_json is not None:
        check_out_path(args.stats_json, "--stats-json")
    inputs = {path.resolve() for path in args.trees}
    for flag, out in (("--out", args.out), ("--stats-json", args.stats_json)):
        if out is not None and out.resolve() in inputs:
            raise UserError(flag, f"{out} is also an input trees file (it would be overwritten)",
                            "write the output to another path, e.g. runs/x/samples.npz")

    trees = [t for path in args.trees for t in read_trees(path)]
    source = ", ".join(map(str, args.trees))
    if not trees and not config.allow_empty:
        raise UserError(source, "holds no trees", "run `leafe-fast explore` into it first (or pass --allow-empty)")
    samples, stats = build_recipe(trees, config, source=source)
    if not samples and not config.allow_empty:
        why = "no tree reached a success" if not stats.trees_with_success else "every sample was left out"
        raise UserError(source, f"gives no {config.recipe} samples ({why}); {' '.join(stats.summary().split())}",
                        "explore more tasks or with a larger budget (or pass --allow-empty)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    SampleColumns.from_samples(samples).save(args.out)
    print(stats.summary())
    print(f"wrote {len(samples)} samples to {args.out}")
    if not samples:
        print("warning: the samples file is empty (--allow-empty)", file=sys.stderr)
    if args.stats_json is not None:
        write_json(args.stats_json, stats.as_dict())
    return 0
