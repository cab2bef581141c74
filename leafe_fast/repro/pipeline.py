"""The reproduction, stage by stage, each cached on disk (a rerun skips finished stages).

    out/
      random_walk.json                 the split's floor (no model)
      base/model/ + base/base.json     behaviour-cloned base policy (cached: arms rerun alone)
      gate.json                        continuation success with vs without experience
      arms/<arm>/seed<s>/              trees.jsonl, explore.json, model/, arm.json
      result.json                      everything, aggregated (also copied to benchmarks/results/)

Arms (all from the same base, same optimizer steps and learning rate, data from the recipes of
``leafe_fast.data.recipes``): ``base`` (no training), ``rs-sft`` (successes of ``explore --mode
independent`` with the env steps and tokens LEAFE spent per task), ``rehearsal-only`` and ``leafe``
(the same LEAFE trees, two recipes), ``no-summary`` (rollback without the experience message), and
optionally ``oracle`` (the solver-plan reflector: an ablation, never LEAFE).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from leafe_fast.outputs import write_json

ARMS = ("base", "rs-sft", "rehearsal-only", "leafe", "no-summary")
ABLATION_ARMS = ("oracle",)
# LEAFE with another documented option, run only when asked (--arms): every corrected step of a branch
# supervised (counterfactual_steps all) instead of the first one, on the leafe arm's trees
VARIANT_ARMS = ("leafe-all-steps",)
MAX_POSITIONS = 4096


@dataclass
class Preset:
    """Sizes and budgets of one run (``PRESETS``); every field is recorded in the result JSON."""

    name: str
    difficulty: str = "hard"
    # model (a Qwen2-style decoder, tiny byte-level BPE tokenizer)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 1024
    corpus_levels: int = 300  # levels whose texts train the tokenizer (train split, seed 7)
    max_new_tokens: int = 2  # one move letter + end of turn, in exploration and evaluation alike
    # behaviour cloning (measured on the 2-core CPU, 2026-11-29: with these settings the greedy action
    # accuracy left chance at ~900 steps and reached 0.59 at 1,500 of a 1,500-step schedule; with
    # clone_noise 0.15 and 4,096-token batches it was still at chance after 600 steps, 2.4M tokens)
    clone_levels: int = 3000
    clone_steps: int = 3000
    clone_lr: float = 3e-3
    clone_noise: float = 0.0
    experience_share: float = 0.35
    dense: bool = True
    token_budget: int = 2048
    # gate
    gate_levels: int = 100
    gate_continuations: int = 4
    gate_min_gain: float = 0.10
    # exploration (per arm and seed)
    explore_levels: int = 64
    max_branches: int = 4
    explore_max_steps: int = 200  # env steps per task, all branches together
    reflect_every: int = 3  # periodic reflection (the method's default; a stall is diagnosed after 8 steps)
    # fine-tuning (every arm the same)
    train_steps: int = 40
    train_lr: float = 3e-4
    # evaluation
    eval_levels: int = 200
    eval_episodes: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    chunk: int = 256
    threads: int = 2
    device: str = "cpu"


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", corpus_levels=20, vocab_size=512, hidden_size=32, layers=1, heads=2, kv_heads=1,
                   intermediate_size=64, clone_levels=12,
                   clone_steps=3, token_budget=2048, gate_levels=4, gate_continuations=2, explore_levels=3,
                   max_branches=1, explore_max_steps=60, train_steps=2, eval_levels=4, eval_episodes=2,
                   seeds=(0,), chunk=64, threads=1),
    "cpu": Preset("cpu"),
    "gpu": Preset("gpu", hidden_size=256, layers=6, heads=8, kv_heads=2, intermediate_size=1024,
                  clone_levels=20000, clone_steps=3000, token_budget=16384, gate_levels=400,
                  gate_continuations=8, explore_levels=512, train_steps=100, eval_levels=500,
                  eval_episodes=128, chunk=1024, threads=8, device="cuda"),
}


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def _cached(path: Path, make: Callable[[], Any], log: Callable[[str], None], what: str) -> Any:
    if path.exists():
        log(f"{what}: cached ({path})")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    data = make()
    data["seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(path, data)
    log(f"{what}: {data['seconds']:.0f} s")
    return data


class Repro:
    """One run of the benchmark in ``out`` with ``preset`` (see the module docstring)."""

    def __init__(self, preset: Preset, out: Path, *, log: Callable[[str], None] = print, progress: bool = False,
                 model_dir: Path | None = None, ignore_gate: bool = False):
        import torch

        from leafe_fast.data.chat import ChatFormat
        from leafe_fast.envs.sokoban import SokobanEnv, sokoban_tasks
        from leafe_fast.repro.rollout import MemoChat
        
        if model_dir is not None:
            # a user's model writes the full prompt's "<action>up</action>" (several tokens in any tokenizer)
            preset = replace(preset, max_new_tokens=max(preset.max_new_tokens, 32))
        self.p = preset
        self.out = Path(out)
        self.ignore_gate = ignore_gate
        self._check_settings(model_dir)
        self.log = log
        self.progress = progress
        torch.set_num_threads(max(1, preset.threads))
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.model_dir = Path(model_dir) if model_dir else None
        self.env_kwargs = {"prompt": "compact" if model_dir is None else "full", "end_on_deadlock": True}
        self.env = SokobanEnv(**self.env_kwargs)
        if self.model_dir is None:
            self.tok = self._tokenizer(sokoban_tasks)
        else:  # a user's instruction-tuned model: its tokenizer, the full prompt, the LLM reflector
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.chat = ChatFormat.from_tokenizer(self.tok)
        self.memo = MemoChat(self.chat)
        self.reflector = "grounded" if self.model_dir is None else "llm"
        d = preset.difficulty
        # disjoint level sets: cloning (train, seed 0), exploration (train, seed 1), gate (val), eval (test)
        self.clone_tasks = lambda: sokoban_tasks("train", preset.clone_levels, seed=0, difficulty=d)
        self.explore_tasks = sokoban_tasks("train", preset.explore_levels, seed=1, difficulty=d)
        self.gate_tasks = sokoban_tasks("val", preset.gate_levels, seed=0, difficulty=d)
        self.test_tasks = sokoban_tasks("test", preset.eval_levels, seed=0, difficulty=d)
        self.max_turns = self.test_tasks[0].spec["max_steps"] if self.test_tasks else 40
        self.timings: dict[str, float] = {}

    # Everything a cached stage depends on; seeds, arms and threads may change between reruns (each seed's
    # and arm's results are their own files), nothing else may.
    _RERUNNABLE = ("seeds", "arms", "threads")

    def _check_settings(self, model_dir: Path | None) -> None:
        """Refuse an ``out`` whose cached stages were made with other settings (they would be reported as
        this run's); a fresh ``out`` records them in ``settings.json``."""
        from leafe_fast.errors import UserError

        now = {k: v for k, v in preset_dict(self.p).items() if k not in self._RERUNNABLE}
        now = json.loads(json.dumps({**now, "model": str(model_dir) if model_dir else None}))
        path = self.out / "settings.json"
        if path.exists():
            before = json.loads(path.read_text())
            diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
            if diff:
                raise UserError(f"--out {self.out}", f"holds a run made with other settings ({', '.join(diff)})",
                                "pass another --out, or delete that folder to start over")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"--out {self.out}", "is not empty and records no settings",
                            "pass an empty or new --out")
        else:
            _write_json(path, now)

    def level_overlap(self) -> dict[str, int]:
        """Levels of the test (and gate) set that also appear, as the same picture, in another set."""
        pic = lambda tasks: {t.spec["level"] for t in tasks}  # noqa: E731
        test, gate = pic(self.test_tasks), pic(self.gate_tasks)
        clone, explore = pic(self.clone_tasks()), pic(self.explore_tasks)
        return {"test_in_clone": len(test & clone), "test_in_explore": len(test & explore),
                "test_in_gate": len(test & gate), "gate_in_clone": len(gate & clone),
                "gate_in_explore": len(gate & explore)}

    # ------------------------------------------------------------------------------ models
    def _tokenizer(self, sokoban_tasks):
        """The benchmark's BPE (``leafe_fast.repro.tokenizer``), trained once and kept in ``out``."""
        from leafe_fast.repro import tokenizer as bpe

        path = self.out / "tokenizer.json"
        if not path.exists():
            corpus_tasks = sokoban_tasks("train", self.p.corpus_levels, seed=7, difficulty=self.p.difficulty)
            bpe.save(bpe.train_tokenizer(bpe.sokoban_corpus(self.env, corpus_tasks), self.p.vocab_size), path)
        return bpe.load(path)

    def model_config(self):
        from leafe_fast.tiny import tiny_config

        p = self.p
        return tiny_config(self.tok, "qwen2", hidden_size=p.hidden_size, num_layers=p.layers, num_heads=p.heads,
                           num_kv_heads=p.kv_heads, intermediate_size=p.intermediate_size,
                           max_position_embeddings=MAX_POSITIONS)

    def stock_model(self, path: Path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").to(self.p.device).eval()

    def fast(self, path: Path):
        from leafe_fast.repro.fastlm import FastLM

        return FastLM.from_hf(self.stock_model(path)).to(self.p.device)

    # ------------------------------------------------------------------------------ stages
    def random_walk(self) -> dict[str, Any]:
        from leafe_fast.repro.rollout import random_walk

        return _cached(self.out / "random_walk.json",
                       lambda: random_walk(self.env, self.test_tasks, self.p.eval_episodes, 0, self.max_turns),
                       self.log, "random walk")

    @property
    def base_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.out / "base" / "model"

    def base(self) -> dict[str, Any]:
        if self.model_dir is not None:
            return {"external_model": str(self.model_dir), "parameters": None}
        path = self.out / "base" / "base.json"
        if path.exists():
            self.log(f"base policy: cached ({path.parent})")
            return json.loads(path.read_text())
        from leafe_fast.repro.train import train_base

        t0 = time.perf_counter()
        info = train_base(self)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(path, info)
        self.log(f"base policy: {info['parameters']:,} parameters, {info['seconds']:.0f} s, "
                 f"action accuracy {info['action_accuracy']:.3f}")
        return info

    def gate(self) -> dict[str, Any]:
        from leafe_fast.repro.gate import measure_gate

        def run() -> dict[str, Any]:
            g = measure_gate(self.fast(self.base_dir), self.memo, self.env, self.gate_tasks,
                             continuations=self.p.gate_continuations, seed=0, max_turns=self.max_turns,
                             chunk=self.p.chunk, max_new_tokens=self.p.max_new_tokens)
            g["min_gain"] = self.p.gate_min_gain
            g["passed"] = g["gain"] >= self.p.gate_min_gain
            return g

        g = _cached(self.out / "gate.json", run, self.log, "gate")
        self.log(f"gate: continuation success {g['success_without']:.3f} without -> {g['success_with']:.3f} with "
                 f"experience ({g['cases']} rollback cases), passed={g['passed']}")
        return g

    def arm(self, arm: str, seed: int) -> dict[str, Any]:
        from leafe_fast.repro.train import run_arm

        d = self.out / "arms" / arm / f"seed{seed}"
        path = d / "arm.json"
        if path.exists():
            self.log(f"arm {arm} seed {seed}: cached")
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        info = run_arm(self, arm, seed, d)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(path, info)
        ev = info["eval"]
        self.log(f"arm {arm} seed {seed}: pass@1 {ev['pass@k']['1']:.3f} pass@{ev['n']} "
                 f"{ev['pass@k'][str(ev['n'])]:.3f} ({info['seconds']:.0f} s)")
        return info

    def report_only(self) -> dict[str, Any]:
        """Aggregate the stages that finished (a run cut short), running nothing."""
        def load(path: Path) -> dict[str, Any]:
            return json.loads(path.read_text()) if path.exists() else {}

        arms: dict[str, list[dict[str, Any]]] = {a: [] for a in self.p.arms}
        for arm in self.p.arms:
            for seed in self.p.seeds:
                data = load(self.out / "arms" / arm / f"seed{seed}" / "arm.json")
                if data:
                    arms[arm].append(data)
        if not arms.get("base"):
            arms = {}
        from leafe_fast.repro.report import aggregate

        return aggregate(self, load(self.out / "random_walk.json"), load(self.out / "base" / "base.json"),
                         load(self.out / "gate.json"), arms, 0.0)

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        rw = self.random_walk()
        base = self.base()
        gate = self.gate()
        arms: dict[str, list[dict[str, Any]]] = {a: [] for a in self.p.arms}
        if gate.get("passed") or self.ignore_gate:
            for seed in self.p.seeds:  # seed-major: a cut-short run still has every arm of its first seeds
                for arm in self.p.arms:
                    arms[arm].append(self.arm(arm, seed))
        else:
            self.log("gate not passed: the arms are not run (a policy that does not act on its experience "
                     "cannot show LEAFE's effect); pass --ignore-gate to run them anyway")
        from leafe_fast.repro.report import aggregate

        result = aggregate(self, rw, base, gate, arms, time.perf_counter() - t0)
        _write_json(self.out / "result.json", result)
        return result


def environment_info() -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def preset_dict(p: Preset) -> dict[str, Any]:
    return asdict(p)


__all__ = ["ARMS", "ABLATION_ARMS", "VARIANT_ARMS", "PRESETS", "Preset", "Repro", "environment_info"]
