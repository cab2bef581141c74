"""Incremental chat templating at the token level.

A trajectory is kept as token ids: the prompt, then for every step the assistant generation
header, the action exactly as the model generated it, and the template delta of the message that
followed. History is never decoded and re-encoded. ``ChatFormat`` produces those deltas by
rendering small probe conversations with the tokenizer's own chat template and taking token
differences, so the concatenation equals ``tokenizer.apply_chat_template`` over the whole
conversation (``tests/test_chat.py`` checks this for Qwen2- and Llama-3-style templates).

What holds and what does not:

- A template must be *incremental*: rendering a conversation plus one message extends the
  rendering of the conversation, and a message renders the same whatever came before it.
  ``from_tokenizer`` checks this on a probe conversation and raises ``ChatTemplateError`` when it
  fails (e.g. templates that render the last message specially, or that rewrite earlier
  assistant turns).
- Each delta starts at a special token (``<|im_start|>``, ``<|start_header_id|>``, ...), so its
  tokenization does not depend on the text before it; every call re-checks the prefix property.
- Action tokens are whatever the model generated. They equal the template's own tokenization only
  if the model produced the canonical tokenization of its text and text the template keeps as is
  (Llama-3 templates ``trim`` contents): training uses the generated ids, which is the point.
"""

from __future__ import annotations

from typing import Any, Sequence

from leafe_fast.errors import UserError

__all__ = ["ChatFormat", "ChatTemplateError"]

# Probe contents: plain words whose tokenization is the same alone and inside a rendering.
_PROBE_SYSTEM = "You are a probe."
_PROBE_USER = "Probe question."
_PROBE_ANSWER = "Probe answer."


class ChatTemplateError(UserError):
    """The tokenizer's chat template is missing or cannot be applied one message at a time: the model
    chosen (``--model``) does not fit, a user's mistake reported as one line by the CLI."""

    def __init__(self, problem: str) -> None:
        super().__init__("--model", problem, "use a chat/instruct model whose template renders message by message")


