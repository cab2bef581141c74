"""Pack training samples into variable-length micro-batches for the GPU trainer.

Why: LEAFE samples are multi-turn trajectories from a few hundred to tens of thousands of tokens.
Padding them to a common length wastes most of the compute, so they are concatenated into flat
micro-batches of at most ``budget`` tokens and attention is kept inside each sample with ``cu_seqlens``
(flash-attn varlen style). The C++ half (``leafe_fast._C``: csrc/pack_plan.cpp plans, csrc/pack_build.cpp
assembles, GIL released, numpy in and out without copies) does the work; this module validates inputs,
owns the API; ``pack_reference`` runs the plain Python implementation of the same rules
(leafe_fast/packing_reference.py) that the tests compare against batch for batch.

Contract (one micro-batch, ``T`` tokens, ``n`` samples, ``M`` targets)::

    input_ids    int32 [T]    the samples' tokens, back to back
    position_ids int32 [T]    0, 1, ... restarting at every sample
    cu_seqlens   int32 [n+1]  sample boundaries in T;  max_seqlen: the longest sample
    rows         int64 [M]    index into T of the hidden state that predicts each target
    targets      int64 [M]    the target token ids;  weights float32 [M];  group int8 [M]
    sample_ids   int64 [n]    which input samples, in order

``target_mask[i]`` (see ``leafe_fast.data.columns``) marks token ``i`` as a target predicted from position
``i - 1`` of the SAME sample: ``rows = start + i - 1``, ``targets = input_ids[start + i]``. The shift never
crosses a sample boundary. Targets keep their order inside a sample; samples keep the micro-batch order.

Layouts (``layout=``):
- ``"flat"`` (the default of ``pack``): the contract above.
- ``"trie"``: the samples of one tree (same ``tree_id >= 0``; a negative id is a tree of its own) are merged
  into a token trie, each shared prefix once, emitted in depth-first pre-order (children by token value).
  Then ``position_ids`` = depth, ``subtree_end`` int32 [T] (token j attends to token i iff
  ``i <= j < subtree_end[i]``), ``cu_seqlens`` bounds the trees (chunks), ``sample_ids`` lists their
  samples, and every target of every sample is a loss row on the trie node of its predictor: a token
  supervised by two samples gives two rows, each with its sample's group and weight. Rows: samples by id
  within a chunk, positions ascending. Because attention is causal and a token sees exactly its ancestors,
  losses and gradients equal the flat layout's (tests/test_trie_training.py). The budget counts trie
  tokens; a tree whose trie exceeds it is cut into chunks of consecutive samples in lexicographic order (a
  cut at a branch point: the next chunk repeats the shared prefix) and listed in ``stats.split_trees``; a
  single sample longer than the budget follows ``truncation`` as in the flat layout. Samples of one tree
  that share no first token become separate roots; a tree whose samples share less than half of the
  context before their earliest target (different prompts: likely different tasks under one id) is listed
  in ``stats.mixed_trees`` and still packed exactly. ``keep_trees_together`` is implied.
  Stats: ``flat_tokens``, ``trie_tokens`` (= ``real_tokens``) and ``compression``.
- ``"auto"``: trie when some sample carries a tree id, else flat.
The flat layout is the special case ``subtree_end[i]`` = end of i's sample (``MicroBatch.attention_ends``).

Strategies:
- ``"bfd"`` best-fit decreasing by tokens: the fewest micro-batches; with ``ranks > 1`` micro-batches are
  dealt round-robin (counts per rank may differ by one; use "balanced" for equal counts).
- ``"balanced"``: ranks x K micro-batches (equal counts per rank). Cost of a sample is
  ``len + alpha * len**2`` (linear layers plus attention, in token units; see ``attention_alpha``).
  Items go, dearest first, to the cheapest micro-batch with room (LPT); K starts at the token lower bound
  and grows while some sample fits nowhere. Micro-batches are then sorted by cost and dealt in slots of
  ``ranks`` similar ones, so every synchronous step and every rank's total are balanced.

Documented behaviour at the edges:
- samples longer than ``budget``: ``truncation="error"`` raises, naming them; ``"left"`` keeps the last
  ``budget`` tokens (the final actions), ``"right"`` the first. Every truncation is listed in
  ``stats.truncated`` as ``(sample_id, removed_tokens, removed_targets)``; a target whose predictor was
  cut away counts as removed.
- samples with no target left (zero-length ones included) teach nothing and are not packed; their ids are
  listed in ``stats.skipped``. Input with no sample at all, or no target at all, raises ``ValueError``.
- ``keep_trees_together``: samples sharing a ``tree_id >= 0`` form one item and land in one micro-batch,
  in input order. A tree longer than ``budget`` is split into the fewest budget-sized chunks that best fit
  finds (its longest samples first); the chunks are packed as separate items and the tree id is listed in
  ``stats.split_trees``.
- when there are fewer items than ``ranks`` x K, "balanced" gives some ranks empty micro-batches
  (``num_tokens == 0``) so that every rank still takes the same number of steps.
- output memory: the C++ build writes into mapped buffers (transparent huge pages). When a packing is
  dropped its buffers are kept (``MADV_FREE``: the kernel may still reclaim them) for the next packing,
  which then skips the kernel's zeroing of GBs of fresh pages; at most a quarter of RAM (16 GiB cap,
  ``LEAFE_PACK_POOL_BYTES`` overrides). ``release_buffers()`` unmaps them at once.
- ``shuffle=True`` permutes the order of micro-batches (of slots for "balanced") with ``seed``:
  deterministic, and identical in C++ and Python (splitmix64 + Fisher-Yates).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from leafe_fast.data.columns import Sample, SampleColumns
from leafe_fast.errors import UserError
from leafe_fast.labels import target_mask_from_labels
from leafe_fast.packing_types import Layout, MicroBatch, PackEngine, Packing, PackStats

Strategy = Literal["bfd", "balanced"]
Truncation = Literal["error", "left", "right"]
MAX_BUDGET = 1 << 22  # the C++ free-space index and length sort are sized by the budget (4M tokens)
DEFAULT_ALPHA = 2e-5  # ~ d_model * n_layers / n_params of a 7B model; see attention_alpha


def attention_alpha(hidden_size: int, num_layers: int, num_params: float) -> float:
    """Cost coefficient for ``len + alpha * len**2``: attention FLOPs per token pair over linear FLOPs per token.

    A forward pass costs about ``2 * num_params`` FLOPs per token in the linear layers and
    ``2 * hidden_size * num_layers`` per (query, key) pair in causal attention (QK^T and AV, half the
    square), so ``alpha = hidden_size * num_layers / num_params``.
    """
    return float(hidden_size) * float(num_layers) / float(num_params)


def release_buffers() -> int:
    """Unmap the output buffers that dropped packings left for reuse; returns the bytes given back.

    Why: reusing them makes the next ``pack`` skip page faults and zeroing (half its time on a 5 GB output),
    but a process that packs once and moves on may want the memory back now, not under pressure.
    """
    from leafe_fast import _C

    return int(_C.pack_release_buffers())


def target_norms(micro_batches: Sequence[MicroBatch], num_groups: int = 2, by_weight: bool = False) -> np.ndarray:
    """Per-group target count (or weight sum) over micro-batches: the ``norm_g`` of the loss for one step."""
    out = np.zeros(num_groups, dtype=np.float64)
    for mb in micro_batches:
        if len(mb.group) and (int(mb.group.max()) >= num_groups or int(mb.group.min()) < 0):
            raise UserError("target_norms", f"a micro-batch has group ids in [{int(mb.group.min())}, "
                            f"{int(mb.group.max())}], outside [0, {num_groups})",
                            "pass num_groups = the number of loss groups (len(lambdas))")
        out += np.bincount(mb.group, weights=mb.weights if by_weight else None, minlength=num_groups)
    return out


def columns_from_labels(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    group: int | Sequence[int] = 0,
    weight: float | Sequence[float] = 1.0,
    tree_id: int | Sequence[int] = -1,
) -> SampleColumns:
    """Samples from the Hugging Face labels form: ``labels[i] == input_ids[i]`` marks a target, -100 context.

    Labels are aligned with the inputs (the model shifts them), so ``labels[0]`` has no predictor and is
    ignored, exactly as Hugging Face models ignore it. Any label other than -100 or the token itself raises.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"columns_from_labels: {len(input_ids)} input_ids but {len(labels)} labels")
    n = len(input_ids)
    def per_sample(value: Any, name: str) -> list:
        values = [value] * n if np.isscalar(value) else list(value)
        if len(values) != n:
            raise ValueError(f"columns_from_labels: {len(values)} values of {name} for {n} samples")
        return values

    groups, weights, trees = per_sample(group, "group"), per_sample(weight, "weight"), per_sample(tree_id, "tree_id")
    samples = []
    for j, (ids, lab) in enumerate(zip(input_ids, labels)):
        ids = np.asarray(ids, dtype=np.int64)
        mask = target_mask_from_labels(ids, lab, f"columns_from_labels: sample {j}")
        samples.append(Sample(ids.astype(np.int32), mask, int(groups[j]), float(weights[j]), int(trees[j])))
    return SampleColumns.from_samples(samples)


