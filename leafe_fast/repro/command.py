"""``leafe-fast repro``: does LEAFE widen pass@k against rejection-sampling SFT? (Sokoban, from scratch)

    leafe-fast repro --preset tiny                  # CI miniature, one seed, under a minute
    leafe-fast repro --preset cpu                   # 1.1M-parameter policy, 200 levels x 16, 3 seeds
    leafe-fast repro --preset gpu                   # scaled sizes for one H100/H200
    leafe-fast repro --preset cpu --arms base leafe --seeds 0   # a subset; cached stages are reused

Stages are cached under ``--out`` (unset: ``runs/repro_<preset>``): rerunning skips what finished, so
the arms can be rerun alone once the base policy exists; delete a stage's folder to redo it. The
result JSON and plot go to ``--results-dir`` (default ``benchmarks/results``) as
``repro_sokoban_<preset>.json`` / ``.png``. See ``leafe_fast.repro.pipeline`` for the stages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from leafe_fast.flags import add_config_flags, config_from_args
from leafe_fast.repro.pipeline import ABLATION_ARMS, ARMS, PRESETS, VARIANT_ARMS


@dataclass
class ReproConfig:
    """Settings of ``leafe-fast repro`` (its flags come from these fields). Unset (None) fields take the
    preset's value, so ``--preset`` alone reproduces a recorded run."""

    preset: str = field(default="cpu", metadata={"help": "sizes and budgets", "choices": tuple(sorted(PRESETS))})
    out: Path | None = field(default=None, metadata={
        "help": "stage cache folder (unset: runs/repro_<preset>, with --model runs/repro_<preset>_<model folder>)"})
    results_dir: Path = field(default=Path("benchmarks/results"), metadata={
        "help": "where repro_sokoban_<preset>.json and .png go"})
    arms: tuple[str, ...] | None = field(default=None, metadata={
        "help": f"arms to run (unset: {','.join(ARMS)}; variant: {','.join(VARIANT_ARMS)}; "
                f"ablation: {','.join(ABLATION_ARMS)}); "
                "base is always added, gained/lost are measured against it"})
    seeds: tuple[int, ...] | None = field(default=None, metadata={"help": "seeds to run (unset: the preset's)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (unset: the preset's)", "min": 1})
    model: Path | None = field(default=None, metadata={
        "help": "a local instruction-tuned model directory to use instead of the cloned policy "
                "(full prompts, the LLM reflector)"})
    report_only: bool = field(default=False, metadata={
        "help": "aggregate the stages already finished under --out (a run cut short) and run nothing"})
    ignore_gate: bool = field(default=False, metadata={
        "help": "run the arms even when the experience gate fails (the result records gate_ignored)"})
    progress: bool = field(default=True, metadata={"help": "progress bars (quiet when stderr is not a TTY)"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, ReproConfig)


def run(args: argparse.Namespace) -> int:
    from leafe_fast.checks import check_model_dir, check_out_path
    from leafe_fast.errors import UserError
    from leafe_fast.repro.pipeline import Repro, _write_json
    from leafe_fast.repro.report import format_table, plot

    config = config_from_args(ReproConfig, args)
    preset = PRESETS[config.preset]
    if config.arms:
        known = ARMS + VARIANT_ARMS + ABLATION_ARMS
        bad = [a for a in config.arms if a not in known]
        if bad:
            raise UserError("--arms", f"unknown arm(s) {bad}", f"choose from {list(known)}")
        arms = tuple(config.arms)
        if "base" not in arms:
            arms = ("base",) + arms  # gained/lost are measured against the base
        preset = replace(preset, arms=arms)
    if config.seeds:
        preset = replace(preset, seeds=tuple(config.seeds))
    if config.threads:
        preset = replace(preset, threads=config.threads)
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--preset gpu", "no CUDA device is visible", "run it on a GPU machine, or use --preset cpu")
    out = config.out or Path("runs") / (f"repro_{preset.name}" + (f"_{config.model.name}" if config.model else ""))
    check_out_path(out, "--out", folder=True)
    check_out_path(config.results_dir, "--results-dir", folder=True)
    if config.model is not None:
        check_model_dir(config.model)
        _check_model_family(config.model)
    if config.report_only and not any(p.exists() for p in (out / "random_walk.json", out / "base" / "base.json")):
        raise UserError("--report-only", f"no finished stage under {out}",
                        "pass the --out of an earlier run, or run without --report-only")
    progress = config.progress and sys.stderr.isatty()
    repro = Repro(preset, out, progress=progress, model_dir=config.model, ignore_gate=config.ignore_gate)
    result = repro.report_only() if config.report_only else repro.run()
    config.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = config.results_dir / f"repro_sokoban_{preset.name}.json"
    _write_json(json_path, result)
    png = plot(result, config.results_dir / f"repro_sokoban_{preset.name}.png")
    print(format_table(result))
    g = result["gate"]
    if g:
        print(f"gate: continuation success {g['success_without']:.3f} -> {g['success_with']:.3f} with experience "
              f"(gain {g['gain']:+.3f}, needed {g['min_gain']:+.2f}: {'passed' if g['passed'] else 'NOT passed'})")
    print(f"result: {json_path}" + (f", plot: {png}" if png else ""))
    return 0


def _check_model_family(path: Path) -> None:
    """The lock-step decoder (``repro.fastlm``) implements Qwen2/Llama-style decoders only."""
    import json

    from leafe_fast.errors import UserError

    kind = json.loads((path / "config.json").read_text()).get("model_type")
    if kind not in ("qwen2", "llama"):
        raise UserError(f"--model {path}", f"model_type {kind!r} is not supported by the repro's decoder",
                        "pass a Qwen2- or Llama-style model (model_type qwen2 or llama)")


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
