"""Exploration trees -> training samples (LEAFE Stage 2, experience distillation).

Two kinds of sample come out of a tree (``leafe_fast.data.schema``), both WITHOUT any experience
message in context: that absence is the point, the policy must learn to act as if it had the
experience without being told.

- rehearsal (group 0): every successful root-to-leaf trajectory, targets = all its action tokens.
- counterfactual (group 1): for a branch whose first node carries an experience (a rollback point)
  and whose subtree reaches success: the prefix up to the rollback point, then the corrected
  action(s) of the successful continuation; targets = those corrected actions only.

Observation and template tokens are context, never targets. Tokens after the last target of a sample
predict nothing and are cut. Samples of one tree keep the tree's index as ``tree_id`` and the length
they share with the tree's other samples as ``prefix_len`` (the packer's hint for prefix sharing).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from leafe_fast.data.sample import COUNTERFACTUAL, GROUP_NAMES, REHEARSAL, Sample
from leafe_fast.data.schema import Node, Tree, read_trees
from leafe_fast.trajectory import Trajectory

Overflow = Literal["error", "drop", "truncate"]


@dataclass
class BuildStats:
    """What ``build_samples`` made and what it left out, for the CLI summary and the demo report."""

    trees: int = 0
    trees_with_success: int = 0
    samples: dict[str, int] = field(default_factory=lambda: {g: 0 for g in GROUP_NAMES})
    target_tokens: dict[str, int] = field(default_factory=lambda: {g: 0 for g in GROUP_NAMES})
    tokens: int = 0
    duplicates_removed: int = 0
    too_long_dropped: int = 0
    truncated: int = 0
    targets_lost_to_truncation: int = 0
    lengths: dict[str, float] = field(default_factory=dict)  # min / mean / p50 / p95 / max

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())

    @property
    def target_share(self) -> float:
        return sum(self.target_tokens.values()) / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "trees": self.trees,
            "trees_with_success": self.trees_with_success,
            "samples": dict(self.samples),
            "target_tokens": dict(self.target_tokens),
            "tokens": self.tokens,
            "target_share": round(self.target_share, 6),
            "duplicates_removed": self.duplicates_removed,
            "too_long_dropped": self.too_long_dropped,
            "truncated": self.truncated,
            "targets_lost_to_truncation": self.targets_lost_to_truncation,
            "lengths": dict(self.lengths),
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        kinds = ", ".join(f"{self.samples[g]} {g} ({self.target_tokens[g]} target tokens)" for g in GROUP_NAMES)
        lines = [
            f"trees: {self.trees} ({self.trees_with_success} with a success)",
            f"samples: {self.total_samples} = {kinds}",
            f"tokens: {self.tokens}, target share {100 * self.target_share:.1f}%",
        ]
        if self.lengths:
            L = self.lengths
            lines.append(
                f"lengths: min {L['min']:.0f}, mean {L['mean']:.1f}, p50 {L['p50']:.0f}, "
                f"p95 {L['p95']:.0f}, max {L['max']:.0f}"
            )
        dropped = []
        if self.duplicates_removed:
            dropped.append(f"{self.duplicates_removed} duplicates removed")
        if self.too_long_dropped:
            dropped.append(f"{self.too_long_dropped} longer than max_len dropped")
        if self.truncated:
            dropped.append(f"{self.truncated} truncated ({self.targets_lost_to_truncation} target tokens cut)")
        if dropped:
            lines.append("left out: " + ", ".join(dropped))
        return "\n".join(lines)


def build_samples(
    trees: Iterable[Tree] | str | os.PathLike,
    *,
    counterfactual_steps: int | None = 1,
    include_rehearsal: bool = True,
    include_counterfactual: bool = True,
    dedup: bool = True,
    weights: Mapping[int, float] | None = None,
    max_len: int | None = None,
    overflow: Overflow = "error",
) -> list[Sample]:
    """Rehearsal + counterfactual samples of ``trees`` (a list of trees or a trees.jsonl path).

    ``counterfactual_steps``: corrected steps supervised after each rollback point (``None``: every
    step to the end of the successful branch). ``weights``: per-group sample weight (default 1.0).
    ``max_len``: longest sample allowed; ``overflow`` says what happens to a longer one: ``error``
    (raise, naming the tree), ``drop`` (counted in the stats) or ``truncate`` (keep the first
    ``max_len`` tokens; a sample left without targets is dropped; both counted).
    See ``build_samples_with_stats`` for the statistics.
    """
    samples, _ = build_samples_with_stats(
        trees,
        counterfactual_steps=counterfactual_steps,
        include_rehearsal=include_rehearsal,
        include_counterfactual=include_counterfactual,
        dedup=dedup,
        weights=weights,
        max_len=max_len,
        overflow=overflow,
    )
    return samples


def build_samples_with_stats(
    trees: Iterable[Tree] | str | os.PathLike,
    *,
    counterfactual_steps: int | None = 1,
    include_rehearsal: bool = True,
    include_counterfactual: bool = True,
    dedup: bool = True,
    weights: Mapping[int, float] | None = None,
    max_len: int | None = None,
    overflow: Overflow = "error",
) -> tuple[list[Sample], BuildStats]:
    """``build_samples`` plus a ``BuildStats`` of what was made and left out."""
    if counterfactual_steps is not None and counterfactual_steps < 1:
        raise ValueError(f"build_samples: counterfactual_steps must be >= 1 or None, got {counterfactual_steps}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"build_samples: max_len must be >= 2 or None, got {max_len}")
    if overflow not in ("error", "drop", "truncate"):
        raise ValueError(f"build_samples: overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
    group_weight = {REHEARSAL: 1.0, COUNTERFACTUAL: 1.0, **(dict(weights) if weights else {})}
    if isinstance(trees, (str, os.PathLike)):
        trees = read_trees(trees)

    stats = BuildStats()
    out: list[Sample] = []
    seen: set[bytes] = set()
    for tree_id, tree in enumerate(trees):
        stats.trees += 1
        tree_samples: list[Sample] = []
        if any(n.success for n in tree.nodes):
            stats.trees_with_success += 1
        if include_rehearsal:
            tree_samples += _rehearsal(tree, tree_id, group_weight[REHEARSAL])
        if include_counterfactual:
            tree_samples += _counterfactual(tree, tree_id, group_weight[COUNTERFACTUAL], counterfactual_steps)
        kept: list[Sample] = []
        for s in tree_samples:
            s = _fit(s, tree, max_len, overflow, stats)
            if s is None:
                continue
            if dedup:
                key = _content_key(s)
                if key in seen:
                    stats.duplicates_removed += 1
                    continue
                seen.add(key)
            kept.append(s)
        _set_prefix_lengths(kept)
        out += kept

    for s in out:
        name = GROUP_NAMES[s.group] if s.group < len(GROUP_NAMES) else str(s.group)
        stats.samples[name] = stats.samples.get(name, 0) + 1
        stats.target_tokens[name] = stats.target_tokens.get(name, 0) + s.num_targets
        stats.tokens += len(s)
    if out:
        lengths = np.array([len(s) for s in out], dtype=np.float64)
        stats.lengths = {
            "min": float(lengths.min()),
            "mean": float(lengths.mean()),
            "p50": float(np.percentile(lengths, 50)),
            "p95": float(np.percentile(lengths, 95)),
            "max": float(lengths.max()),
        }
    return out, stats


# --- the two kinds ------------------------------------------------------------------------------


def _steps_tokens(tree: Tree, nodes: list[Node], *, supervise: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The trajectory of ``nodes`` without any experience, targets where ``supervise`` says, cut after
    the last target (``leafe_fast.trajectory``: the layout exploration and evaluation use)."""
    traj = Trajectory.from_nodes(tree.prompt_ids, tree.header_ids, nodes, supervise=supervise, with_experience=False)
    try:
        return traj.arrays()
    except ValueError:
        raise ValueError(
            f"build_samples: tree {tree.task_id!r} has empty prompt_ids and header_ids, so the first "
            "action token has nothing to be predicted from"
        ) from None


