"""The progress bar of an exploration run: tasks done, success rate, prefix reuse, branches."""

from __future__ import annotations

import sys

from leafe_fast.explore.summary import ExploreSummary


class ExploreProgress:
    def __init__(self, total: int, *, enabled: bool = True):
        """``enabled`` and stderr a terminal: a bar; otherwise quiet (logs and CI stay clean)."""
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="explore", unit="task", file=sys.stderr, dynamic_ncols=True)

    def update(self, summary: ExploreSummary, n: int = 1) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        self.bar.set_postfix(
            ok=f"{summary.success_rate:.0%}",
            reuse=f"{summary.branch_reuse:.0%}",
            br=summary.branches,
            batch=f"{summary.mean_batch:.1f}",
            refresh=False,
        )

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
