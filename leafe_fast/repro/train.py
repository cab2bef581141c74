"""Training stages of the reproduction: the cloned base policy and the arms fine-tuned from it.

Both use ``leafe_fast.train.Trainer`` (packed varlen micro-batches, the LEAFE loss). On the CPU the
attention backend is chosen by measurement (two timed steps of each candidate on the real data), not
by a fixed token threshold: issue 12 measured 464 tokens/s for one masked SDPA against 1,830 for the
per-sample loop at a 4096-token budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ARM_EXPLORE = {
    # arm -> (explore mode, reflector, summary, recipe); rs-sft takes its budgets from the LEAFE trees
    "leafe": ("leafe", "grounded", True, "leafe"),
    "rehearsal-only": ("leafe", "grounded", True, "rehearsal-only"),
    "rs-sft": ("independent", None, True, "rejection-sampling"),
    "no-summary": ("leafe", "grounded", False, "rollback-no-summary"),
    "oracle": ("leafe", "oracle", True, "leafe"),
    "leafe-all-steps": ("leafe", "grounded", True, "leafe"),
}
# arms trained on the ``leafe`` arm's trees (another recipe or option), not on an exploration of their own
SHARES_LEAFE_TREES = ("rehearsal-only", "leafe-all-steps")
# counterfactual_steps per arm (recipes' default: 1, the first corrected action after each rollback point)
COUNTERFACTUAL_STEPS = {"leafe-all-steps": "all"}


def _train_config(r: Any, steps: int, lr: float, seed: int, out: Path | None, warmup: int):
    from leafe_fast.train import TrainConfig

    return TrainConfig(output_dir=str(out) if out else None, max_steps=steps, token_budget=r.p.token_budget,
                       lr=lr, warmup_steps=warmup, max_grad_norm=1.0, seed=seed, log_every=1, peak_flops=None,
                       progress=r.progress)


def pick_attention(r: Any, samples: list) -> tuple[str, dict[str, float]]:
    """The faster varlen backend on this device for these samples (two timed steps each)."""
    from leafe_fast.train import Trainer, load_model
    from leafe_fast.train.attention import available_backends

    if r.p.device != "cpu":
        return "auto", {}
    timing: dict[str, float] = {}
    for name in [b for b in available_backends("cpu") if b in ("sdpa_mask", "loop")]:
        model = load_model(r.model_config(), dtype="float32", device="cpu", attn=name, liger=False, seed=0)
        trainer = Trainer(model, samples, _train_config(r, 3, 1e-4, 0, None, 0))
        trainer.train(steps=1)  # warm-up step, not timed
        t0 = time.perf_counter()
        s = trainer.train(steps=2)
        timing[name] = round(s.tokens / max(time.perf_counter() - t0, 1e-9), 1)
    best = max(timing, key=timing.get) if timing else "auto"
    return best, timing


def train_base(r: Any) -> dict[str, Any]:
    """Behaviour cloning (``leafe_fast.repro.bc``); the model goes to ``out/base/model``."""
    import torch

    from leafe_fast.repro.bc import CloneConfig, action_accuracy, build_clone_samples
    from leafe_fast.train import Trainer, load_model

    p = r.p
    t0 = time.perf_counter()
    cfg = CloneConfig(noise=p.clone_noise, experience_share=p.experience_share, dense=p.dense)
    samples, stats = build_clone_samples(r.env, r.chat, r.clone_tasks(), cfg, seed=0)
    held_out, _ = build_clone_samples(r.env, r.chat, r.gate_tasks[:64], CloneConfig(
        noise=p.clone_noise, experience_share=0.0, dense=False), seed=1)
    t_data = time.perf_counter() - t0
    backend, timing = pick_attention(r, samples) if p.clone_steps >= 50 else ("auto", {})
    model = load_model(r.model_config(), dtype="float32", device=p.device, attn=backend, liger=False, seed=0)
    trainer = Trainer(model, samples, _train_config(r, p.clone_steps, p.clone_lr, 0, r.out / "base" / "train",
                                                    warmup=min(30, p.clone_steps // 10)), tokenizer=r.tok)
    summary = trainer.train()
    out = r.out / "base" / "model"
    trainer.export(out)
    stock = r.stock_model(out)
    with torch.no_grad():
        acc = action_accuracy(stock, held_out, r.chat)
    losses = summary.losses
    return {
        "parameters": sum(x.numel() for x in model.parameters()),
        "clone_data": stats, "clone_config": vars(cfg), "data_seconds": round(t_data, 1),
        "attention_backend": backend, "attention_tokens_per_s": timing,
        "steps": summary.steps, "tokens": summary.tokens, "tokens_per_s": round(summary.tokens_per_s, 1),
        "train_seconds": round(summary.seconds, 1),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 40)]],
        "action_accuracy": acc, "action_accuracy_on": f"{len(held_out)} cloned val-level trajectories (greedy)",
    }


def _explore(r: Any, arm: str, seed: int, d: Path) -> tuple[Path, dict[str, Any]]:
    import json

    from leafe_fast.engines.hf import HFEngine
    from leafe_fast.explore import ExploreConfig, explore

    mode, reflector, summary, _ = ARM_EXPLORE[arm]
    p = r.p
    trees = d / "trees.jsonl"
    done = d / "explore.json"
    if done.exists():
        return trees, json.loads(done.read_text())
    kw: dict[str, Any] = {}
    if mode == "independent":
        leafe_trees, _ = _explore(r, "leafe", seed, r.out / "arms" / "leafe" / f"seed{seed}")
        kw["budget_from"] = str(leafe_trees)
        # only the per-task budget stops it (not a count of attempts: attempts that end early at a deadlock
        # would otherwise leave part of LEAFE's budget unspent)
        kw["rollouts"] = p.explore_max_steps
    else:
        kw["reflector"] = r.reflector if reflector == "grounded" else reflector
        kw["summary"] = summary
    cfg = ExploreConfig(mode=mode, max_branches=p.max_branches, max_steps=p.explore_max_steps,
                        max_depth=r.max_turns, reflect_every=p.reflect_every, temperature=1.0, seed=seed,
                        concurrency=max(1, len(r.explore_tasks)), progress=r.progress, max_new_tokens=p.max_new_tokens,
                        max_context_tokens=4096, env_kwargs=dict(r.env_kwargs), **kw)
    engine = HFEngine(r.stock_model(r.base_dir), r.tok, max_batch_size=64, seed=seed,
                      max_cached_tokens=max(1, len(r.explore_tasks)) * 4096)
    t0 = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    s = explore(r.explore_tasks, "sokoban", engine, r.chat, trees, cfg)
    engine.close()
    info = {"config": {k: v for k, v in vars(cfg).items()}, "summary": s.to_dict() if hasattr(s, "to_dict") else str(s),
            "spent": spent(trees), "seconds": round(time.perf_counter() - t0, 1)}
    from leafe_fast.repro.pipeline import _write_json

    _write_json(done, info)
    return trees, info


def spent(trees: Path) -> dict[str, int]:
    """What exploration spent, from the whole trees file (a resumed run's summary counts only its own part)."""
    from leafe_fast.data.schema import read_trees

    out = {"trees": 0, "env_steps": 0, "generated_tokens": 0, "successes": 0}
    for tree in read_trees(trees):
        out["trees"] += 1
        out["env_steps"] += int(tree.stats.get("steps", 0))
        out["generated_tokens"] += int(tree.stats.get("generated_tokens", 0))
        out["successes"] += int(bool(tree.success))
    return out


def run_arm(r: Any, arm: str, seed: int, d: Path) -> dict[str, Any]:
    """Explore, build the arm's samples, fine-tune from the base, evaluate (``base``: evaluate only)."""
    from leafe_fast.data.recipes import BuildConfig, build_recipe
    from leafe_fast.repro.rollout import evaluate_policy
    from leafe_fast.train import Trainer, load_model

    p = r.p
    base_dir = r.base_dir
    info: dict[str, Any] = {"arm": arm, "seed": seed, "ablation": arm in ("oracle",)}
    model_dir = base_dir
    if arm != "base":
        if arm in SHARES_LEAFE_TREES:
            trees, xinfo = _explore(r, "leafe", seed, r.out / "arms" / "leafe" / f"seed{seed}")
            xinfo = {**xinfo, "shared_with": "leafe"}
        else:
            trees, xinfo = _explore(r, arm, seed, d)
        info["explore"] = xinfo
        recipe = ARM_EXPLORE[arm][3]
        samples, stats = build_recipe(trees, BuildConfig(recipe=recipe, max_len=p.token_budget, overflow="drop",
                                                         counterfactual_steps=COUNTERFACTUAL_STEPS.get(arm, "1"),
                                                         allow_empty=True))
        info["samples"] = stats.as_dict()
        if samples:
            base_info = (r.out / "base" / "base.json")
            backend = "auto"
            if base_info.exists():
                import json

                backend = json.loads(base_info.read_text()).get("attention_backend", "auto")
            model = load_model(base_dir, dtype="float32", device=p.device, attn=backend, liger=False, seed=seed)
            trainer = Trainer(model, samples, _train_config(r, p.train_steps, p.train_lr, seed, None,
                                                            warmup=min(5, p.train_steps // 5)), tokenizer=r.tok)
            s = trainer.train()
            model_dir = d / "model"
            trainer.export(model_dir)
            sample_tokens = sum(len(x) for x in samples)
            info["train"] = {"steps": s.steps, "lr": p.train_lr, "tokens": s.tokens, "target_tokens": s.target_tokens,
                             "sample_tokens": sample_tokens, "epochs": round(s.tokens / max(1, sample_tokens), 2),
                             "loss_first": s.losses[0] if s.losses else None, "loss_last": s.final_loss,
                             "group_losses": s.group_losses, "seconds": round(s.seconds, 1)}
        else:
            info["train"] = {"steps": 0, "skipped": "no samples: the arm's exploration found no success"}
    t0 = time.perf_counter()
    info["eval"] = evaluate_policy(r.fast(model_dir), r.memo, r.env, r.test_tasks, r.p.eval_episodes, seed=seed,
                                   max_turns=r.max_turns, chunk=p.chunk, max_new_tokens=p.max_new_tokens)
    info["eval"]["seconds"] = round(time.perf_counter() - t0, 1)
    return info
