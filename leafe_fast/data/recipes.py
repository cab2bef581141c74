"""Exploration trees -> training samples (LEAFE Stage 2, experience distillation), by recipe.

Every sample is built WITHOUT any experience message in context (``leafe_fast.trajectory``): that
absence is the point, the policy must learn to act as if it had the experience without being told.
A *guided* path is a root-to-success path through a branch start (a rollback point); an *unguided*
path never rolled back, so the policy completed it with no experience in its context.

- rehearsal (group 0): the unguided successful trajectories, targets = all their action tokens.
  Guided continuations are left out by default (``guided="exclude"``): their actions after the
  rollback point are exactly the counterfactual targets, so training them as rehearsal would count the
  corrections twice and make the two losses inseparable (a zero counterfactual weight would not remove
  them). ``guided="group"`` makes them a group of their own (2, ``guided``, own weight);
  ``guided="rehearsal"`` trains them as rehearsal (the old behaviour: overlap asked for).
- counterfactual (group 1): for each branch start on a path to a success, the prefix up to the
  rollback point, then the corrected action(s); targets = those actions only, never past the next
  branch start (each corrected action belongs to one sample). ``counterfactual_steps`` (default 1):
  the corrected action at the rollback point is what the experience changed; later steps are the
  policy acting on its own in states the correction made reachable, closer to rehearsal than to a
  correction. ``k`` or ``None`` (all steps to the success) widens it.
- A counterfactual sample is dropped (and counted) when its corrected action is invalid (the env said
  so, ``Node.invalid``), a no-op (``Node.noop``: valid but changed nothing), or the same action the
  abandoned attempt took at that node (the "correction" corrects nothing).
- ``mask_invalid`` (default: the env's own default, on for Sokoban): invalid and no-op actions are not
  targets in any group (they stay in the context as they happened).

By default no action is a target in two groups (checked: ``BuildStats.overlap_target_tokens``).
Branches whose subtree never reached a success yield nothing (``BuildStats.failed_branches``).

Recipes (``build_recipe``), so the arms of a comparison differ only in their data:
``leafe`` (rehearsal + counterfactual), ``rehearsal-only``, ``counterfactual-only``,
``rejection-sampling`` (RS-SFT: every success of ``explore --mode independent``), and
``rollback-no-summary`` (LEAFE's recipe on trees explored with ``--no-summary``).

Observation and template tokens are context, never targets. Tokens after the last target of a sample
predict nothing and are cut. Samples of one tree keep the tree's index as ``tree_id`` and the length
they share with the tree's other samples as ``prefix_len`` (the packer's hint for prefix sharing).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from leafe_fast.data.columns import COUNTERFACTUAL, GROUP_NAMES, GUIDED, REHEARSAL, Sample, group_name
from leafe_fast.data.schema import Node, Tree, read_trees
from leafe_fast.errors import UserError
from leafe_fast.trajectory import Trajectory, common_prefix_length

Overflow = Literal["error", "drop", "truncate"]
GUIDED_POLICIES = ("exclude", "group", "rehearsal")
RECIPES = ("leafe", "rehearsal-only", "counterfactual-only", "rejection-sampling", "rollback-no-summary")
DROP_REASONS = ("invalid", "noop", "same_as_abandoned")


# --- the build-data config -------------------------------------------------------------------------


@dataclass
class BuildConfig:
    """Settings of ``leafe-fast build-data`` (its flags come from these fields)."""

    recipe: str = field(default="leafe", metadata={
        "help": "which arm's data: leafe (rehearsal + counterfactual), rehearsal-only, counterfactual-only, "
                "rejection-sampling (successes of `explore --mode independent`), rollback-no-summary "
                "(trees explored with --no-summary)", "choices": RECIPES})
    counterfactual_steps: str = field(default="1", metadata={
        "help": "corrected steps supervised after each rollback point: a positive integer, or 'all' (to the "
                "success); 1 supervises exactly the action the experience changed", "metavar": "K|all"})
    guided: str = field(default="exclude", metadata={
        "help": "successful paths through a rollback point: exclude them from rehearsal, train them as their "
                "own group 2 'guided', or as rehearsal (their corrections then count in two groups)",
        "choices": GUIDED_POLICIES})
    mask_invalid: bool | None = field(default=None, metadata={
        "help": "leave invalid and no-op actions (as the env flagged them) out of the targets "
                "(none: the env's default, on for sokoban)"})
    validate_corrections: bool = field(default=True, metadata={
        "help": "drop counterfactual samples whose corrected action is invalid, a no-op or the abandoned "
                "action (counted)"})
    dedup: bool = field(default=True, metadata={"help": "drop samples with identical tokens, targets and group"})
    rehearsal_weight: float = field(default=1.0, metadata={"help": "loss weight of rehearsal samples", "min": 0.0})
    counterfactual_weight: float = field(default=1.0, metadata={
        "help": "loss weight of counterfactual samples", "min": 0.0})
    guided_weight: float = field(default=1.0, metadata={"help": "loss weight of guided samples (--guided group)",
                                                        "min": 0.0})
    max_len: int | None = field(default=None, metadata={"help": "longest sample in tokens (none: no limit)",
                                                        "min": 2})
    overflow: str = field(default="error", metadata={
        "help": "a sample longer than --max-len: error, drop or truncate (both counted)",
        "choices": ("error", "drop", "truncate")})
    vocab_size: int | None = field(default=None, metadata={
        "help": "check every token id against this vocabulary size (none: only that ids are >= 0)", "min": 1})
    allow_empty: bool = field(default=False, metadata={
        "help": "write a samples file even when no sample comes out (default: that is an error)"})

    def steps(self) -> int | None:
        """``counterfactual_steps`` as build_samples takes it (None: all)."""
        return parse_counterfactual_steps(self.counterfactual_steps, "counterfactual_steps")

    def weights(self) -> dict[int, float]:
        return {REHEARSAL: self.rehearsal_weight, COUNTERFACTUAL: self.counterfactual_weight,
                GUIDED: self.guided_weight}


def parse_counterfactual_steps(value: Any, where: str = "counterfactual_steps") -> int | None:
    """``1``, ``k`` or ``"all"`` -> int or None; anything else is a ``UserError``."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        try:
            value = int(value)
        except ValueError:
            raise UserError(where, f"expected a positive integer or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(where, f"expected a positive integer or 'all', got {value!r}")
    return value


# --- statistics ---------------------------------------------------------------------------------------


@dataclass
class BuildStats:
    """What ``build_samples`` made and what it left out, for the CLI summary and the demo report."""

    trees: int = 0
    trees_with_success: int = 0
    samples: dict[str, int] = field(default_factory=lambda: {g: 0 for g in GROUP_NAMES[:2]})
    target_tokens: dict[str, int] = field(default_factory=lambda: {g: 0 for g in GROUP_NAMES[:2]})
    tokens: int = 0
    duplicates_removed: int = 0
    too_long_dropped: int = 0
    truncated: int = 0
    targets_lost_to_truncation: int = 0
    branches: int = 0  # branch starts (rollback points) in the trees
    failed_branches: int = 0  # branch starts whose subtree never reached a success: they yield nothing
    guided_paths: int = 0  # successful paths through a rollback point
    guided_excluded: int = 0  # of those, left out of rehearsal (guided="exclude")
    counterfactual_dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    masked_actions: int = 0  # invalid / no-op actions left out of the targets (mask_invalid)
    overlap_target_tokens: int = 0  # action tokens that are targets in two groups (0 unless asked)
    recipe: str = ""
    ablation: bool = False  # trees of the oracle reflector: an ablation, never LEAFE
    lengths: dict[str, float] = field(default_factory=dict)  # min / mean / p50 / p95 / max

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())

    @property
    def target_share(self) -> float:
        return sum(self.target_tokens.values()) / self.tokens if self.tokens else 0.0

    @property
    def dropped_samples(self) -> int:
        """Samples left out for any reason (invalid corrections, duplicates, too long)."""
        return sum(self.counterfactual_dropped.values()) + self.duplicates_removed + self.too_long_dropped

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "ablation": self.ablation,
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
            "branches": self.branches,
            "failed_branches": self.failed_branches,
            "guided_paths": self.guided_paths,
            "guided_excluded": self.guided_excluded,
            "counterfactual_dropped": dict(self.counterfactual_dropped),
            "masked_actions": self.masked_actions,
            "overlap_target_tokens": self.overlap_target_tokens,
            "dropped_samples": self.dropped_samples,
            "lengths": dict(self.lengths),
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        kinds = ", ".join(f"{n} {g} ({self.target_tokens.get(g, 0)} target tokens)" for g, n in self.samples.items())
        head = f"recipe {self.recipe}" + (" (ORACLE ABLATION trees, not LEAFE)" if self.ablation else "")
        lines = [
            f"{head}; trees: {self.trees} ({self.trees_with_success} with a success)",
            f"samples: {self.total_samples} = {kinds}",
            f"tokens: {self.tokens}, target share {100 * self.target_share:.1f}%",
            f"branches: {self.branches} ({self.failed_branches} never reached a success and yield nothing); "
            f"guided paths: {self.guided_paths} ({self.guided_excluded} left out of rehearsal)",
        ]
        if self.lengths:
            L = self.lengths
            lines.append(
                f"lengths: min {L['min']:.0f}, mean {L['mean']:.1f}, p50 {L['p50']:.0f}, "
                f"p95 {L['p95']:.0f}, max {L['max']:.0f}"
            )
        dropped = [f"{n} counterfactual with a {r.replace('_', ' ')} correction"
                   for r, n in self.counterfactual_dropped.items() if n]
        if self.masked_actions:
            dropped.append(f"{self.masked_actions} invalid/no-op actions masked")
        if self.duplicates_removed:
            dropped.append(f"{self.duplicates_removed} duplicates removed")
        if self.too_long_dropped:
            dropped.append(f"{self.too_long_dropped} longer than max_len dropped")
        if self.truncated:
            dropped.append(f"{self.truncated} truncated ({self.targets_lost_to_truncation} target tokens cut)")
        if dropped:
            lines.append("left out: " + ", ".join(dropped))
        if self.overlap_target_tokens:
            lines.append(f"note: {self.overlap_target_tokens} action tokens are targets in two groups (asked for)")
        return "\n".join(lines)