def _make(tree: Tree, tree_id: int, ids: np.ndarray, mask: np.ndarray, group: int, weight: float, **meta) -> Sample:
    return Sample(
        ids,
        mask,
        group=group,
        weight=weight,
        tree_id=tree_id,
        meta={"task_id": tree.task_id, "kind": GROUP_NAMES[group], **meta},
    )


def _rehearsal(tree: Tree, tree_id: int, weight: float) -> list[Sample]:
    out = []
    for node in tree.nodes:
        if not node.success:
            continue
        path = tree.path(node.id)
        ids, mask = _steps_tokens(tree, path, supervise=[True] * len(path))
        if any(mask):
            out.append(_make(tree, tree_id, ids, mask, REHEARSAL, weight, leaf=node.id))
    return out


def _counterfactual(tree: Tree, tree_id: int, weight: float, steps: int | None) -> list[Sample]:
    by_id = {n.id: n for n in tree.nodes}
    successes = [n.id for n in tree.nodes if n.success]
    out = []
    for branch in tree.nodes:
        if not branch.experience_ids:
            continue  # not a rollback point
        for leaf in successes:
            path = tree.path(leaf)
            ids_on_path = [n.id for n in path]
            if branch.id not in ids_on_path:
                continue  # this success is not in the branch's subtree
            cut = ids_on_path.index(branch.id)
            keep = len(path) if steps is None else min(len(path), cut + steps)
            nodes = path[:keep]
            supervise = [i >= cut for i in range(keep)]
            ids, mask = _steps_tokens(tree, nodes, supervise=supervise)
            if any(mask):
                out.append(
                    _make(
                        tree, tree_id, ids, mask, COUNTERFACTUAL, weight,
                        rollback_node=branch.id, rollback_from=branch.rollback_from, leaf=leaf,
                        rollback_step=by_id[branch.parent].step + 1 if branch.parent >= 0 else 0,
                    )
                )
    return out


