"""Shared helpers for the train/attention/FSDP tests: random LEAFE samples and tiny model configs."""

from __future__ import annotations

import numpy as np

from leafe_fast.data.columns import Sample, SampleColumns


def random_samples(n: int, vocab: int, lo: int = 4, hi: int = 40, seed: int = 0) -> SampleColumns:
    """Random multi-turn-shaped samples: about a quarter of tokens are targets, both groups present."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        L = int(rng.integers(lo, hi + 1))
        ids = rng.integers(0, vocab, size=L).astype(np.int32)
        mask = rng.random(L) < 0.3
        mask[0] = False
        if not mask.any():
            mask[-1] = True
        out.append(Sample(ids, mask, group=j % 2, weight=float(rng.uniform(0.5, 1.5)), tree_id=j // 3))
    return SampleColumns.from_samples(out)


def tiny(family: str = "qwen2", **kw):
    from leafe_fast.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer("qwen2" if family == "qwen2" else "llama3")
    return tok, tiny_config(tok, family, **kw)