# --- the builder --------------------------------------------------------------------------------------


def build_samples(trees: Iterable[Tree] | str | os.PathLike, **kwargs: Any) -> list[Sample]:
    """Rehearsal + counterfactual samples of ``trees``; see ``build_samples_with_stats``."""
    samples, _ = build_samples_with_stats(trees, **kwargs)
    return samples


def build_samples_with_stats(
    trees: Iterable[Tree] | str | os.PathLike,
    *,
    counterfactual_steps: int | None = 1,
    include_rehearsal: bool = True,
    include_counterfactual: bool = True,
    guided: str = "exclude",
    mask_invalid: bool | None = None,
    validate_corrections: bool = True,
    dedup: bool = True,
    weights: Mapping[int, float] | None = None,
    max_len: int | None = None,
    overflow: Overflow = "error",
    vocab_size: int | None = None,
) -> tuple[list[Sample], BuildStats]:
    """Samples of ``trees`` (a list of trees or a trees.jsonl path) and a ``BuildStats``.

    ``counterfactual_steps``: corrected steps supervised after each rollback point (``None``: every
    step to the success). ``guided``: ``exclude`` | ``group`` | ``rehearsal`` (module docstring).
    ``mask_invalid``: invalid / no-op actions are not targets (``None``: the env's registry default).
    ``validate_corrections``: drop counterfactual samples with an invalid, no-op or unchanged
    correction. ``weights``: per-group sample weight (default 1.0). ``max_len``: longest sample
    allowed; ``overflow`` says what happens to a longer one: ``error`` (raise, naming the tree),
    ``drop`` or ``truncate`` (keep the first ``max_len`` tokens; a sample left without targets is
    dropped; both counted). ``vocab_size``: token ids must be below it.
    """
    if counterfactual_steps is not None and (isinstance(counterfactual_steps, bool) or counterfactual_steps < 1):
        raise ValueError(f"build_samples: counterfactual_steps must be >= 1 or None, got {counterfactual_steps}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"build_samples: max_len must be >= 2 or None, got {max_len}")
    if overflow not in ("error", "drop", "truncate"):
        raise ValueError(f"build_samples: overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
    if guided not in GUIDED_POLICIES:
        raise ValueError(f"build_samples: guided must be one of {GUIDED_POLICIES}, got {guided!r}")
    group_weight = {REHEARSAL: 1.0, COUNTERFACTUAL: 1.0, GUIDED: 1.0, **(dict(weights) if weights else {})}
    if isinstance(trees, (str, os.PathLike)):
        trees = read_trees(trees)

    stats = BuildStats()
    if guided == "group":
        stats.samples.setdefault("guided", 0)
        stats.target_tokens.setdefault("guided", 0)
    out: list[Sample] = []
    seen: set[bytes] = set()
    for tree_id, tree in enumerate(trees):
        stats.trees += 1
        _check_vocab(tree, vocab_size)
        stats.ablation |= bool(tree.meta.get("ablation", False))
        mask = _masks_invalid(tree) if mask_invalid is None else mask_invalid
        builder = _TreeSamples(tree, tree_id, group_weight, mask, stats)
        if any(n.success for n in tree.nodes):
            stats.trees_with_success += 1
        tree_samples: list[Sample] = []
        if include_rehearsal:
            tree_samples += builder.rehearsal(guided)
        if include_counterfactual:
            tree_samples += builder.counterfactual(counterfactual_steps, validate_corrections)
        builder.count_branches()
        stats.overlap_target_tokens += builder.overlap_tokens()
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
        name = group_name(s.group)
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


def build_recipe(trees: Iterable[Tree] | str | os.PathLike, config: BuildConfig | None = None,
                 *, source: str = "trees") -> tuple[list[Sample], BuildStats]:
    """The samples of ``config.recipe`` (see the module docstring), after checking that the trees were
    explored the way the recipe needs (a ``UserError`` naming ``source`` otherwise)."""
    config = config or BuildConfig()
    if config.recipe not in RECIPES:
        raise UserError("--recipe", f"unknown recipe {config.recipe!r}", f"choose one of {list(RECIPES)}")
    if isinstance(trees, (str, os.PathLike)):
        source = str(trees)
        trees = read_trees(trees)
    trees = list(trees)
    _check_recipe_trees(config.recipe, trees, source)
    parts = {
        "leafe": (True, True), "rollback-no-summary": (True, True), "rehearsal-only": (True, False),
        "counterfactual-only": (False, True), "rejection-sampling": (True, False),
    }[config.recipe]
    samples, stats = build_samples_with_stats(
        trees,
        counterfactual_steps=config.steps(),
        include_rehearsal=parts[0],
        include_counterfactual=parts[1],
        guided=config.guided,
        mask_invalid=config.mask_invalid,
        validate_corrections=config.validate_corrections,
        dedup=config.dedup,
        weights=config.weights(),
        max_len=config.max_len,
        overflow=config.overflow,
        vocab_size=config.vocab_size,
    )
    stats.recipe = config.recipe
    return samples, stats


def _check_recipe_trees(recipe: str, trees: list[Tree], source: str) -> None:
    modes = {str(t.meta.get("mode", "leafe")) for t in trees}
    summaries = {bool(t.meta.get("summary", True)) for t in trees}
    if recipe == "rejection-sampling":
        if modes != {"independent"} and trees:
            raise UserError(source, f"recipe rejection-sampling needs trees of `explore --mode independent`, "
                                    f"got mode(s) {sorted(modes)}", "explore with --mode independent first")
        return
    if "independent" in modes:
        raise UserError(source, f"recipe {recipe} needs LEAFE trees, got independent rollouts",
                        "use --recipe rejection-sampling for those")
    if recipe == "rollback-no-summary" and summaries != {False} and trees:
        raise UserError(source, "recipe rollback-no-summary needs trees explored with --no-summary",
                        "explore with --no-summary, or use --recipe leafe")
    if recipe in ("leafe", "counterfactual-only") and False in summaries:
        raise UserError(source, f"recipe {recipe} got trees explored with --no-summary",
                        "use --recipe rollback-no-summary for them")


def _masks_invalid(tree: Tree) -> bool:
    from leafe_fast.envs.registry import masks_invalid_actions

    return masks_invalid_actions(tree.env)


def _check_vocab(tree: Tree, vocab_size: int | None) -> None:
    """Token ids are >= 0 (``Tree.validate``) and, given a vocabulary size, below it."""
    if vocab_size is None:
        return
    seqs = [tree.prompt_ids, tree.header_ids] + [n.action_ids + n.observation_ids for n in tree.nodes]
    top = max((max(s) for s in seqs if s), default=-1)
    if top >= vocab_size:
        raise UserError(f"tree {tree.task_id!r}", f"token id {top} is outside the vocabulary (size {vocab_size})",
                        "build with the tokenizer the trees were explored with (or fix --vocab-size)")


class _TreeSamples:
    """The samples of one tree and the bookkeeping that keeps the groups apart."""

    def __init__(self, tree: Tree, tree_id: int, weights: Mapping[int, float], mask_invalid: bool,
                 stats: BuildStats):
        self.tree, self.tree_id, self.weights, self.mask_invalid, self.stats = tree, tree_id, weights, mask_invalid, stats
        self.by_id = {n.id: n for n in tree.nodes}
        self.paths = {n.id: tree.path(n.id) for n in tree.nodes if n.success}
        self.targets: dict[int, set[int]] = {}  # group -> node ids whose actions are targets

    def _supervised(self, node: Node) -> bool:
        if self.mask_invalid and (node.invalid or node.noop):
            self.stats.masked_actions += 1
            return False
        return True

    def _sample(self, nodes: list[Node], supervise: list[bool], group: int, **meta: Any) -> Sample | None:
        if not any(supervise):
            return None
        traj = Trajectory.from_nodes(self.tree.prompt_ids, self.tree.header_ids, nodes, supervise=supervise,
                                     with_experience=False)
        try:
            ids, mask = traj.arrays()
        except ValueError:
            raise ValueError(
                f"build_samples: tree {self.tree.task_id!r} has empty prompt_ids and header_ids, so the first "
                "action token has nothing to be predicted from"
            ) from None
        if not mask.any():
            return None
        target_nodes = [n.id for n, sup in zip(nodes, supervise) if sup and n.action_ids]
        self.targets.setdefault(group, set()).update(target_nodes)
        return Sample(ids, mask, group=group, weight=self.weights[group], tree_id=self.tree_id,
                      meta={"task_id": self.tree.task_id, "kind": group_name(group), "target_nodes": target_nodes,
                            **meta})

    def rehearsal(self, guided: str) -> list[Sample]:
        out = []
        for leaf, path in self.paths.items():
            is_guided = any(n.is_branch_start for n in path)
            group = REHEARSAL
            if is_guided:
                self.stats.guided_paths += 1
                if guided == "exclude":
                    self.stats.guided_excluded += 1
                    continue
                group = GUIDED if guided == "group" else REHEARSAL
            s = self._sample(path, [self._supervised(n) for n in path], group, leaf=leaf, guided=is_guided)
            if s is not None:
                out.append(s)
        return out

    def counterfactual(self, steps: int | None, validate: bool) -> list[Sample]:
        out = []
        dropped: set[int] = set()  # each bad rollback point counted once, however many successes follow it
        for leaf, path in self.paths.items():
            for cut, branch in enumerate(path):
                if not branch.is_branch_start:
                    continue
                reason = self._bad_correction(branch) if validate else None
                if reason is not None:
                    if branch.id not in dropped:
                        dropped.add(branch.id)
                        self.stats.counterfactual_dropped[reason] += 1
                    continue
                end = next((i for i in range(cut + 1, len(path)) if path[i].is_branch_start), len(path))
                if steps is not None:
                    end = min(end, cut + steps)
                nodes = path[:end]
                supervise = [i >= cut and self._supervised(nodes[i]) for i in range(end)]
                parent_step = self.by_id[branch.parent].step + 1 if branch.parent >= 0 else 0
                s = self._sample(nodes, supervise, COUNTERFACTUAL, rollback_node=branch.id,
                                 rollback_from=branch.rollback_from, leaf=leaf, rollback_step=parent_step)
                if s is not None:
                    out.append(s)
        return out

    def _bad_correction(self, branch: Node) -> str | None:
        """Why the corrected action at this rollback point teaches nothing (None: it is fine)."""
        if branch.invalid:
            return "invalid"
        if branch.noop:
            return "noop"
        abandoned = self._abandoned(branch)
        if abandoned is not None and _same_action(branch, abandoned):
            return "same_as_abandoned"
        return None

    def _abandoned(self, branch: Node) -> Node | None:
        """The action the abandoned attempt took at the branch's node (same parent, on the path that
        triggered the rollback)."""
        if branch.rollback_from is None or branch.rollback_from not in self.by_id:
            return None
        for node in self.tree.path(branch.rollback_from):
            if node.parent == branch.parent and node.id != branch.id:
                return node
        return None

    def count_branches(self) -> None:
        """Branch starts, and those whose subtree never reached a success (they yield no sample)."""
        succeeded: set[int] = set()
        for path in self.paths.values():
            succeeded.update(n.id for n in path)
        for n in self.tree.nodes:
            if n.is_branch_start:
                self.stats.branches += 1
                self.stats.failed_branches += int(n.id not in succeeded)

    def overlap_tokens(self) -> int:
        groups = list(self.targets.values())
        both: set[int] = set()
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                both |= a & b
        return sum(len(self.by_id[i].action_ids) for i in both)


def _same_action(a: Node, b: Node) -> bool:
    if a.parsed_action is not None and b.parsed_action is not None:
        return a.parsed_action == b.parsed_action
    return a.action.strip() == b.action.strip() if (a.action or b.action) else a.action_ids == b.action_ids


# --- length policy, dedup, shared prefixes --------------------------------------------------


def _fit(s: Sample, tree: Tree, max_len: int | None, overflow: Overflow, stats: BuildStats) -> Sample | None:
    if max_len is None or len(s) <= max_len:
        return s
    if overflow == "error":
        raise UserError(
            f"tree {tree.task_id!r}", f"a {s.meta['kind']} sample has {len(s)} tokens, more than max_len={max_len}",
            "raise --max-len or pass --overflow drop or --overflow truncate (max_len=/overflow= in Python)")
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


def _set_prefix_lengths(samples: list[Sample]) -> None:
    """prefix_len = the longest common prefix with any other sample of the same tree.

    In lexicographic order the best partner of a sequence is one of its neighbours, so a sort and
    one pass over adjacent pairs suffice.
    """
    for s in samples:
        s.prefix_len = 0
    order = sorted(range(len(samples)), key=lambda i: samples[i].input_ids.tolist())
    for a, b in zip(order, order[1:]):
        common = common_prefix_length(samples[a].input_ids, samples[b].input_ids)
        samples[a].prefix_len = max(samples[a].prefix_len, common)
        samples[b].prefix_len = max(samples[b].prefix_len, common)
