"""``leafe-fast explore``: Stage-1 reflective tree exploration -> trees.jsonl.

    leafe-fast explore --env sokoban --tasks 8 --split train --engine hf --model tiny \\
        --out runs/x/trees.jsonl --reflector grounded --reflect-every 3 --max-branches 4

``--model tiny`` builds a random tiny Qwen2-style model and tokenizer in-process (for CPU smoke runs;
its actions are noise, so use ``--reflector grounded``). Otherwise ``--model`` is a local directory.
``--config cfg.json`` holds the same settings as JSON: ``ExploreConfig`` fields (``max_branches``,
``reflect_every``, ...) and the run keys ``env, tasks, split, task_seed, engine, model, out``; flags
given on the command line override it. Rerunning with the same ``--out`` skips finished tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from leafe_fast.explore.config import INVALID_STEP_POLICIES, REFLECTORS, ExploreConfig

# run keys a config file may hold besides ExploreConfig's fields, with their defaults
RUN_DEFAULTS: dict[str, Any] = {
    "env": None, "tasks": 8, "split": "train", "task_seed": 0, "engine": "hf", "model": None,
    "out": None, "device": None, "dtype": None, "tiny_style": "qwen2", "engine_url": None,
}
# flag dest -> ExploreConfig field
CONFIG_FLAGS = (
    "reflector", "reflect_every", "reflect_retries", "invalid_step", "reflect_max_new_tokens",
    "max_branches", "max_steps", "max_tokens", "max_depth", "max_context_tokens", "temperature", "top_p",
    "max_new_tokens", "seed", "concurrency", "env_workers",
)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run")
    run.add_argument("--env", help="environment name (sokoban, code, ...); see leafe_fast.envs.registry")
    run.add_argument("--tasks", type=int, help="number of tasks to explore (default 8)")
    run.add_argument("--split", choices=("train", "val", "test"), help="task split (default train)")
    run.add_argument("--task-seed", type=int, help="seed of the task list (default 0)")
    run.add_argument("--task-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="extra argument of the env's task list, e.g. num_boxes=2 (repeatable)")
    run.add_argument("--env-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="extra argument of the env constructor, e.g. max_steps=40 (repeatable)")
    run.add_argument("--engine", choices=("hf", "sglang"), help="rollout engine (default hf)")
    run.add_argument("--model", help="local model directory, or 'tiny' (random tiny model, CPU smoke runs)")
    run.add_argument("--tiny-style", choices=("qwen2", "llama3"), help="chat template of --model tiny")
    run.add_argument("--engine-url", help="sglang: URL of a running SGLang server instead of an in-process engine")
    run.add_argument("--device", help="hf: torch device (default: the model's)")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="hf: model dtype")
    run.add_argument("--out", type=Path, help="output trees.jsonl (appended; finished tasks are skipped)")
    run.add_argument("--config", type=Path, help="JSON file with these settings; flags override it")
    run.add_argument("--summary-json", type=Path, help="also write the run summary as JSON here")

    cfg = p.add_argument_group("exploration (ExploreConfig)")
    cfg.add_argument("--reflector", choices=REFLECTORS, help="llm: the policy reflects in JSON; grounded: the env does")
    cfg.add_argument("--reflect-every", type=int, help="reflect every K steps of a branch (0: only on failure)")
    cfg.add_argument("--reflect-retries", type=int, help="retries after a malformed reflection reply")
    cfg.add_argument("--invalid-step", choices=INVALID_STEP_POLICIES, help="out-of-range rollback step policy")
    cfg.add_argument("--reflect-max-new-tokens", type=int, help="token limit of one reflection reply")
    cfg.add_argument("--max-branches", type=int, help="rollbacks per task")
    cfg.add_argument("--max-steps", type=int, help="env steps per task, all branches together")
    cfg.add_argument("--max-tokens", type=int, help="generated tokens per task (actions and reflections)")
    cfg.add_argument("--max-depth", type=int, help="steps of one trajectory")
    cfg.add_argument("--max-context-tokens", type=int, help="prompt + new tokens of one request")
    cfg.add_argument("--temperature", type=float, help="sampling temperature of actions")
    cfg.add_argument("--top-p", type=float, help="nucleus sampling of actions")
    cfg.add_argument("--max-new-tokens", type=int, help="token limit of one action")
    cfg.add_argument("--seed", type=int, help="sampling seed (per task and request)")
    cfg.add_argument("--concurrency", type=int, help="tasks in flight (one engine batch per round)")
    cfg.add_argument("--env-workers", type=int, help="threads stepping envs between rounds")
    cfg.add_argument("--stop-on-success", dest="stop_on_success", action="store_true", default=None,
                     help="end a task at its first success (default)")
    cfg.add_argument("--no-stop-on-success", dest="stop_on_success", action="store_false",
                     help="keep exploring after a success (reflects on it)")
    cfg.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], ExploreConfig]:
    """(run settings, ExploreConfig) from defaults < config file < flags."""
    file_data: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.exists():
            raise FileNotFoundError(f"--config {args.config} does not exist")
        try:
            file_data = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.config}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(file_data, dict):
            raise ValueError(f"{args.config}: the config must be a JSON object")
    run = {k: file_data.pop(k, v) for k, v in RUN_DEFAULTS.items()}
    for key in RUN_DEFAULTS:
        flag = getattr(args, key, None)
        if flag is not None:
            run[key] = flag
    config = ExploreConfig.from_dict(file_data, source=str(args.config or "config"))
    overrides = {k: getattr(args, k, None) for k in CONFIG_FLAGS}
    overrides["stop_on_success"] = args.stop_on_success
    if args.no_progress:
        overrides["progress"] = False
    if args.env_arg:
        overrides["env_kwargs"] = {**config.env_kwargs, **dict(args.env_arg)}
    config = config.with_overrides(overrides)
    run["task_args"] = dict(args.task_arg)
    for key in ("env", "model", "out"):
        if not run[key]:
            raise ValueError(f"--{key} is required (as a flag or in the --config file)")
    return run, config


def build_engine(run: dict[str, Any]):
    """(engine, tokenizer) for the run settings."""
    import torch

    from leafe_fast.engines import make_engine

    dtype = getattr(torch, run["dtype"]) if run["dtype"] else None
    if run["engine"] == "sglang":
        # the tokenizer (chat template) comes from the local --model directory in both modes
        from leafe_fast.engines.sglang import import_sglang

        if not run["engine_url"]:
            import_sglang()  # fail early, with the install hint
        if not Path(run["model"]).is_dir():
            raise FileNotFoundError(f"--model {run['model']!r} is not a local directory (needed for its tokenizer)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run["model"])
        kw = {"url": run["engine_url"]} if run["engine_url"] else {"model_path": run["model"]}
        return make_engine("sglang", tokenizer=tokenizer, **kw), tokenizer
    if run["model"] == "tiny":
        from leafe_fast.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer(run["tiny_style"])
        model = tiny_model(tokenizer, "llama" if run["tiny_style"] == "llama3" else "qwen2")
    else:
        if not Path(run["model"]).exists():
            raise FileNotFoundError(f"--model {run['model']!r} is not a local directory (or 'tiny')")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run["model"])
        model = AutoModelForCausalLM.from_pretrained(run["model"], dtype=dtype or "auto")
    return make_engine("hf", model=model, tokenizer=tokenizer, device=run["device"], dtype=dtype), tokenizer


def run(args: argparse.Namespace) -> int:
    from leafe_fast.envs.registry import list_tasks
    from leafe_fast.explore.loop import explore

    try:
        settings, config = resolve(args)
        tasks = list_tasks(settings["env"], settings["split"], settings["tasks"], seed=settings["task_seed"],
                           **settings["task_args"])
        engine, tokenizer = build_engine(settings)
    except (ValueError, KeyError, OSError, ImportError) as e:
        print(f"leafe-fast explore: {e}", file=sys.stderr)
        return 2
    try:
        summary = explore(tasks, settings["env"], engine, tokenizer, settings["out"], config)
    except KeyboardInterrupt:
        print(f"leafe-fast explore: interrupted; finished trees are in {settings['out']}, rerun to resume",
              file=sys.stderr)
        return 130
    except ValueError as e:  # e.g. a malformed line in an existing --out file (the error names it)
        print(f"leafe-fast explore: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"leafe-fast explore: {e}\nfinished trees are in {settings['out']}; rerun to resume", file=sys.stderr)
        return 1
    finally:
        engine.close()
    if not config.progress:
        print(summary.format())
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0
