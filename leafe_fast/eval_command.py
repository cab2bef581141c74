"""``leafe-fast eval``: pass@k of a model on an environment's held-out tasks.

    leafe-fast eval --model runs/x/final --env sokoban --split test --tasks 32 --n 8 --k 1,4,8 \
        --out runs/x/eval.json

Each task is played ``--n`` times by the policy alone (no reflection, no experience) through the
embedded HF engine; the unbiased pass@k estimator (``leafe_fast.eval.pass_at_k``) turns the per-task
success counts into pass@k. ``--model`` is a local directory (``config.json`` + weights + tokenizer);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ks(value: str) -> list[int]:
    try:
        ks = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"every k must be >= 1, got {value!r}")
    return ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="local model directory (config, weights, tokenizer)")
    p.add_argument("--env", default="sokoban", help="registered environment name (default: sokoban)")
    p.add_argument("--split", default="test", help="task split: train, val or test (default: test)")
    p.add_argument("--tasks", type=int, default=16, help="number of tasks (default: 16)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the task list (default: 0)")
    p.add_argument("--n", type=int, default=4, help="episodes per task (default: 4)")
    p.add_argument("--k", type=_ks, default=[1], help="k values of pass@k, e.g. 1,2,4 (each <= n; default: 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per action (default: 64)")
    p.add_argument("--max-turns", type=int, default=100, help="cap on steps per episode (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch-size", type=int, default=32, help="engine batch size (default: 32)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.engines.base import SamplingParams
    from leafe_fast.engines.hf import HFEngine
    from leafe_fast.envs.registry import list_tasks, make_env
    from leafe_fast.eval import evaluate

    if not args.model.is_dir():
        print(f"leafe-fast eval: --model {args.model} is not a local model directory", file=sys.stderr)
        return 2
    if max(args.k) > args.n:
        print(f"leafe-fast eval: k={max(args.k)} > n={args.n}: sample at least k episodes per task", file=sys.stderr)
        return 2
    try:
        env = make_env(args.env)
        tasks = list_tasks(args.env, args.split, args.tasks, seed=args.task_seed)
    except (KeyError, ValueError, ImportError) as e:
        print(f"leafe-fast eval: {e}", file=sys.stderr)
        return 2
    engine = HFEngine(str(args.model), device=args.device, max_batch_size=args.max_batch_size, seed=args.seed)
    chat = ChatFormat.from_tokenizer(engine.tokenizer)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    positions = getattr(engine.model.config, "max_position_embeddings", None)
    result = evaluate(
        engine, chat, env, tasks, n=args.n, ks=args.k, sampling=sampling, max_turns=args.max_turns,
        max_context_tokens=positions, seed=args.seed, progress=not args.no_progress,
    )
    engine.close()
    print(format_result(result, f"{args.env}/{args.split}"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "env": args.env, "split": args.split, **result}, indent=2))
        print(f"wrote {args.out}")
    return 0


def format_result(result: dict, label: str) -> str:
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in result["pass@k"].items())
    return (f"eval {label}: {result['num_tasks']} tasks x {result['n']} episodes, "
            f"success rate {result['success_rate']:.3f}, {ks}")
