"""Run the project's exploration loop on a real-package env with a scripted engine (no model).

The policy is deterministic in the prompt (a hash of it picks the move), and the reflector rolls
back to half the path, so a run branches and restores; running it at concurrency 1 and 2 must give
the same trees when each env is independent of the others (own RNG, exact restore).
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any

from leafe_fast.data.schema import read_trees
from leafe_fast.engines.scripted import ScriptedEngine
from leafe_fast.explore import ExploreConfig, explore
from leafe_fast.explore.reflectors.base import Reflection
from leafe_fast.tiny import tiny_tokenizer


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return tiny_tokenizer("qwen2")


class HalfRollback:
    """Rolls back to half the current path with a fixed experience; asks no model."""

    name = "half-rollback"

    def reflect(self, ctx: Any):
        if ctx.trigger == "periodic":
            return Reflection(rollback_step=None, note="periodic: go on")
        return Reflection(rollback_step=ctx.n_steps // 2, experience="Try different moves.", source="scripted")
        yield  # a generator that asks for nothing


def run_explore(out: Path, tasks: list, env: Any, *, concurrency: int, moves: list[str],
                max_steps: int = 14, max_branches: int = 2, **config: Any) -> dict[str, dict]:
    """Explore ``tasks``; return per task the node actions/observations, stop reason and branches."""
    tok = _tokenizer()

    def respond(request):
        text = tok.decode(request.input_ids)
        return moves[zlib.crc32(text.encode()) % len(moves)]

    engine = ScriptedEngine(respond, encode=lambda s: tok.encode(s, add_special_tokens=False), decode=tok.decode)
    cfg = ExploreConfig(concurrency=concurrency, max_steps=max_steps, max_depth=6, max_branches=max_branches,
                        reflect_every=0, max_new_tokens=16, progress=False, **config)
    explore(tasks, env, engine, tok, out, cfg, reflector=HalfRollback())
    return {
        tree.task_id: {
            "nodes": [(n.parent, n.action, n.observation, n.reward, n.done, n.success, n.feedback) for n in tree.nodes],
            "stop_reason": tree.meta.get("stop_reason"),
            "error": tree.meta.get("error"),
            "branches": tree.stats.get("branches", 0),
        }
        for tree in read_trees(out)
    }
