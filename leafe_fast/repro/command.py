"""``leafe-fast repro``: does LEAFE widen pass@k against rejection-sampling SFT? (Sokoban, from scratch)

    leafe-fast repro --preset tiny                  # CI miniature, one seed, under a minute
    leafe-fast repro --preset cpu                   # 1.1M-parameter policy, 200 levels x 16, 3 seeds
    leafe-fast repro --preset gpu                   # scaled sizes for one H100/H200
    leafe-fast repro --preset cpu --arms base,leafe --seeds 0   # a subset; cached stages are reused

Stages are cached under ``--out`` (default ``runs/repro_<preset>``): rerunning skips what finished, so
the arms can be rerun alone once the base policy exists; delete a stage's folder to redo it. The
result JSON and plot go to ``--results-dir`` (default ``benchmarks/results``) as
``repro_sokoban_<preset>.json`` / ``.png``. See ``leafe_fast.repro.pipeline`` for the stages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from leafe_fast.repro.pipeline import ABLATION_ARMS, ARMS, PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes and budgets (default: cpu)")
    p.add_argument("--out", type=Path, default=None, help="stage cache folder (default: runs/repro_<preset>)")
    p.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"),
                   help="where repro_sokoban_<preset>.json and .png go (default: benchmarks/results)")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated arms (default: {','.join(ARMS)}; ablation: {','.join(ABLATION_ARMS)})")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's, 0,1,2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    p.add_argument("--model", type=Path, default=None,
                   help="a local instruction-tuned model directory to use instead of the cloned policy "
                        "(full prompts, the LLM reflector)")
    p.add_argument("--report-only", action="store_true",
                   help="aggregate the stages already finished under --out (a run cut short) and run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _csv(text: str | None, cast, where: str):
    from leafe_fast.errors import UserError

    if text is None:
        return None
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(where, f"cannot read {text!r}", "give a comma-separated list") from None


def run(args: argparse.Namespace) -> int:
    from leafe_fast.errors import UserError
    from leafe_fast.repro.pipeline import ABLATION_ARMS, ARMS, PRESETS, Repro
    from leafe_fast.repro.report import format_table, plot

    preset = PRESETS[args.preset]
    arms = _csv(args.arms, str, "--arms")
    if arms:
        bad = [a for a in arms if a not in ARMS + ABLATION_ARMS]
        if bad:
            raise UserError("--arms", f"unknown arm(s) {bad}", f"choose from {list(ARMS + ABLATION_ARMS)}")
        if "base" not in arms:
            arms = ("base",) + arms  # gained/lost are measured against the base
        preset = replace(preset, arms=arms)
    seeds = _csv(args.seeds, int, "--seeds")
    if seeds:
        preset = replace(preset, seeds=seeds)
    if args.threads:
        preset = replace(preset, threads=args.threads)
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--preset gpu", "no CUDA device is visible", "run it on a GPU machine, or use --preset cpu")
    out = args.out or Path("runs") / f"repro_{preset.name}"
    progress = not args.no_progress and sys.stderr.isatty()
    repro = Repro(preset, out, progress=progress, model_dir=args.model)
    result = repro.report_only() if args.report_only else repro.run()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    from leafe_fast.repro.pipeline import _write_json

    json_path = args.results_dir / f"repro_sokoban_{preset.name}.json"
    _write_json(json_path, result)
    png = plot(result, args.results_dir / f"repro_sokoban_{preset.name}.png")
    print(format_table(result))
    g = result["gate"]
    if g:
        print(f"gate: continuation success {g['success_without']:.3f} -> {g['success_with']:.3f} with experience "
              f"(gain {g['gain']:+.3f}, needed {g['min_gain']:+.2f}: {'passed' if g['passed'] else 'NOT passed'})")
    print(f"result: {json_path}" + (f", plot: {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command without the ``leafe-fast`` registry (``benchmarks/repro_sokoban.py`` calls this)."""
    from leafe_fast.errors import UserError

    parser = argparse.ArgumentParser(prog="repro_sokoban", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"repro_sokoban: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