def _as_ids(rendered: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding for tokenize=True unless return_dict=False.
    if hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    ids = list(rendered)
    if ids and isinstance(ids[0], (list, tuple)):
        ids = list(ids[0])
    return [int(i) for i in ids]


def _startswith(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    return len(ids) >= len(prefix) and list(ids[: len(prefix)]) == list(prefix)


class ChatFormat:
    """Token deltas of one tokenizer's chat template (see the module docstring).

    The trajectory layout built from these deltas lives in ``leafe_fast.trajectory``.
    """

    header_ids: list[int]
    stop_ids: list[int]
    end_of_turn_ids: list[int]
    closing_ids: list[int]

    def __init__(
        self,
        tokenizer: Any,
        *,
        base: list[dict[str, str]],
        header_ids: list[int],
        end_of_turn_ids: list[int],
        closing_ids: list[int],
        stop_ids: list[int],
    ):
        self.tokenizer = tokenizer
        self._base = base
        self._base_with_answer = base + [{"role": "assistant", "content": _PROBE_ANSWER}]
        self.header_ids = list(header_ids)
        self.end_of_turn_ids = list(end_of_turn_ids)
        self.closing_ids = list(closing_ids)
        self.stop_ids = list(stop_ids)
        self._base_ids = self._render(self._base)
        self._base_with_answer_ids = self._render(self._base_with_answer)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatFormat":
        """Derive the segments from the tokenizer's chat template and verify it is incremental."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
                "set tokenizer.chat_template to the model family's template"
            )
        render = lambda msgs, gen=False: _as_ids(  # noqa: E731
            tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        )
        base = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
        try:
            base_ids = render(base)
        except Exception:  # some templates reject a system role; probe without one
            base = base[1:]
            base_ids = render(base)

        gen_ids = render(base, True)
        if not _startswith(gen_ids, base_ids) or len(gen_ids) == len(base_ids):
            raise ChatTemplateError(
                "chat template is not incremental: add_generation_prompt=True does not append a "
                "generation header to the rendered conversation"
            )
        header_ids = gen_ids[len(base_ids) :]

        answered = render(base + [{"role": "assistant", "content": _PROBE_ANSWER}])
        if not _startswith(answered, gen_ids):
            raise ChatTemplateError(
                "chat template is not incremental: an assistant turn does not render as "
                "generation header + content (the header differs from the one used for generation)"
            )
        rest = answered[len(gen_ids) :]
        content_ids = list(tokenizer.encode(_PROBE_ANSWER, add_special_tokens=False))
        if not _startswith(rest, content_ids):
            raise ChatTemplateError(
                "chat template is not incremental: the assistant content is not rendered verbatim "
                "right after the generation header"
            )
        suffix = rest[len(content_ids) :]
        special = _special_ids(tokenizer)
        cut = next((i for i, t in enumerate(suffix) if t in special), None)
        if cut is None:
            raise ChatTemplateError(
                "chat template closes an assistant turn without a special end-of-turn token "
                f"(suffix ids {suffix}); generation could not stop on it"
            )
        end_of_turn_ids = suffix[: cut + 1]
        closing_ids = suffix[cut + 1 :]
        stop_ids = [end_of_turn_ids[-1]]
        eos = tokenizer.eos_token_id
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if e is not None and int(e) not in stop_ids:
                stop_ids.append(int(e))

        fmt = cls(
            tokenizer,
            base=base,
            header_ids=header_ids,
            end_of_turn_ids=end_of_turn_ids,
            closing_ids=closing_ids,
            stop_ids=stop_ids,
        )
        fmt._self_check()
        return fmt

    def _self_check(self) -> None:
        """Build a longer conversation from deltas and compare with the whole rendering."""
        from leafe_fast.trajectory import Trajectory

        traj = Trajectory(self.prompt_ids(self._base), self.header_ids)
        first, second = self.encode_action("First move: left."), self.encode_action("Second move.")
        traj.add_step_ids(first, self.observation_ids(first, "Observation:\n# _ P\nfeedback none"))
        traj.add_step_ids(second, self.observation_ids(second, "Done?"),
                          experience_ids=self.message_ids("Experience: avoid corners."))
        ids = traj.ids
        msgs = list(self._base) + [
            {"role": "assistant", "content": "First move: left."},
            {"role": "user", "content": "Observation:\n# _ P\nfeedback none"},
            {"role": "user", "content": "Experience: avoid corners."},
            {"role": "assistant", "content": "Second move."},
            {"role": "user", "content": "Done?"},
        ]
        want = self._render(msgs)
        if ids != want:
            i = next((k for k, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
            raise ChatTemplateError(
                "chat template is not incremental: message deltas concatenated differ from the "
                f"whole rendering at token {i} (deltas: {self.tokenizer.decode(ids[i:i + 12])!r}, "
                f"template: {self.tokenizer.decode(want[i:i + 12])!r})"
            )

    # --- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        return _as_ids(
            self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
            )
        )

    def _delta(self, context: list[dict[str, str]], context_ids: list[int], message: dict[str, str]) -> list[int]:
        ids = self._render(context + [message])
        if not _startswith(ids, context_ids):
            raise ChatTemplateError(
                f"chat template is not incremental for a {message['role']!r} message "
                f"(content starts {message['content'][:40]!r}): it changes the tokens before it"
            )
        return ids[len(context_ids) :]

    # --- public deltas -----------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The first messages (system, task, first observation) rendered whole, without header."""
        if not messages:
            raise ValueError("prompt_ids: need at least one message")
        return self._render(list(messages))

    def message_ids(self, content: str, role: str = "user") -> list[int]:
        """Delta of a message following a non-assistant message (e.g. an experience message)."""
        return self._delta(self._base, self._base_ids, {"role": role, "content": content})

    def observation_ids(self, action_ids: Sequence[int], content: str, role: str = "user") -> list[int]:
        """Delta after an assistant action: the template's closing tokens of the assistant turn
        (plus its end-of-turn token(s) when ``action_ids`` was cut off without them: context, not
        targets), then the new message. No generation header."""
        delta = self._delta(self._base_with_answer, self._base_with_answer_ids, {"role": role, "content": content})
        close = list(self.closing_ids)
        if not self.ends_turn(action_ids):
            close = list(self.end_of_turn_ids) + close
        return close + delta

    def ends_turn(self, action_ids: Sequence[int]) -> bool:
        """True when ``action_ids`` ends with the template's end-of-turn token(s)."""
        n = len(self.end_of_turn_ids)
        return len(action_ids) >= n and list(action_ids[-n:]) == self.end_of_turn_ids

    def encode_action(self, content: str) -> list[int]:
        """Tokens an assistant would generate for ``content``: its tokens plus end-of-turn.
        For scripted policies and tests; real actions come from the engine."""
        return list(self.tokenizer.encode(content, add_special_tokens=False)) + self.end_of_turn_ids

    def decode_action(self, action_ids: Sequence[int]) -> str:
        """The action text, without the end-of-turn token (or a trailing stop id)."""
        ids = list(action_ids)
        if self.ends_turn(ids):
            ids = ids[: len(ids) - len(self.end_of_turn_ids)]
        elif ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids
