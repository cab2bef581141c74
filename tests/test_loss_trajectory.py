"""The refactor safety net: a stored loss trajectory (torchtitan style).

A tiny Qwen2 model (fixed config and seed) trains for a few optimizer steps on fixed LEAFE-shaped
samples (three trees with shared prefixes, both groups, two weights) on the CPU in fp32. Every step's
loss, per-group cross-entropy and gradient norm, and a checksum of the final weights, must match
``tests/assets/loss_trajectory.json`` to 2e-6 relative. A refactor that claims "same behaviour" proves
it here; a change that is meant to alter the numbers regenerates the file on purpose and says why in
its commit:

    .venv/bin/python tests/test_loss_trajectory.py --write

The run pins every setting whose default may move (flat layout, per-step normalisation, fp32, the
loss implementation), so the file records the trainer's arithmetic, not its defaults.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ASSET = Path(__file__).parent / "assets" / "loss_trajectory.json"
VOCAB = 256
STEPS = 6
RTOL = 2e-6


def fixed_samples():
    """Three trees: a shared prompt, then branches; rehearsal and counterfactual samples, weights 1 and 0.5."""
    from leafe_fast.data import Sample

    rng = np.random.default_rng(1234)
    out = []
    for tree in range(3):
        prompt = rng.integers(3, VOCAB, size=40 + 7 * tree)
        for branch in range(4):
            body = rng.integers(3, VOCAB, size=20 + 5 * branch)
            ids = np.concatenate([prompt, body]).astype(np.int32)
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(prompt) + 2 :] = True
            group = branch % 2
            out.append(Sample(ids, mask, group=group, weight=1.0 if group == 0 else 0.5, tree_id=tree))
    return out


def tiny_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model


def train_config():
    """Every setting that decides the numbers, pinned."""
    from leafe_fast.train.trainer import TrainConfig

    return TrainConfig(
        max_steps=STEPS, token_budget=256, grad_accum=2, lr=1e-3, warmup_steps=0, weight_decay=0.01,
        max_grad_norm=1.0, lambdas=(1.0, 1.0), norm_mode="count", seed=0, precision="fp32",
        peak_flops=None, progress=False, norm_scope="step", layout="flat",
    )


def run_trajectory() -> dict:
    from leafe_fast.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine
    try:
        model = tiny_model()
        trainer = Trainer(model, fixed_samples(), train_config())
        trainer.train()
        steps = [
            {k: r[k] for k in ("loss", "grad_norm", "ce_rehearsal", "ce_counterfactual", "tokens", "target_tokens")}
            for r in trainer.history
        ]
        checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    finally:
        torch.set_num_threads(threads)
    return {"steps": steps, "weight_abs_sum": checksum}


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=1e-9)


def test_loss_trajectory_matches_the_stored_one():
    stored = json.loads(ASSET.read_text())
    got = run_trajectory()
    assert len(got["steps"]) == len(stored["steps"]) == STEPS
    for i, (g, s) in enumerate(zip(got["steps"], stored["steps"])):
        bad = {k: (g[k], s[k]) for k in s if not _close(g[k], s[k])}
        assert not bad, f"step {i + 1}: (got, stored) differ: {bad}"
    assert _close(got["weight_abs_sum"], stored["weight_abs_sum"]), (got["weight_abs_sum"], stored["weight_abs_sum"])


def test_loss_trajectory_learns():
    """The stored run is not a flat line: training on it lowers the loss (guards a degenerate asset)."""
    stored = json.loads(ASSET.read_text())
    losses = [s["loss"] for s in stored["steps"]]
    assert losses[-1] < losses[0]
    assert all(s["target_tokens"] > 0 for s in stored["steps"])


if __name__ == "__main__":
    if "--write" in sys.argv:
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(json.dumps(run_trajectory(), indent=1) + "\n")
        print(f"wrote {ASSET}")
    else:
        print(json.dumps(run_trajectory(), indent=1))
