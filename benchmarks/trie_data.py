"""LEAFE-shaped exploration trees for the trie-layout benchmarks (bench_pack --trie, bench_train --trie).

A tree: a prompt, then a trajectory of ``steps`` steps (an action, supervised, and an observation,
context) -> one rehearsal sample (group 0, the whole trajectory). Then ``rollbacks`` branch points t; at
each a counterfactual sample (group 1) keeps prompt + steps[:t] as context and continues with new steps
to success (its new actions are the targets). Every parameter is returned with the samples so the result
files can state them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leafe_fast.data.columns import Sample


@dataclass
class TreeShape:
    steps: tuple[int, int] = (20, 40)  # steps of the rehearsal trajectory (uniform, inclusive)
    step_tokens: tuple[int, int] = (150, 400)  # tokens per step (action + observation)
    action_frac: float = 0.3  # share of a step's tokens that are the action (targets)
    prompt_tokens: tuple[int, int] = (300, 800)
    rollbacks: tuple[int, int] = (1, 6)  # counterfactual branches per tree
    continue_steps: tuple[int, int] = (3, 10)  # steps of a counterfactual continuation to success
    vocab: int = 150_000

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _step(rng: np.random.Generator, shape: TreeShape) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(shape.step_tokens[0], shape.step_tokens[1] + 1))
    act = max(1, int(n * shape.action_frac))
    return rng.integers(0, shape.vocab, n).astype(np.int32), np.r_[np.ones(act, bool), np.zeros(n - act, bool)]


def leafe_trees(num_trees: int, shape: TreeShape | None = None, seed: int = 0, first_tree: int = 0) -> list[Sample]:
    """Samples of ``num_trees`` synthetic LEAFE trees (tree ids first_tree .. first_tree + num_trees - 1)."""
    shape = shape or TreeShape()
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for t in range(first_tree, first_tree + num_trees):
        prompt = rng.integers(0, shape.vocab, int(rng.integers(*shape.prompt_tokens) + 1)).astype(np.int32)
        steps = [_step(rng, shape) for _ in range(int(rng.integers(shape.steps[0], shape.steps[1] + 1)))]
        ids = np.concatenate([prompt] + [s[0] for s in steps])
        mask = np.concatenate([np.zeros(len(prompt), bool)] + [s[1] for s in steps])
        out.append(Sample(ids, mask, 0, 1.0, t, 0))
        for _ in range(int(rng.integers(shape.rollbacks[0], shape.rollbacks[1] + 1))):
            at = int(rng.integers(1, len(steps)))
            new = [_step(rng, shape) for _ in range(int(rng.integers(shape.continue_steps[0],
                                                                     shape.continue_steps[1] + 1)))]
            cf_ids = np.concatenate([prompt] + [s[0] for s in steps[:at]] + [s[0] for s in new])
            cf_mask = np.concatenate([np.zeros(len(prompt) + sum(len(s[0]) for s in steps[:at]), bool)]
                                     + [s[1] for s in new])
            out.append(Sample(cf_ids, cf_mask, 1, 1.0, t, 0))
    return out