# ----------------------------------------------------------------------------------------------- input


def _as_columns(samples: Any) -> SampleColumns:
    if isinstance(samples, SampleColumns):
        c = samples
    elif isinstance(samples, Mapping):
        if "input_ids" not in samples or "labels" not in samples:
            raise ValueError("pack: a mapping input needs 'input_ids' and 'labels' (-100 for context)")
        extra = {k: samples[k] for k in ("group", "weight", "tree_id") if k in samples}
        return columns_from_labels(samples["input_ids"], samples["labels"], **extra)
    elif isinstance(samples, Sequence) and all(isinstance(s, Sample) for s in samples):
        return SampleColumns.from_samples(samples)
    else:
        raise TypeError(
            "pack: samples must be SampleColumns, a list of Sample, or a mapping with input_ids and labels; "
            f"got {type(samples).__name__}"
        )
    mask = np.ascontiguousarray(c.target_mask)
    mask = mask.view(np.uint8) if mask.dtype == np.bool_ else np.ascontiguousarray(mask, dtype=np.uint8)
    return SampleColumns(
        tokens=np.ascontiguousarray(c.tokens, dtype=np.int32),
        offsets=np.ascontiguousarray(c.offsets, dtype=np.int64),
        target_mask=mask,
        group=np.ascontiguousarray(c.group, dtype=np.int8),
        weight=np.ascontiguousarray(c.weight, dtype=np.float32),
        tree_id=np.ascontiguousarray(c.tree_id, dtype=np.int64),
        prefix_len=np.ascontiguousarray(c.prefix_len, dtype=np.int32),
    )


