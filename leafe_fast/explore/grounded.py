"""The env-grounded reflector, for policies too small to reflect in JSON.

It asks the environment (``Env.ground_reflection``) where the current trajectory went wrong, from its
own diagnosis: a Sokoban deadlock, the code env's first failing test. No model call is made, so the
reflection costs no tokens. An env that knows nothing returns None: no branch is made.
"""

from __future__ import annotations

from leafe_fast.explore.reflection import Reflection, ReflectGen, ReflectionContext, resolve_step


class GroundedReflector:
    name = "grounded"

    def reflect(self, ctx: ReflectionContext) -> ReflectGen:
        out = Reflection(rollback_step=None, source=self.name)
        ground = getattr(ctx.env, "ground_reflection", None)
        if ground is None:
            raise TypeError(
                f"reflector 'grounded' needs Env.ground_reflection, which {type(ctx.env).__name__} lacks; "
                "use reflector 'llm'"
            )
        g = ground(list(ctx.history))
        if g is None:
            out.note = "the environment has no diagnosis"
            return out
        if not g.experience or not g.experience.strip():
            out.note = "the environment's diagnosis has no experience text"
            return out
        out.rollback_step, out.clamped = resolve_step(int(g.rollback_step), ctx)
        out.experience = g.experience.strip()
        if out.rollback_step is None:
            out.note = "on track: no rollback"
        return out
        yield  # a generator that asks the engine for nothing
