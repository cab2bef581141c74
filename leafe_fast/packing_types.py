"""Packing data types and the engine protocol, shared by the C++ path and the Python reference.

Why a separate module: ``leafe_fast.packing`` (the production driver) and ``leafe_fast.packing_reference``
(the plain Python ground truth) both produce these types; keeping them here means the reference never
imports the module it is meant to check. See ``leafe_fast.packing`` for the packing rules and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from leafe_fast.data.columns import SampleColumns

Layout = Literal["flat", "trie"]
_ARRAYS = ("input_ids", "position_ids", "cu_seqlens", "rows", "targets", "weights", "group", "sample_ids")


@dataclass
class MicroBatch:
    """One packed micro-batch; the arrays may be views into buffers shared with other micro-batches.

    ``layout="flat"``: samples back to back, ``cu_seqlens`` at sample boundaries, ``subtree_end`` None
    (derived on demand by :meth:`attention_ends`). ``layout="trie"``: the tokens of each (chunk of a) tree
    once, in depth-first pre-order; ``cu_seqlens`` at chunk boundaries, ``position_ids`` = depth, and
    ``subtree_end[i]`` the end of token i's subtree: token j attends to token i iff ``i <= j < subtree_end[i]``.
    """

    input_ids: np.ndarray  # int32 [T]
    position_ids: np.ndarray  # int32 [T]
    cu_seqlens: np.ndarray  # int32 [n+1] (flat: samples; trie: tree chunks)
    max_seqlen: int
    rows: np.ndarray  # int64 [M]
    targets: np.ndarray  # int64 [M]
    weights: np.ndarray  # float32 [M]
    group: np.ndarray  # int8 [M]
    sample_ids: np.ndarray  # int64 [n samples]
    rank: int
    num_tokens: int
    num_targets: int
    cost: float = 0.0  # tokens + alpha * sum(len^2)
    subtree_end: np.ndarray | None = None  # int32 [T], trie layout only
    layout: Layout = "flat"
    flat_tokens: int = -1  # tokens the flat layout would hold for these samples (-1: num_tokens)

    def attention_ends(self) -> np.ndarray:
        """``subtree_end`` of the one attention contract: for a flat batch, the end of each token's sample."""
        if self.subtree_end is not None:
            return self.subtree_end
        cu = self.cu_seqlens.astype(np.int64)
        return np.repeat(cu[1:], np.diff(cu)).astype(np.int32)

    def to_torch(self, device: Any = None) -> dict[str, Any]:
        """Tensors sharing memory with the numpy arrays (torch.from_numpy); copied only to move to ``device``.

        A trie batch also carries ``subtree_end``; a flat one does not (its attention keeps the varlen path).
        """
        import torch

        names = _ARRAYS + (("subtree_end",) if self.subtree_end is not None else ())
        out: dict[str, Any] = {name: torch.from_numpy(getattr(self, name)) for name in names}
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        out["max_seqlen"] = self.max_seqlen
        return out


@dataclass
class PackStats:
    capacity: int  # num_micro_batches * budget
    real_tokens: int  # tokens computed (trie tokens for the trie layout)
    padding: int  # capacity - real_tokens (unused budget; varlen attention does not compute it)
    token_efficiency: float  # real_tokens / capacity
    num_micro_batches: int
    micro_batches_per_rank: int
    rank_costs: list[float]
    rank_imbalance: float  # max/mean - 1 of rank_costs
    sync_imbalance: float  # sum over steps of the slowest rank / sum of the mean rank - 1
    num_targets: int
    truncated: list[tuple[int, int, int]] = field(default_factory=list)  # (sample_id, tokens, targets) removed
    skipped: list[int] = field(default_factory=list)  # sample ids with no target: not packed
    split_trees: list[int] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    layout: Layout = "flat"
    flat_tokens: int = 0  # tokens of the kept windows back to back (what the flat layout computes)
    trie_tokens: int = 0  # tokens the trie layout computes (== flat_tokens for the flat layout)
    compression: float = 1.0  # flat_tokens / trie_tokens
    mixed_trees: list[int] = field(default_factory=list)  # tree ids whose samples start with different prompts


@dataclass
class Packing:
    micro_batches: list[MicroBatch]
    stats: PackStats
    ranks: int = 1

    def for_rank(self, rank: int) -> list[MicroBatch]:
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} outside [0, {self.ranks})")
        return [mb for mb in self.micro_batches if mb.rank == rank]

    def steps(self, micro_per_step: int, rank: int | None = None) -> list[Any]:
        """Group micro-batches into optimizer steps of ``micro_per_step`` per rank.

        With ``rank``: ``steps[s]`` is that rank's list of micro-batches for step s. Without:
        ``steps[s][r]`` is rank r's list. The last step may be shorter.
        """
        if micro_per_step < 1:
            raise ValueError("micro_per_step must be >= 1")
        if rank is not None:
            own = self.for_rank(rank)
            return [own[i : i + micro_per_step] for i in range(0, len(own), micro_per_step)]
        per_rank = [self.steps(micro_per_step, r) for r in range(self.ranks)]
        n = max((len(p) for p in per_rank), default=0)
        return [[p[s] if s < len(p) else [] for p in per_rank] for s in range(n)]


class PackEngine(Protocol):
    """What the packing driver asks of an implementation (C++ ``_Native`` or ``ReferenceEngine``).

    All arrays are numpy; ``cols`` is validated ``SampleColumns``; windows come from the truncation policy.
    """

    def count(self, cols: SampleColumns, win_start: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept, removed) target counts per sample inside / outside its kept window."""

    def plan(self, ids: np.ndarray, lengths: np.ndarray, tree_ids: np.ndarray, o: dict[str, Any]) -> dict[str, Any]:
        """Placement: dict(order, mb_offsets, mb_rank, mb_cost, split_trees, micro_batches_per_rank)."""

    def build(self, cols: SampleColumns, win_abs: np.ndarray, win_len: np.ndarray, kept: np.ndarray,
              plan: dict[str, Any]) -> list[MicroBatch]:
        """Flat micro-batches for a plan."""

    def trie_chunks(self, cols: SampleColumns, win_abs: np.ndarray, win_len: np.ndarray, eligible: np.ndarray,
                    budget: int) -> dict[str, Any]:
        """Trees cut into chunks of at most ``budget`` trie tokens: dict(members, lcp, chunk_offsets,
        chunk_tokens, split_trees, mixed_trees). ``members`` lists each chunk's samples in lexicographic
        token order; ``lcp[k]`` is the common prefix of member k with member k-1 of the same chunk (0 first)."""

    def trie_build(self, cols: SampleColumns, win_abs: np.ndarray, win_len: np.ndarray, kept: np.ndarray,
                   chunks: dict[str, Any], plan: dict[str, Any]) -> list[MicroBatch]:
        """Trie micro-batches; ``plan["order"]`` lists chunk ids."""


__all__ = ["Layout", "MicroBatch", "PackStats", "Packing", "PackEngine"]
