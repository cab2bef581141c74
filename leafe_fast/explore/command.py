"""``leafe-fast explore``: Stage-1 exploration -> trees.jsonl (LEAFE, or independent rollouts).

    leafe-fast explore --env sokoban --tasks 8 --split train --engine hf --model tiny \\
        --out runs/x/trees.jsonl --reflector grounded --reflect-every 3 --max-branches 4
    leafe-fast explore --mode independent --budget-from runs/x/trees.jsonl ...   # the RS baseline's data

``--model tiny`` builds a random tiny Qwen2-style model and tokenizer in-process (for CPU smoke runs;
its actions are noise, so use ``--reflector grounded``). Otherwise ``--model`` is a local directory.
``--config cfg.json`` holds the same settings as JSON: ``ExploreConfig`` fields (``max_branches``,
``reflect_every``, ...) and ``ExploreRun`` fields (``env``, ``tasks``, ``out``, ...); flags given on
the command line override it. Rerunning with the same ``--out`` skips finished tasks; a second run
on an ``--out`` in use stops. Every input mistake (config types, unknown ``--task-arg``/``--env-arg``
keys, a locked or malformed ``--out``) is reported before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from leafe_fast.checks import check_device, check_model_dir, check_out_path
from leafe_fast.errors import UserError
from leafe_fast.explore.config import ExploreConfig
from leafe_fast.flags import add_config_flags, config_from_args, config_from_dict, key_value, read_json_object
from leafe_fast.outputs import write_json
from leafe_fast.train.config import DTYPE_CHOICES, torch_dtype


@dataclass
class ExploreRun:
    """What to explore with which model, and where to write it (the run's settings besides ExploreConfig)."""

    env: str | None = field(default=None, metadata={
        "help": "environment name (sokoban, code, ...); see leafe_fast.envs.registry"})
    tasks: int = field(default=8, metadata={"help": "number of tasks to explore", "min": 1})
    split: str = field(default="train", metadata={"help": "task split", "choices": ("train", "val", "test")})
    task_seed: int = field(default=0, metadata={"help": "seed of the task list"})
    engine: str = field(default="hf", metadata={"help": "rollout engine", "choices": ("hf", "sglang")})
    model: str | None = field(default=None, metadata={
        "help": "local model directory, or 'tiny' (random tiny model, CPU smoke runs)"})
    tiny_style: str = field(default="qwen2", metadata={"help": "chat template of --model tiny",
                                                       "choices": ("qwen2", "llama3")})
    engine_url: str | None = field(default=None, metadata={
        "help": "sglang: URL of a running SGLang server instead of an in-process engine"})
    device: str | None = field(default=None, metadata={"help": "hf: torch device (none: the model's)"})
    dtype: str | None = field(default=None, metadata={"help": "hf: model dtype (none or auto: as saved)",
                                                      "choices": DTYPE_CHOICES})
    out: Path | None = field(default=None, metadata={
        "help": "output trees.jsonl (appended; finished tasks are skipped; locked while a run writes it)"})
    task_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra arguments of the env's task list (--task-arg KEY=VALUE)", "cli": False})


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run (ExploreRun)")
    add_config_flags(run, ExploreRun)
    run.add_argument("--task-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="extra argument of the env's task list, e.g. num_boxes=2 or difficulty=hard (repeatable)")
    run.add_argument("--env-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="extra argument of the env constructor, e.g. max_steps=40 (repeatable)")
    run.add_argument("--config", type=Path, help="JSON file with these settings; flags override it")
    run.add_argument("--summary-json", type=Path, help="also write the run summary as JSON here")
    cfg = p.add_argument_group("exploration (ExploreConfig)")
    add_config_flags(cfg, ExploreConfig)


def resolve(args: argparse.Namespace) -> tuple[ExploreRun, ExploreConfig]:
    """(run settings, ExploreConfig) from defaults < config file < flags; input mistakes are UserErrors."""
    file_data: dict[str, Any] = {}
    source = "config"
    if getattr(args, "config", None) is not None:
        source = str(args.config)
        file_data = read_json_object(args.config)
    run_keys = {f.name for f in fields(ExploreRun)}
    run_data = {k: v for k, v in file_data.items() if k in run_keys}
    cfg_data = {k: v for k, v in file_data.items() if k not in run_keys}
    run = config_from_args(ExploreRun, args, config_from_dict(ExploreRun, run_data, source=source))
    config = ExploreConfig.from_dict(cfg_data, source=source)
    config = config_from_args(ExploreConfig, args, config)
    if args.env_arg:
        config.env_kwargs = {**config.env_kwargs, **dict(args.env_arg)}
    try:
        config.validate()
    except UserError as e:
        raise UserError("--" + e.where.split(".", 1)[-1].replace("_", "-"), e.problem, e.fix) from None
    run.task_args = {**run.task_args, **dict(args.task_arg)}
    for key in ("env", "model", "out"):
        if not getattr(run, key):
            raise UserError(f"--{key}", "is required", f"pass --{key} or set {key!r} in the --config file")
    return run, config


def check_inputs(run: ExploreRun, config: ExploreConfig, summary_json: Path | None = None):
    """Everything that can be checked without the model: env name, task and env arguments, the task
    list itself, and the output file (a directory, a malformed line, another run's lock). Returns the tasks."""
    from leafe_fast.data.schema import TreeWriter
    from leafe_fast.envs.registry import available_envs, check_env_args, env_from_flags, tasks_from_flags

    if run.env not in available_envs():
        raise UserError("--env", f"unknown environment {run.env!r}", f"choose one of {available_envs()}")
    check_env_args(run.env, config.env_kwargs)  # unknown keys before the task list builds anything
    tasks = tasks_from_flags(run.env, run.split, run.tasks, run.task_seed, run.task_args)
    # a probe instance: bad constructor values surface now, not after the model has loaded
    probe = env_from_flags(run.env, config.env_kwargs)
    close = getattr(probe, "close", None)
    if callable(close):
        close()
    if run.model not in (None, "tiny") and run.engine == "hf":
        check_model_dir(run.model)
    check_device(run.device)
    check_out_path(run.out)
    if summary_json is not None:
        check_out_path(summary_json, "--summary-json")
        if summary_json.resolve() == Path(run.out).resolve():
            raise UserError("--summary-json", f"{summary_json} is also the --out file", "pass another file path")
    TreeWriter(run.out).close()  # a probe: raises if --out is a directory, malformed or in use
    check_resume_settings(run, config)
    return tasks


# settings that do not change what a tree holds (batching, or filled in from the model at run time)
_RESUME_FREE = ("progress", "env_workers", "concurrency", "max_context_tokens")


def check_resume_settings(run: ExploreRun, config: ExploreConfig) -> None:
    """A rerun on an --out that holds trees continues that exploration: its trees must come from the same
    env and settings (like ``train --resume``), else the file would mix two experiments silently."""
    from leafe_fast.data.schema import iter_trees

    if not Path(run.out).is_file():
        return
    first = next(iter(iter_trees(run.out)), None)
    if first is None:
        return
    if first.env != run.env:
        raise UserError("--out", f"{run.out} holds trees of env {first.env!r}, this run explores {run.env!r}",
                        "pass another --out for another environment")
    recorded = first.meta.get("config")
    if not isinstance(recorded, dict):
        return
    now = json.loads(json.dumps(config.to_dict(), default=str))  # as the trees file holds it (lists, not tuples)
    for key in sorted(set(recorded) & set(now)):
        if key not in _RESUME_FREE and recorded[key] != now[key]:
            flag = "--env-arg" if key == "env_kwargs" else f"--{key.replace('_', '-')}"
            raise UserError("--out", f"{run.out} holds trees explored with {key}={recorded[key]!r}, this run has "
                            f"{now[key]!r}", f"pass {flag} as before to resume it, or another --out for new settings")


def build_engine(run: ExploreRun):
    """(engine, tokenizer) for the run settings."""
    from leafe_fast.engines import make_engine

    dtype = torch_dtype(run.dtype)
    if run.engine == "sglang":
        # the tokenizer (chat template) comes from the local --model directory in both modes
        from leafe_fast.engines.sglang import import_sglang

        if not run.engine_url:
            try:
                import_sglang()  # fail early, with the install hint
            except ImportError as e:
                raise UserError("--engine sglang", str(e)) from None
        if not Path(run.model).is_dir():
            raise UserError("--model", f"{run.model!r} is not a local directory", "it is needed for its tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.model)
        kw = {"url": run.engine_url} if run.engine_url else {"model_path": run.model}
        return make_engine("sglang", tokenizer=tokenizer, **kw), tokenizer
    if run.model == "tiny":
        from leafe_fast.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer(run.tiny_style)
        model = tiny_model(tokenizer, "llama" if run.tiny_style == "llama3" else "qwen2")
    else:
        if not Path(run.model).is_dir():
            raise UserError("--model", f"{run.model!r} is not a local directory", "pass a model directory or 'tiny'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.model)
        model = AutoModelForCausalLM.from_pretrained(run.model, dtype=dtype or "auto")
    return make_engine("hf", model=model, tokenizer=tokenizer, device=run.device, dtype=dtype), tokenizer


def run(args: argparse.Namespace) -> int:
    from leafe_fast.explore.loop import explore

    settings, config = resolve(args)
    tasks = check_inputs(settings, config, args.summary_json)
    engine, tokenizer = build_engine(settings)
    if config.max_context_tokens is None:  # bounded by the model, so a long episode ends instead of crashing
        config.max_context_tokens = getattr(engine, "max_positions", None)
    try:
        summary = explore(tasks, settings.env, engine, tokenizer, settings.out, config)
    except KeyboardInterrupt:
        print(f"leafe-fast explore: interrupted; finished trees are in {settings.out}, rerun to resume",
              file=sys.stderr)
        return 130
    finally:
        engine.close()
    if not config.progress:
        print(summary.format())
    if args.summary_json is not None:
        write_json(args.summary_json, summary.to_dict())
    return 0