def _validate(cols: SampleColumns) -> None:
    if len(cols.offsets) == 0:
        raise ValueError("pack: offsets is empty (it needs n+1 entries, starting at 0)")
    if len(cols) == 0:
        raise ValueError("pack: no samples to pack")
    for name in ("tokens", "offsets", "target_mask", "group", "weight", "tree_id", "prefix_len"):
        if getattr(cols, name).ndim != 1:
            raise ValueError(f"pack: {name} must be 1-D")
    cols.validate()
    bad = np.flatnonzero(~np.isfinite(cols.weight) | (cols.weight < 0))
    if len(bad):
        raise ValueError(f"pack: weights must be finite and >= 0; samples {bad[:10].tolist()} are not")
    starts = cols.offsets[:-1][cols.lengths > 0]
    first_set = np.flatnonzero(cols.lengths > 0)[cols.target_mask[starts] != 0]
    if len(first_set):
        raise ValueError(
            f"pack: samples {first_set[:10].tolist()} mark their first token as a target; it has no predictor "
            "(target_mask[i] means token i is predicted from position i-1)"
        )


def _check_options(budget: int, strategy: str, ranks: int, micro_batches_per_rank: int | None, alpha: float,
                   seed: int, truncation: str) -> None:
    if not isinstance(budget, (int, np.integer)) or not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"pack: budget must be an int in [1, {MAX_BUDGET}], got {budget!r}")
    if strategy not in ("bfd", "balanced"):
        raise ValueError(f"pack: strategy must be 'bfd' or 'balanced', got {strategy!r}")
    if not isinstance(ranks, (int, np.integer)) or ranks < 1:
        raise ValueError(f"pack: ranks must be an int >= 1, got {ranks!r}")
    if micro_batches_per_rank is not None:
        if strategy != "balanced":
            raise ValueError("pack: micro_batches_per_rank applies to strategy='balanced' only")
        if micro_batches_per_rank < 1:
            raise ValueError(f"pack: micro_batches_per_rank must be >= 1, got {micro_batches_per_rank}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"pack: alpha must be finite and >= 0, got {alpha!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"pack: seed must be an int >= 0, got {seed!r}")
    if truncation not in ("error", "left", "right"):
        raise ValueError(f"pack: truncation must be 'error', 'left' or 'right', got {truncation!r}")


def _windows(lengths: np.ndarray, budget: int, truncation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept window (start within the sample, length) per sample, and the ids of truncated samples."""
    over = np.flatnonzero(lengths > budget)
    if len(over) and truncation == "error":
        shown = ", ".join(f"{int(j)} ({int(lengths[j])} tokens)" for j in over[:10])
        more = f" and {len(over) - 10} more" if len(over) > 10 else ""
        raise UserError(
            "pack", f"{len(over)} sample(s) exceed the budget of {budget} tokens: {shown}{more}",
            "raise the budget (--token-budget) or pass truncation='left' (--truncation left: keep the end) "
            "or 'right' (keep the start)")
    win_len = np.minimum(lengths, budget)
    win_start = lengths - win_len if truncation == "left" else np.zeros_like(lengths)
    return win_start, win_len, over


# ------------------------------------------------------------------------------------------- engines


class _Native:
    """The C++ path (implements ``PackEngine``)."""

    def __init__(self, threads: int) -> None:
        from leafe_fast import _C

        self._C = _C
        self.threads = threads

    def count(self, cols, win_start, win_len):
        return self._C.pack_count_targets(cols.target_mask, cols.offsets, win_start, win_len)

    def plan(self, ids, lengths, tree_ids, o):
        p = self._C.pack_plan(ids, lengths, tree_ids, o["budget"], o["strategy"], o["ranks"],
                              o["micro_batches_per_rank"] or 0, o["alpha"], o["seed"], o["shuffle"],
                              o["keep_trees_together"])
        return p

    def build(self, cols, win_abs, win_len, kept, plan) -> list[MicroBatch]:
        flat = self._C.pack_build(cols.tokens, cols.target_mask, cols.group, cols.weight, win_abs, win_len, kept,
                                  plan["order"], plan["mb_offsets"], self.threads)
        return _views(flat, plan)


    def trie_chunks(self, cols, win_abs, win_len, eligible, budget):
        return self._C.pack_trie_chunks(cols.tokens, cols.target_mask, win_abs, win_len, cols.tree_id, eligible,
                                        budget, self.threads)

    def trie_build(self, cols, win_abs, win_len, kept, chunks, plan) -> list[MicroBatch]:
        flat = self._C.pack_trie_build(cols.tokens, cols.target_mask, cols.group, cols.weight, win_abs, win_len,
                                       chunks["members"], chunks["lcp"], chunks["chunk_offsets"], plan["order"],
                                       plan["mb_offsets"], self.threads)
        return _trie_views(flat, plan, win_len)


def _trie_views(flat: dict[str, np.ndarray], plan: dict[str, Any], win_len: np.ndarray) -> list[MicroBatch]:
    """Trie micro-batches as views into the flat buffers the C++ build wrote."""
    tok, tgt, smp = flat["tok_off"].tolist(), flat["tgt_off"].tolist(), flat["smp_off"].tolist()
    chunks = plan["mb_offsets"].tolist()
    ranks, costs, longest = plan["mb_rank"].tolist(), plan["mb_cost"].tolist(), flat["max_seqlen"].tolist()
    sids = flat["sample_ids"]
    per_sample = np.concatenate([[0], np.cumsum(win_len[sids])]) if len(sids) else np.zeros(1, np.int64)
    out = []
    for b in range(len(ranks)):
        t0, t1, m0, m1, s0, s1, c0, c1 = tok[b], tok[b + 1], tgt[b], tgt[b + 1], smp[b], smp[b + 1], chunks[b], chunks[b + 1]
        out.append(MicroBatch(flat["input_ids"][t0:t1], flat["position_ids"][t0:t1], flat["cu_seqlens"][c0 + b : c1 + b + 1],
                              longest[b], flat["rows"][m0:m1], flat["targets"][m0:m1], flat["weights"][m0:m1],
                              flat["group"][m0:m1], sids[s0:s1], ranks[b], t1 - t0, m1 - m0, costs[b],
                              flat["subtree_end"][t0:t1], "trie", int(per_sample[s1] - per_sample[s0])))
    return out


def _views(flat: dict[str, np.ndarray], plan: dict[str, Any]) -> list[MicroBatch]:
    """Micro-batches as views into the flat buffers the C++ build wrote (no copies)."""
    tok = flat["tok_off"].tolist()
    tgt = flat["tgt_off"].tolist()
    smp = plan["mb_offsets"].tolist()
    ranks = plan["mb_rank"].tolist()
    costs = plan["mb_cost"].tolist()
    longest = flat["max_seqlen"].tolist()
    ids, pos, cu = flat["input_ids"], flat["position_ids"], flat["cu_seqlens"]
    rows, targets, weights, group, order = flat["rows"], flat["targets"], flat["weights"], flat["group"], plan["order"]
    out = []
    for b in range(len(ranks)):
        t0, t1, m0, m1, s0, s1 = tok[b], tok[b + 1], tgt[b], tgt[b + 1], smp[b], smp[b + 1]
        out.append(MicroBatch(ids[t0:t1], pos[t0:t1], cu[s0 + b : s1 + b + 1], longest[b], rows[m0:m1],
                              targets[m0:m1], weights[m0:m1], group[m0:m1], order[s0:s1], ranks[b], t1 - t0,
                              m1 - m0, costs[b]))
    return out


# ------------------------------------------------------------------------------------------- driver


def resolve_layout(layout: str, tree_id: np.ndarray) -> Layout:
    """``"auto"``: the trie layout when some sample carries a tree id (LEAFE data), else flat."""
    if layout not in ("auto", "flat", "trie"):
        raise ValueError(f"pack: layout must be 'auto', 'flat' or 'trie', got {layout!r}")
    if layout == "auto":
        return "trie" if len(tree_id) and bool((tree_id >= 0).any()) else "flat"
    return layout  # type: ignore[return-value]


def _run(samples, budget, strategy, ranks, micro_batches_per_rank, alpha, seed, shuffle, keep_trees_together,
         truncation, engine: PackEngine, layout: str = "flat") -> Packing:
    t_start = time.perf_counter()
    _check_options(budget, strategy, ranks, micro_batches_per_rank, alpha, seed, truncation)
    cols = _as_columns(samples)
    _validate(cols)
    layout = resolve_layout(layout, cols.tree_id)
    timings = {}
    t = time.perf_counter()
    lengths = cols.lengths
    win_start, win_len, over = _windows(lengths, int(budget), truncation)
    kept, removed = engine.count(cols, win_start, win_len)
    timings["count"] = time.perf_counter() - t

    eligible = np.flatnonzero(kept > 0).astype(np.int64)
    if len(eligible) == 0:
        raise ValueError(f"pack: none of the {len(cols)} samples has a target token left to train on")
    opts = {"budget": int(budget), "strategy": strategy, "ranks": int(ranks),
            "micro_batches_per_rank": micro_batches_per_rank, "alpha": float(alpha), "seed": int(seed),
            "shuffle": bool(shuffle), "keep_trees_together": bool(keep_trees_together)}
    win_abs = np.ascontiguousarray(cols.offsets[:-1] + win_start)
    win_len = np.ascontiguousarray(win_len)
    flat_tokens = int(win_len[eligible].sum())
    mixed: list[int] = []
    if layout == "trie":
        # Each tree becomes one trie (or, beyond the budget, chunks cut at branch points); the chunks are
        # placed like single samples of their trie length.
        t = time.perf_counter()
        chunks = engine.trie_chunks(cols, win_abs, win_len, eligible, int(budget))
        timings["trie"] = time.perf_counter() - t
        num_chunks = len(chunks["chunk_tokens"])
        units, unit_len = np.arange(num_chunks, dtype=np.int64), np.ascontiguousarray(chunks["chunk_tokens"])
        unit_tree = np.full(num_chunks, -1, dtype=np.int64)
        opts["keep_trees_together"] = False
        mixed = chunks["mixed_trees"].tolist()
    else:
        units, unit_len = eligible, np.ascontiguousarray(win_len[eligible])
        unit_tree = np.ascontiguousarray(cols.tree_id[eligible])
    t = time.perf_counter()
    try:
        plan = engine.plan(units, unit_len, unit_tree, opts)
    except RuntimeError as exc:
        raise ValueError(f"pack: {exc}") from None
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    if layout == "trie":
        micro_batches = engine.trie_build(cols, win_abs, win_len, kept, chunks, plan)
        split_trees = chunks["split_trees"].tolist()
    else:
        micro_batches = engine.build(cols, win_abs, win_len, kept, plan)
        split_trees = plan["split_trees"].tolist()
    timings["build"] = time.perf_counter() - t

    R = int(ranks)
    costs = plan["mb_cost"]
    rank_of = plan["mb_rank"]
    rank_costs = np.bincount(rank_of, weights=costs, minlength=R) if len(costs) else np.zeros(R)
    mean = rank_costs.mean()
    per_rank = [np.flatnonzero(rank_of == r) for r in range(R)]  # the k-th entry runs in step k
    slot_max = np.zeros(max(len(p) for p in per_rank))
    for p in per_rank:
        slot_max[: len(p)] = np.maximum(slot_max[: len(p)], costs[p])
    B = len(micro_batches)
    real = int(sum(mb.num_tokens for mb in micro_batches))
    truncated = [(int(j), int(lengths[j] - win_len[j]), int(removed[j])) for j in over]
    stats = PackStats(
        capacity=B * int(budget), real_tokens=real, padding=B * int(budget) - real,
        token_efficiency=real / (B * int(budget)) if B else 0.0, num_micro_batches=B,
        micro_batches_per_rank=int(plan["micro_batches_per_rank"]), rank_costs=rank_costs.tolist(),
        rank_imbalance=max(0.0, float(rank_costs.max() / mean - 1)) if mean > 0 else 0.0,
        sync_imbalance=max(0.0, float(slot_max.sum() / rank_costs.sum() * R - 1)) if mean > 0 else 0.0,
        num_targets=int(sum(mb.num_targets for mb in micro_batches)), truncated=truncated,
        skipped=np.flatnonzero(kept == 0).tolist(), split_trees=split_trees,
        seconds=time.perf_counter() - t_start, timings=timings, layout=layout, flat_tokens=flat_tokens,
        trie_tokens=real, compression=flat_tokens / real if real else 1.0, mixed_trees=mixed)
    return Packing(micro_batches, stats, R)


def pack(
    samples: SampleColumns | Sequence[Sample] | Mapping[str, Any],
    budget: int,
    *,
    strategy: Strategy = "bfd",
    ranks: int = 1,
    micro_batches_per_rank: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    shuffle: bool = True,
    keep_trees_together: bool = False,
    truncation: Truncation = "error",
    layout: Literal["auto", "flat", "trie"] = "flat",
    backend: Literal["cpp", "python"] = "cpp",
    threads: int | None = None,
) -> Packing:
    """Pack samples into micro-batches of at most ``budget`` tokens (see the module docstring for the rules).

    ``samples``: ``SampleColumns``, a list of ``Sample``, or ``{"input_ids": [...], "labels": [...]}`` in the
    Hugging Face labels form (see ``columns_from_labels``). ``layout``: "flat", "trie" (prefix-shared trees) or
    "auto" (trie when samples carry tree ids). ``backend="python"`` runs ``pack_reference``.
    ``threads`` (C++ only) splits the output assembly; default: the machine's cores, at most 8.
    Raises ``ValueError`` for bad input or options, naming the offending samples.
    """
    if backend == "python":
        from leafe_fast.packing_reference import ReferenceEngine

        engine: Any = ReferenceEngine()
    elif backend == "cpp":
        engine = _Native(int(threads) if threads else min(8, os.cpu_count() or 1))
    else:
        raise ValueError(f"pack: backend must be 'cpp' or 'python', got {backend!r}")
    return _run(samples, budget, strategy, ranks, micro_batches_per_rank, alpha, seed, shuffle,
                keep_trees_together, truncation, engine, layout)


def pack_reference(
    samples: SampleColumns | Sequence[Sample] | Mapping[str, Any],
    budget: int,
    *,
    strategy: Strategy = "bfd",
    ranks: int = 1,
    micro_batches_per_rank: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    shuffle: bool = True,
    keep_trees_together: bool = False,
    truncation: Truncation = "error",
    layout: Literal["auto", "flat", "trie"] = "flat",
) -> Packing:
    """Plain Python packing with the same rules and results as ``pack``; the tests' ground truth."""
    from leafe_fast.packing_reference import ReferenceEngine

    return _run(samples, budget, strategy, ranks, micro_batches_per_rank, alpha, seed, shuffle,
                keep_trees_together, truncation, ReferenceEngine(), layout)


__all__ = [
    "MicroBatch", "PackStats", "Packing", "PackEngine", "Layout", "resolve_layout", "pack", "pack_reference", "columns_from_labels", "attention_alpha",
    "target_norms", "release_buffers", "DEFAULT_ALPHA",
]
