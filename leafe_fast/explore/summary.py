"""``ExploreSummary``: the totals of an exploration run, built from the trees it wrote."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from leafe_fast.data.schema import Tree


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@dataclass
class ExploreSummary:
    out_path: str = ""
    mode: str = "leafe"  # leafe | independent
    reflector: str = ""  # llm | grounded | oracle | none
    ablation: bool = False  # the oracle reflector: never report as LEAFE
    tasks: int = 0  # tasks given
    skipped: int = 0  # already finished in the output file (resume)
    finished: int = 0  # trees written by this run
    successes: int = 0
    steps: int = 0
    branches: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    branch_prompt_tokens: int = 0
    branch_cached_tokens: int = 0
    reflections: int = 0
    malformed_reflections: int = 0
    failed_reflections: int = 0
    cut_actions: int = 0  # actions that stopped at the token limit
    invalid_actions: int = 0
    noop_actions: int = 0
    env_errors: int = 0  # tasks ended by an exception of their environment
    engine_calls: int = 0
    engine_requests: int = 0
    max_batch: int = 0
    wall_s: float = 0.0
    stop_reasons: dict[str, int] = field(default_factory=dict)

    def add_tree(self, tree: Tree) -> None:
        s = tree.stats
        self.finished += 1
        self.successes += int(tree.success)
        for key in ("steps", "branches", "generated_tokens", "prompt_tokens", "cached_tokens",
                    "branch_prompt_tokens", "branch_cached_tokens", "reflections",
                    "malformed_reflections", "failed_reflections", "cut_actions", "invalid_actions",
                    "noop_actions", "env_errors"):
            setattr(self, key, getattr(self, key) + int(s.get(key, 0)))
        reason = str(tree.meta.get("stop_reason", ""))
        self.stop_reasons[reason] = self.stop_reasons.get(reason, 0) + 1

    def add_batch(self, size: int) -> None:
        self.engine_calls += 1
        self.engine_requests += size
        self.max_batch = max(self.max_batch, size)

    @property
    def success_rate(self) -> float:
        return _ratio(self.successes, self.finished)

    @property
    def branch_reuse(self) -> float:
        """Share of branch-opening prompt tokens the engine served from its cache."""
        return _ratio(self.branch_cached_tokens, self.branch_prompt_tokens)

    @property
    def prefix_reuse(self) -> float:
        """Share of all prompt tokens (actions and reflections) served from cache."""
        return _ratio(self.cached_tokens, self.prompt_tokens)

    @property
    def mean_batch(self) -> float:
        return _ratio(self.engine_requests, self.engine_calls)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(success_rate=self.success_rate, branch_reuse=self.branch_reuse,
                 prefix_reuse=self.prefix_reuse, mean_batch=self.mean_batch)
        return d

    def format(self) -> str:
        label = f"{self.mode}, reflector {self.reflector}" + (" (ORACLE ABLATION, not LEAFE)" if self.ablation else "")
        extra = ""
        if self.cut_actions:
            extra += f"; {self.cut_actions} actions cut at the token limit"
        if self.env_errors:
            extra += f"; {self.env_errors} tasks ended by an environment error"
        return (
            f"explore [{label}]: {self.finished} trees written to {self.out_path} ({self.skipped} already there), "
            f"{self.successes} successful ({self.success_rate:.1%}); {self.steps} steps, "
            f"{self.branches} branches, {self.generated_tokens} tokens generated; prefix reuse "
            f"{self.branch_reuse:.1%} on branch prompts, {self.prefix_reuse:.1%} overall; "
            f"{self.reflections} reflections ({self.malformed_reflections} malformed replies, "
            f"{self.failed_reflections} without result); {self.engine_calls} engine calls, "
            f"mean batch {self.mean_batch:.1f}; {self.wall_s:.1f} s{extra}"
        )
