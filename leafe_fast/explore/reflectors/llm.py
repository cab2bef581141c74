"""The LLM reflector: the policy reads its own trajectory and answers in strict JSON.

The reflection prompt is the trajectory's tokens exactly as they are (so an engine with a prefix
cache serves them) plus one user message asking for ``{"rollback_step": K, "experience": "..."}``.
A malformed reply (not one JSON object, a missing or mistyped key, an empty experience) is counted
and answered with a correction message naming the problem, and the model is asked again, up to
``retries`` more times. An out-of-range ``rollback_step`` is treated as malformed and asked again by
default (``invalid_step="retry"``); ``"clamp"`` moves it into range instead (recorded as ``clamped``).
The reflection exchange is not part of the tree: only its outcome (rollback + experience) is.
"""

from __future__ import annotations

import json
import re

from leafe_fast.engines.base import GenerationRequest, SamplingParams
from leafe_fast.explore.prompts import correction_message, reflection_request, valid_range
from leafe_fast.explore.reflectors.base import Reflection, ReflectGen, ReflectionContext, clamp_step, resolve_step

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class MalformedReflection(ValueError):
    """A reflection reply that is not the strict JSON asked for; the message says what is wrong."""


def parse_reflection(text: str) -> tuple[int, str]:
    """``(rollback_step, experience)`` from a reply that is exactly one JSON object.

    Tolerated: surrounding whitespace and one Markdown code fence around the object. Not tolerated:
    any other text, a non-integer step (``2.0``, ``"2"``, ``true``), an empty experience.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        raise MalformedReflection("the reply is empty")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise MalformedReflection(f"not a JSON object ({e.msg} at char {e.pos})") from None
    if not isinstance(obj, dict):
        raise MalformedReflection(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("rollback_step", "experience"):
        if key not in obj:
            raise MalformedReflection(f"the key {key!r} is missing")
    step, experience = obj["rollback_step"], obj["experience"]
    if isinstance(step, bool) or not isinstance(step, int):
        raise MalformedReflection(f"rollback_step must be an integer, got {json.dumps(step)}")
    if not isinstance(experience, str) or not experience.strip():
        raise MalformedReflection("experience must be a non-empty string")
    return step, experience.strip()


class LLMReflector:
    name = "llm"

    def __init__(
        self,
        *,
        retries: int = 2,
        invalid_step: str = "retry",
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ):
        if invalid_step not in ("clamp", "retry"):
            raise ValueError(f"LLMReflector: invalid_step must be 'clamp' or 'retry', got {invalid_step!r}")
        self.retries = retries
        self.invalid_step = invalid_step
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p

    def reflect(self, ctx: ReflectionContext) -> ReflectGen:
        chat = ctx.chat
        header = list(chat.header_ids)
        prompt = list(ctx.trajectory_ids) + list(chat.message_ids(reflection_request(ctx.n_steps, ctx.trigger)))
        prompt += header
        out = Reflection(rollback_step=None, source=self.name)
        for _ in range(1 + self.retries):
            room = ctx.remaining_tokens()
            if ctx.max_context_tokens is not None:
                room = min(room, ctx.max_context_tokens - len(prompt))
            max_new = min(self.max_new_tokens, room)
            if max_new < 1:
                out.note = "no token budget or context left to reflect"
                return out
            sampling = SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=max_new,
                stop_token_ids=tuple(chat.stop_ids),
                seed=ctx.seed(),
            )
            result = yield GenerationRequest(input_ids=prompt, sampling=sampling)
            out.attempts += 1
            text = chat.decode_action(result.output_ids)
            out.replies.append(text)
            try:
                step, experience = parse_reflection(text)
                resolved, out_of_range = resolve_step(step, ctx)
                if out_of_range and self.invalid_step == "retry":
                    raise MalformedReflection(f"rollback_step {step} is outside {valid_range(ctx)}")
            except MalformedReflection as e:
                out.malformed += 1
                out.note = str(e)
                out.invalid_step = str(e).startswith("rollback_step ") and " is outside " in str(e)
                correction = correction_message(str(e), ctx.n_steps, ctx.may_keep_all)
                prompt = prompt + list(chat.observation_ids(result.output_ids, correction)) + header
                continue
            if out_of_range:
                resolved, out.clamped = clamp_step(step, ctx), True
            out.rollback_step, out.invalid_step = resolved, False
            out.experience = experience
            out.note = "" if out.rollback_step is not None else "on track: no rollback"
            return out
        out.note = f"{out.malformed} malformed replies: {out.note}"
        return out
