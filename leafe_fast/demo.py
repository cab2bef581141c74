"""``leafe-fast demo``: the whole LEAFE pipeline on the CPU with a tiny random model, in minutes.

    leafe-fast demo                          # defaults: about a minute on a 2-core CPU
    leafe-fast demo --tasks 2 --eval-tasks 2 --n 2 --train-steps 2 --format-sft-steps 2   # smoke run

What it does, in order (everything under ``--out``, default ``runs/demo``):

0. format warm-up: a random-init model cannot emit a move at all, so a few SFT steps on random-walk
   games (val-split levels, uniformly random legal-format moves) teach it the action format. It learns
   no solution: the moves are random, which is what makes it a random-walk policy to start from;
1. pass@k of that policy on held-out test levels (``leafe_fast.eval``);
2. Stage 1: reflective tree exploration of the train levels with the env-grounded *diagnosis*
   reflector (which step lost the level and why, never the solver's plan) and periodic reflection
   every ``--reflect-every`` steps; the policy branches from the rollback point with the experience
   in context -> ``trees.jsonl``;
3. Stage 2 data, recipe ``leafe``: rehearsal (attempts completed without experience) + counterfactual
   (the corrected actions, experience removed; invalid, no-op and unchanged corrections dropped and
   counted) -> ``samples.npz``;
4. packing statistics of those samples (``leafe_fast.packing``);
5. Stage 2 training: a few steps of the fused LEAFE loss on packed varlen batches;
6. pass@k again on the same test levels, then ``report.json`` and a short printed report.

A tiny random model on a handful of levels shows that the pipeline runs end to end and what each stage
produces; it is not a result about LEAFE: expect pass@k to move by noise, not by skill.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leafe_fast.checks import check_out_path
from leafe_fast.errors import UserError
from leafe_fast.flags import add_config_flags, config_from_args
from leafe_fast.outputs import write_json

DIRECTIONS = ("up", "down", "left", "right")
MAX_POSITIONS = 8192  # the tiny model's context; episodes that outgrow it end as failures


@dataclass
class DemoConfig:
    """Settings of ``leafe-fast demo`` (its flags come from these fields)."""

    out: Path = field(default=Path("runs/demo"), metadata={"help": "output folder"})
    tasks: int = field(default=16, metadata={"help": "train levels to explore", "min": 1})
    eval_tasks: int = field(default=16, metadata={"help": "held-out test levels", "min": 1})
    n: int = field(default=4, metadata={"help": "episodes per test level for pass@k", "min": 1})
    k: tuple[int, ...] = field(default=(1, 2, 4), metadata={
        "help": "k values of pass@k (those above n are left out)", "min": 1})
    max_episode_steps: int = field(default=30, metadata={"help": "Sokoban step limit per episode", "min": 1})
    max_branches: int = field(default=4, metadata={"help": "rollbacks per explored level", "min": 0})
    reflect_every: int = field(default=3, metadata={
        "help": "periodic reflection every K steps of a branch (0: only when an attempt ends)", "min": 0})
    format_sft_steps: int = field(default=60, metadata={
        "help": "SFT steps on random walks before LEAFE that teach the answer format (not LR warm-up), 0 to skip",
        "min": 0})
    train_steps: int = field(default=16, metadata={"help": "Stage-2 training steps", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "Stage-2 learning rate", "min": 0.0})
    token_budget: int = field(default=4096, metadata={"help": "tokens per packed micro-batch", "min": 2})
    hidden_size: int = field(default=64, metadata={"help": "tiny model width", "min": 8})
    layers: int = field(default=2, metadata={"help": "tiny model depth", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of levels, model init and sampling"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (1: a tiny model's matmuls are overhead-bound, more threads only add "
                "synchronisation)", "min": 1})
    progress: bool = field(default=True, metadata={"help": "progress bars (quiet when stderr is not a TTY)"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, DemoConfig)


def _parse_ks(ks: Any, n: int) -> list[int]:
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= n})
    return ks or [1]


def run(args: argparse.Namespace) -> int:
    config = config_from_args(DemoConfig, args)
    for name in ("tasks", "eval_tasks", "n", "max_episode_steps", "train_steps", "threads"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(config, name)}")
    for name in ("format_sft_steps", "max_branches", "reflect_every"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}", f"must be >= 0, got {getattr(config, name)}")
    import torch

    threads = torch.get_num_threads()
    try:
        report = run_demo(config)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep their setting
    print(format_report(report))
    return 0


# --- the pipeline ----------------------------------------------------------------------------


def run_demo(args: DemoConfig) -> dict[str, Any]:
    import torch

    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.data.columns import SampleColumns
    from leafe_fast.data.recipes import BuildConfig, build_recipe
    from leafe_fast.engines.base import SamplingParams
    from leafe_fast.engines.hf import HFEngine
    from leafe_fast.envs.registry import list_tasks, make_env
    from leafe_fast.eval import evaluate
    from leafe_fast.explore import ExploreConfig, explore
    from leafe_fast.tiny import tiny_config, tiny_model, tiny_tokenizer
    from leafe_fast.train import TrainConfig, Trainer, load_model

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out: Path = args.out
    _fresh_outputs(out)
    progress = args.progress and sys.stderr.isatty()
    ks = _parse_ks(args.k, args.n)
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # -- model, tokenizer, engine ----------------------------------------------------------------
    t0 = time.perf_counter()
    tok = tiny_tokenizer("qwen2")
    chat = ChatFormat.from_tokenizer(tok)
    size = dict(hidden_size=args.hidden_size, num_layers=args.layers, intermediate_size=2 * args.hidden_size,
                max_position_embeddings=MAX_POSITIONS)
    config = tiny_config(tok, "qwen2", **size)
    model = load_model(config, dtype="float32", device="cpu", attn="auto", liger=False, seed=args.seed)
    # The engine keeps a stock-attention copy (KV-cached decoding); weights are synced after training.
    policy = tiny_model(tok, "qwen2", seed=args.seed, **size)
    policy.load_state_dict(model.state_dict())
    # Every episode's history stays in the prefix cache (tiny KV: ~0.5 KB a token), so each turn only
    # prefills its new tokens; the engine's default budget would evict and recompute them.
    episodes = max(args.tasks, args.eval_tasks * args.n)
    engine = HFEngine(policy, tok, max_batch_size=64, seed=args.seed, max_cached_tokens=episodes * MAX_POSITIONS)
    env = make_env("sokoban")
    level_kwargs = dict(max_steps=args.max_episode_steps)
    train_tasks = list_tasks("sokoban", "train", args.tasks, seed=args.seed, **level_kwargs)
    test_tasks = list_tasks("sokoban", "test", args.eval_tasks, seed=args.seed, **level_kwargs)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16)
    stage("setup", t0)

    def train(samples: Any, steps: int, lr: float, subdir: str, warmup: int, budget: int) -> dict[str, Any]:
        cfg = TrainConfig(
            output_dir=str(out / subdir), max_steps=steps, token_budget=budget, lr=lr,
            warmup_steps=warmup, max_grad_norm=1.0, seed=args.seed, log_every=1, peak_flops=None,
            progress=progress, export=False,  # the engine takes the weights in memory
        )
        summary = Trainer(model, samples, cfg, tokenizer=tok).train()
        engine.update_weights({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {
            "steps": summary.steps,
            "first_loss": summary.losses[0] if summary.losses else None,
            "final_loss": summary.final_loss,
            "group_losses": summary.group_losses,
            "tokens": summary.tokens,
            "target_tokens": summary.target_tokens,
            "tokens_per_s": round(summary.tokens_per_s, 1),
            "seconds": round(summary.seconds, 2),
        }

    # -- 0. format warm-up -------------------------------------------------------------------------
    warmup_report: dict[str, Any] = {"steps": 0}
    if args.format_sft_steps:
        t0 = time.perf_counter()
        val_tasks = list_tasks("sokoban", "val", max(4, args.tasks), seed=args.seed, **level_kwargs)
        walks = random_walk_samples(env, chat, val_tasks, walks_per_task=4, steps=min(8, args.max_episode_steps),
                                    seed=args.seed)
        # One walk per micro-batch: short packs keep the CPU attention (quadratic in the pack) cheap.
        budget = -(-max(len(w) for w in walks) // 256) * 256
        warmup_report = train(walks, args.format_sft_steps, 5e-3, "warmup", warmup=0, budget=budget)
        warmup_report["samples"] = len(walks)
        stage("warmup", t0)

    def pass_at_k(label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = evaluate(engine, chat, env, test_tasks, n=args.n, ks=ks, sampling=sampling,
                       max_turns=args.max_episode_steps, max_context_tokens=MAX_POSITIONS,
                       seed=args.seed + 1, progress=progress)
        stage(label, t0)
        return {"success_rate": res["success_rate"], "pass@k": res["pass@k"], "cut_episodes": res["cut_episodes"],
                "successes": {r["task_id"]: r["successes"] for r in res["tasks"]}}

    # -- 1. before ---------------------------------------------------------------------------------
    before = pass_at_k("eval_before")

    # -- 2. explore ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    trees_path = out / "trees.jsonl"
    xcfg = ExploreConfig(
        reflector="grounded", reflect_every=args.reflect_every, max_branches=args.max_branches,
        max_depth=args.max_episode_steps,
        max_steps=args.max_episode_steps * (args.max_branches + 1), max_new_tokens=sampling.max_new_tokens,
        temperature=1.0, seed=args.seed, concurrency=max(1, len(train_tasks)), progress=progress,
        max_context_tokens=MAX_POSITIONS,
    )
    xsum = explore(train_tasks, "sokoban", engine, chat, trees_path, xcfg)
    stage("explore", t0)

    # -- 3. samples --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    samples, bstats = build_recipe(trees_path, BuildConfig(recipe="leafe", max_len=args.token_budget,
                                                           overflow="truncate"))
    cols = SampleColumns.from_samples(samples)
    cols.save(out / "samples.npz")
    stage("build_samples", t0)

    # -- 4. packing ----------------------------------------------------------------------------------
    pack_report = _pack_report(cols, args.token_budget, args.seed) if len(cols) else {}

    # -- 5. train ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if len(cols):
        train_report = train(cols, args.train_steps, args.lr, "train", warmup=min(2, args.train_steps - 1),
                             budget=args.token_budget)
    else:
        train_report = {"steps": 0, "skipped": "no successful trajectory was explored, so there is nothing to distil"}
    stage("train", t0)

    # -- 6. after ----------------------------------------------------------------------------------
    after = pass_at_k("eval_after") if len(cols) else before
    engine.close()

    report = {
        "schema": "leafe.demo/1",
        "config": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(args).items()},
        "model": {"family": "qwen2", "parameters": sum(p.numel() for p in model.parameters()), **size},
        "tasks": {"train": [t.task_id for t in train_tasks], "test": [t.task_id for t in test_tasks]},
        "warmup": warmup_report,
        "eval_before": before,
        "explore": xsum.to_dict(),
        "samples": bstats.as_dict(),
        "packing": pack_report,
        "train": train_report,
        "eval_after": after,
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 2)},
        "torch_threads": torch.get_num_threads(),
        "files": {"trees": str(trees_path), "samples": str(out / "samples.npz"), "report": str(out / "report.json")},
    }
    write_json(out / "report.json", report, default=_json_default)
    return report


def _fresh_outputs(out: Path) -> None:
    """A rerun starts over: exploration would otherwise skip the levels a previous (different) model
    already explored. Only the demo's own outputs are removed."""
    check_out_path(out, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("trees.jsonl", "samples.npz", "report.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("warmup", "train"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def random_walk_samples(env: Any, chat: Any, tasks: list, walks_per_task: int, steps: int, seed: int) -> list:
    """Games of uniformly random moves, tokenized like exploration trajectories; every action token is
    a target. They teach the output format and nothing about solving levels."""
    from leafe_fast.data.columns import Sample
    from leafe_fast.trajectory import open_trajectory

    rng = random.Random(seed)
    out = []
    for task in tasks:
        for _ in range(walks_per_task):
            traj = open_trajectory(chat, env.instructions(), env.reset(task))
            for _ in range(steps):
                action = chat.encode_action(f"Move {rng.choice(DIRECTIONS)}.")
                step = env.step(chat.decode_action(action))
                if step.done:  # the last observation predicts nothing: left out
                    traj.add_step_ids(action, [], target=True)
                    break
                traj.add_step(action, step, target=True)
            ids, mask = traj.arrays(trim=False)
            out.append(Sample(ids, mask, group=0))
    return out


def _pack_report(cols: Any, budget: int, seed: int) -> dict[str, Any]:
    from leafe_fast.packing import pack

    t0 = time.perf_counter()
    packing = pack(cols, budget, seed=seed)
    seconds = time.perf_counter() - t0
    mbs = list(packing.micro_batches)
    scalars = {k: v for k, v in vars(packing.stats).items() if isinstance(v, (int, float, str))}
    return {
        "token_budget": budget,
        "micro_batches": len(mbs),
        "tokens": int(sum(mb.num_tokens for mb in mbs)),
        "target_rows": int(sum(mb.num_targets for mb in mbs)),
        "seconds": round(seconds, 4),
        "stats": scalars,
    }


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


# --- the printed report ---------------------------------------------------------------------------


def format_report(r: dict[str, Any]) -> str:
    def pk(res: dict[str, Any]) -> str:
        return "  ".join(f"pass@{k} {v:.3f}" for k, v in res["pass@k"].items())

    x, s, t = r["explore"], r["samples"], r["train"]
    lines = [
        "",
        "=== leafe-fast demo report ===",
        f"model: tiny qwen2-style, {r['model']['parameters']:,} parameters (random init), CPU",
    ]
    if r["warmup"].get("steps"):
        w = r["warmup"]
        lines.append(f"0 format SFT (action format only): {w['steps']} steps, loss {w['first_loss']:.3f} -> {w['final_loss']:.3f}")
    lines += [
        f"1 before: {len(r['tasks']['test'])} test levels x {r['config']['n']}: {pk(r['eval_before'])}",
        f"2 explore ({x['mode']}, reflector {x['reflector']}"
        f"{', ORACLE ABLATION: not LEAFE' if x['ablation'] else ''}): {x['finished']} train levels, "
        f"{x['successes']} solved, {x['branches']} branches, "
        f"{x['steps']} steps, prefix reuse {x['prefix_reuse']:.1%}",
        f"3 samples ({s['recipe']} recipe): {s['samples'].get('rehearsal', 0)} rehearsal "
        f"({s['target_tokens'].get('rehearsal', 0)} target tokens) + {s['samples'].get('counterfactual', 0)} "
        f"counterfactual ({s['target_tokens'].get('counterfactual', 0)} target tokens), {s['tokens']:,} tokens, "
        f"{s['target_share']:.1%} targets",
        f"  dropped: {s['counterfactual_dropped'].get('invalid', 0)} invalid, "
        f"{s['counterfactual_dropped'].get('noop', 0)} no-op, "
        f"{s['counterfactual_dropped'].get('same_as_abandoned', 0)} same-as-abandoned corrections; "
        f"{s['failed_branches']} of {s['branches']} branches never succeeded; "
        f"{s['masked_actions']} invalid/no-op actions masked; {s['duplicates_removed']} duplicates",
    ]
    if r["packing"]:
        p = r["packing"]
        eff = p["stats"].get("token_efficiency")
        lines.append(f"4 packing: {p['micro_batches']} micro-batches of <= {p['token_budget']} tokens, "
                     f"{p['target_rows']} loss rows" + (f", token efficiency {eff:.1%}" if eff is not None else ""))
    if t.get("steps"):
        groups = ", ".join(f"{g} CE {v:.3f}" for g, v in t["group_losses"].items())
        lines.append(f"5 train: {t['steps']} steps, loss (sum of per-group mean CE) {t['first_loss']:.3f} -> "
                     f"{t['final_loss']:.3f} (last step: {groups}), {t['tokens_per_s']:,.0f} tokens/s")
    else:
        lines.append(f"5 train: skipped ({t.get('skipped', '')})")
    lines += [
        f"6 after:  {pk(r['eval_after'])}",
        f"time: {r['timings_s']['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in r['timings_s'].items() if k != 'total')})",
        f"report: {r['files']['report']}",
        "(a tiny random model on a few levels: this run shows the pipeline, not LEAFE's effect)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    from leafe_fast.cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