# --- length policy, dedup, shared prefixes --------------------------------------------------


def _fit(s: Sample, tree: Tree, max_len: int | None, overflow: Overflow, stats: BuildStats) -> Sample | None:
    if max_len is None or len(s) <= max_len:
        return s
    if overflow == "error":
        raise ValueError(
            f"build_samples: a {s.meta['kind']} sample of tree {tree.task_id!r} has {len(s)} tokens, more "
            f"than max_len={max_len}; raise max_len or pass overflow='drop' or 'truncate'"
        )
    if overflow == "drop":
        stats.too_long_dropped += 1
        return None
    lost = int(s.target_mask[max_len:].sum())
    mask = s.target_mask[:max_len]
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    stats.targets_lost_to_truncation += lost
    if end == 0:
        stats.too_long_dropped += 1
        return None
    stats.truncated += 1
    return Sample(s.input_ids[:end], mask[:end], s.group, s.weight, s.tree_id, 0, {**s.meta, "truncated": True})


def _content_key(s: Sample) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.int64(s.group).tobytes())
    h.update(np.float64(s.weight).tobytes())
    h.update(s.input_ids.tobytes())
    h.update(np.packbits(s.target_mask).tobytes())
    return h.digest()


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _set_prefix_lengths(samples: list[Sample]) -> None:
    """prefix_len = the longest common prefix with any other sample of the same tree.

    In lexicographic order the best partner of a sequence is one of its neighbours, so a sort and
    one pass over adjacent pairs suffice.
    """
    for s in samples:
        s.prefix_len = 0
    order = sorted(range(len(samples)), key=lambda i: samples[i].input_ids.tolist())
    for a, b in zip(order, order[1:]):
        common = _lcp(samples[a].input_ids, samples[b].input_ids)
        samples[a].prefix_len = max(samples[a].prefix_len, common)
        samples[b].prefix_len = max(samples[b].prefix_len, common)
