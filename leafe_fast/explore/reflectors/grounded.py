"""The env-grounded reflector, for policies too small to reflect in JSON.

It asks the environment (``Env.ground_reflection``) where the current trajectory went wrong, from its
own knowledge: a Sokoban deadlock, the code env's first failing test. No model call is made, so the
reflection costs no tokens. An env that knows nothing returns None: no branch is made.

Two modes (``leafe_fast.envs.base.GROUNDING_MODES``):

- ``diagnosis`` (reflector name ``"grounded"``, the default): which step went wrong and why, phrased
  like feedback an agent could derive from what it saw. This stands in for LEAFE's own reflection.
- ``oracle`` (reflector name ``"oracle"``): the environment may hand over the expert's answer (for
  Sokoban a solver's plan). That is expert relabelling, not reflection: an ablation, labelled as such
  in trees (``meta["ablation"]``), run summaries and reports.

A depth cutoff (trigger ``"depth"``) ends the attempt although the env did not: the last step is
passed with ``done=True`` so the env diagnoses a finished, failed attempt (a stall), not a running one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from leafe_fast.envs.base import GROUNDING_MODES
from leafe_fast.explore.reflectors.base import Reflection, ReflectGen, ReflectionContext, resolve_step


class GroundedReflector:
    """Reflection by ``env.ground_reflection(history, mode=...)``; ``mode`` is one of GROUNDING_MODES."""

    def __init__(self, mode: str = "diagnosis"):
        if mode not in GROUNDING_MODES:
            raise ValueError(f"GroundedReflector: mode must be one of {GROUNDING_MODES}, got {mode!r}")
        self.mode = mode
        self.name = "oracle" if mode == "oracle" else "grounded"
        self.ablation = mode == "oracle"

    def reflect(self, ctx: ReflectionContext) -> ReflectGen:
        out = Reflection(rollback_step=None, source=self.name)
        ground = getattr(ctx.env, "ground_reflection", None)
        if ground is None:
            raise TypeError(
                f"reflector {self.name!r} needs Env.ground_reflection, which {type(ctx.env).__name__} lacks; "
                "use reflector 'llm'"
            )
        history = list(ctx.history)
        if ctx.trigger == "depth" and history and not history[-1].done:
            history[-1] = dataclasses.replace(history[-1], done=True)  # the cutoff ended this attempt
        if _takes_mode(ground):
            g = ground(history, mode=self.mode)
        elif self.mode == "diagnosis":
            g = ground(history)  # an env written before GROUNDING_MODES: its answer is its diagnosis
        else:
            raise TypeError(f"{type(ctx.env).__name__}.ground_reflection takes no mode, so it has no oracle mode")
        if g is None:
            out.note = "the environment has no diagnosis"
            return out
        if not g.experience or not g.experience.strip():
            out.note = "the environment's diagnosis has no experience text"
            return out
        step, invalid = resolve_step(int(g.rollback_step), ctx)
        if invalid:
            out.invalid_step = True
            out.note = f"the environment's rollback_step {g.rollback_step} is outside 0..{ctx.n_steps - 1}"
            return out
        out.rollback_step = step
        out.experience = g.experience.strip()
        if out.rollback_step is None:
            out.note = "on track: no rollback"
        return out
        yield  # a generator that asks the engine for nothing


def _takes_mode(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return "mode" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
