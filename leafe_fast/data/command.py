"""``leafe-fast build-data``: trees.jsonl -> rehearsal + counterfactual samples (.npz).

    leafe-fast build-data runs/x/trees.jsonl --out runs/x/samples.npz --counterfactual-steps 1

The output is ``SampleColumns.save`` (one .npz, written atomically), read by ``leafe-fast train``.
The statistics (samples per kind, target-token share, lengths, what was left out) are printed and,
with ``--stats-json``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _steps(value: str) -> int | None:
    if value.lower() in ("all", "none"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trees", nargs="+", type=Path, help="trees.jsonl file(s) written by `leafe-fast explore`")
    p.add_argument("--out", type=Path, required=True, help="output samples file (.npz)")
    p.add_argument("--counterfactual-steps", type=_steps, default=1, metavar="K|all",
                   help="corrected steps supervised after each rollback point (default 1; 'all': to the end)")
    p.add_argument("--no-rehearsal", action="store_true", help="leave out rehearsal samples (group 0)")
    p.add_argument("--no-counterfactual", action="store_true", help="leave out counterfactual samples (group 1)")
    p.add_argument("--no-dedup", action="store_true", help="keep samples with identical tokens and targets")
    p.add_argument("--rehearsal-weight", type=float, default=1.0, help="loss weight of rehearsal samples")
    p.add_argument("--counterfactual-weight", type=float, default=1.0, help="loss weight of counterfactual samples")
    p.add_argument("--max-len", type=int, default=None, help="longest sample in tokens (default: no limit)")
    p.add_argument("--overflow", choices=("error", "drop", "truncate"), default="error",
                   help="what to do with a sample longer than --max-len (default: error)")
    p.add_argument("--stats-json", type=Path, default=None, help="also write the statistics as JSON here")


def run(args: argparse.Namespace) -> int:
    from leafe_fast.data.sample import SampleColumns
    from leafe_fast.data.samples import build_samples_with_stats
    from leafe_fast.data.schema import TreeFormatError, iter_trees

    missing = [str(p) for p in args.trees if not p.exists()]
    if missing:
        print(f"leafe-fast build-data: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2

    def all_trees():
        for path in args.trees:
            yield from iter_trees(path)

    try:
        samples, stats = build_samples_with_stats(
            all_trees(),
            counterfactual_steps=args.counterfactual_steps,
            include_rehearsal=not args.no_rehearsal,
            include_counterfactual=not args.no_counterfactual,
            dedup=not args.no_dedup,
            weights={0: args.rehearsal_weight, 1: args.counterfactual_weight},
            max_len=args.max_len,
            overflow=args.overflow,
        )
    except (TreeFormatError, ValueError) as e:
        print(f"leafe-fast build-data: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    SampleColumns.from_samples(samples).save(args.out)
    print(stats.summary())
    print(f"wrote {len(samples)} samples to {args.out}")
    if not samples:
        print("warning: no samples (no tree reached a success)", file=sys.stderr)
    if args.stats_json is not None:
        args.stats_json.parent.mkdir(parents=True, exist_ok=True)
        args.stats_json.write_text(json.dumps(stats.as_dict(), indent=2))
    return 0
