"""``leafe-fast eval``: pass@k of a model on an environment's held-out tasks.

    leafe-fast eval --model runs/x/final --env sokoban --split test --tasks 32 --n 8 --k 1,4,8 \
        --out runs/x/eval.json

Each task is played ``--n`` times by the policy alone (no reflection, no experience) through the
embedded HF engine; the unbiased pass@k estimator (``leafe_fast.eval.pass_at_k``) turns the per-task
success counts into pass@k. ``--model`` is a local directory (``config.json`` + weights + tokenizer);
nothing is downloaded. The flags are the fields of :class:`EvalConfig` (``leafe_fast.flags``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from leafe_fast.checks import check_device, check_model_dir, check_out_path
from leafe_fast.errors import UserError
from leafe_fast.flags import add_config_flags, config_from_args, key_value
from leafe_fast.outputs import write_json
from leafe_fast.train.config import DTYPE_CHOICES, torch_dtype


@dataclass
class EvalConfig:
    """What ``leafe-fast eval`` runs; every field is a flag (``--task-seed`` for ``task_seed``)."""

    env: str = field(default="sokoban", metadata={"help": "registered environment name"})
    env_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "options of the environment's constructor (--env-arg KEY=VALUE)", "cli": False})
    task_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra arguments of the environment's task list (--task-arg KEY=VALUE)", "cli": False})
    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "task split"})
    tasks: int = field(default=16, metadata={"help": "number of tasks", "min": 1})
    task_seed: int = field(default=0, metadata={"help": "seed of the task list"})
    n: int = field(default=4, metadata={"help": "episodes per task", "min": 1})
    k: tuple[int, ...] = field(default=(1,), metadata={"help": "k values of pass@k, each <= n", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling, in (0, 1]", "min": 0.0, "max": 1.0})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "token limit of one action (none: the environment's limit, as in exploration)", "min": 1})
    max_turns: int = field(default=100, metadata={"help": "cap on steps per episode", "min": 1})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str | None = field(default=None, metadata={"help": "torch device (none: cuda if available, else cpu)"})
    dtype: str | None = field(default=None, metadata={"help": "model dtype (none or auto: as saved)",
                                                      "choices": DTYPE_CHOICES})
    max_batch_size: int = field(default=32, metadata={"help": "engine batch size", "min": 1})
    out: Path | None = field(default=None, metadata={"help": "write the result JSON here"})
    progress: bool = field(default=True, metadata={"help": "progress bar (off when stderr is not a terminal)"})

    def validate(self) -> "EvalConfig":
        if max(self.k, default=0) > self.n:
            raise UserError("--k", f"k={max(self.k)} > n={self.n}", "sample at least k episodes per task (--n)")
        if not self.k:
            raise UserError("--k", "no k values given", "pass e.g. --k 1,4")
        if self.top_p <= 0:
            raise UserError("--top-p", f"must be > 0, got {self.top_p}", "use a value in (0, 1]")
        if self.out is not None and self.out.is_dir():
            raise UserError("--out", f"{self.out} is a directory", "pass a file path, e.g. runs/x/eval.json")
        if self.out is not None:
            check_out_path(self.out)
        return self


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="local model directory (config, weights, tokenizer)")
    p.add_argument("--env-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="option of the environment's constructor, repeatable (VALUE is JSON, e.g. size=6)")
    p.add_argument("--task-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra argument of the environment's task list, repeatable")
    add_config_flags(p, EvalConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    cfg.env_kwargs.update(dict(args.env_arg))
    cfg.task_kwargs.update(dict(args.task_arg))
    cfg.validate()

    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.engines.base import SamplingParams
    from leafe_fast.engines.hf import HFEngine
    from leafe_fast.envs.registry import (action_token_limit, available_envs, check_task_args, env_from_flags,
                                          tasks_from_flags)
    from leafe_fast.eval import evaluate

    if cfg.env not in available_envs():
        raise UserError("--env", f"unknown environment {cfg.env!r}", f"choose one of {available_envs()}")
    if cfg.env_kwargs.get("reveal_hidden_tests"):  # the policy would see held-out tests mid-episode
        raise UserError("--env-arg reveal_hidden_tests", "evaluation never shows hidden tests to the policy",
                        "drop it (it is off by default)")
    # unknown --env-arg/--task-arg keys and bad values fail here, before the model loads
    check_task_args(cfg.env, cfg.task_kwargs)
    env = env_from_flags(cfg.env, cfg.env_kwargs)
    tasks = tasks_from_flags(cfg.env, cfg.split, cfg.tasks, cfg.task_seed, cfg.task_kwargs)
    check_model_dir(args.model)
    check_device(cfg.device)
    max_new_tokens = cfg.max_new_tokens or action_token_limit(cfg.env)
    engine = HFEngine(str(args.model), device=cfg.device, dtype=torch_dtype(cfg.dtype),
                      max_batch_size=cfg.max_batch_size, seed=cfg.seed)
    try:
        chat = ChatFormat.from_tokenizer(engine.tokenizer)
        sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens)
        positions = getattr(engine.model.config, "max_position_embeddings", None)
        result = evaluate(
            engine, chat, env, tasks, n=cfg.n, ks=cfg.k, sampling=sampling, max_turns=cfg.max_turns,
            max_context_tokens=positions, seed=cfg.seed, progress=cfg.progress and sys.stderr.isatty(),
        )
    finally:
        engine.close()
    print(format_result(result, f"{cfg.env}/{cfg.split}"))
    if cfg.out is not None:
        record = {"model": str(args.model), "env": cfg.env, "split": cfg.split, **result}
        write_json(cfg.out, record, default=str)
        print(f"wrote {cfg.out}")
    return 0


def format_result(result: dict, label: str) -> str:
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in result["pass@k"].items())
    return (f"eval {label}: {result['num_tasks']} tasks x {result['n']} episodes, "
            f"success rate {result['success_rate']:.3f}, {ks}")


__all__ = ["EvalConfig", "add_arguments", "run", "format_result"]
