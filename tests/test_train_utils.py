"""Shared helpers for the train/attention/FSDP tests: random LEAFE samples, tiny models, and a stand-in
packer used only while ``leafe_fast.packing`` is not importable (it follows the packing contract)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import torch

from leafe_fast.data.sample import Sample, SampleColumns


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


# --------------------------------------------------------------------------------- stand-in packer
@dataclass
class _MB:
    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    rows: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    group: np.ndarray
    sample_ids: np.ndarray
    rank: int = 0

    def to_torch(self, device):
        t = lambda x, dt: torch.as_tensor(np.asarray(x)).to(device=device, dtype=dt)  # noqa: E731
        return types.SimpleNamespace(
            input_ids=t(self.input_ids, torch.int32), position_ids=t(self.position_ids, torch.int32),
            cu_seqlens=t(self.cu_seqlens, torch.int32), max_seqlen=int(self.max_seqlen),
            rows=t(self.rows, torch.int64), targets=t(self.targets, torch.int64),
            weights=t(self.weights, torch.float32), group=t(self.group, torch.int8),
            sample_ids=t(self.sample_ids, torch.int64), rank=self.rank,
        )


def _make_mb(samples, ids, rank=0) -> _MB:
    inp, pos, cu, rows, tg, w, g = [], [], [0], [], [], [], []
    for j in ids:
        s = samples[j]
        off = cu[-1]
        inp.append(s.input_ids)
        pos.append(np.arange(len(s)))
        idx = np.nonzero(s.target_mask)[0]
        rows.append(idx - 1 + off)
        tg.append(s.input_ids[idx])
        w.append(np.full(len(idx), s.weight, np.float32))
        g.append(np.full(len(idx), s.group, np.int8))
        cu.append(off + len(s))
    cat = np.concatenate
    return _MB(cat(inp).astype(np.int32), cat(pos).astype(np.int32), np.array(cu, np.int32),
               int(max(len(samples[j]) for j in ids)), cat(rows).astype(np.int64), cat(tg).astype(np.int64),
               cat(w), cat(g), np.array(ids, np.int64), rank)


class _Packing:
    def __init__(self, mbs, ranks):
        self.micro_batches = mbs
        self.stats = {}
        self.ranks = ranks

    def for_rank(self, r):
        return [m for m in self.micro_batches if m.rank == r]


def _standin_pack(samples, budget, *, strategy="bfd", ranks=1, micro_batches_per_rank=None, alpha=0.0, seed=0,
                  keep_trees_together=False, truncation="error"):
    if isinstance(samples, SampleColumns):
        samples = samples.to_samples()
    order = sorted(range(len(samples)), key=lambda j: (-len(samples[j]), j))
    bins: list[list[int]] = []
    free: list[int] = []
    for j in order:
        L = len(samples[j])
        if L > budget:
            raise ValueError(f"sample {j} has {L} tokens > budget {budget}")
        best = min((k for k in range(len(bins)) if free[k] >= L), key=lambda k: free[k], default=None)
        if best is None:
            bins.append([j])
            free.append(budget - L)
        else:
            bins[best].append(j)
            free[best] -= L
    while len(bins) % ranks:  # equal counts per rank: split the largest bin
        k = max(range(len(bins)), key=lambda i: len(bins[i]))
        if len(bins[k]) < 2:
            raise ValueError("stand-in packer: cannot balance")
        bins.append(bins[k][len(bins[k]) // 2:])
        bins[k] = bins[k][: len(bins[k]) // 2]
    return _Packing([_make_mb(samples, b, i % ranks) for i, b in enumerate(bins)], ranks)


def ensure_packing() -> None:
    """Install the stand-in as ``leafe_fast.packing`` only if the real module cannot be imported."""
    try:
        import leafe_fast.packing  # noqa: F401
    except ImportError:
        mod = types.ModuleType("leafe_fast.packing")
        mod.pack = _standin_pack
        sys.modules["leafe_fast.packing"] = mod


def tiny(family: str = "qwen2", **kw):
    from leafe_fast.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer("qwen2" if family == "qwen2" else "llama3")
    return tok, tiny_config(tok, family, **kw)
