"""Incremental chat deltas concatenate to exactly the template applied to the whole conversation."""

from __future__ import annotations

import random

import pytest

from leafe_fast.data.chat import ChatFormat, ChatTemplateError
from leafe_fast.tiny import tiny_tokenizer

STYLES = ["qwen2", "llama3"]
_PIECES = ["move", "left", " up", "Box", "é", "中文", "🙂", "#_O", "\n", "\n\n", "  ", "\t", " ", "42", "{\"a\": 1}", "ß"]


@pytest.fixture(scope="module", params=STYLES)
def fmt(request) -> ChatFormat:
    return ChatFormat.from_tokenizer(tiny_tokenizer(request.param))


def _text(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(lo, hi)))


def _action_text(rng: random.Random) -> str:
    # What a model emits right after the header: no whitespace at either end (Llama-3 templates
    # trim contents, and a leading newline would merge with the header's newline in BPE).
    text = _text(rng, 1, 10).strip()
    return text or "noop"


def _render(tok, msgs) -> list[int]:
    out = tok.apply_chat_template(msgs, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _random_conversation(fmt: ChatFormat, rng: random.Random, truncate: bool = False):
    """Returns (ids built from deltas, the same conversation as messages)."""
    msgs = [{"role": "user", "content": _text(rng, 1)}]
    if rng.random() < 0.7:
        msgs.insert(0, {"role": "system", "content": _text(rng, 1)})
    ids = fmt.prompt_ids(msgs)
    for _ in range(rng.randint(1, 4)):
        for _ in range(rng.choice([0, 0, 1, 2])):  # experience messages at this rollback point
            exp = "Experience: " + _text(rng)
            ids += fmt.message_ids(exp)
            msgs.append({"role": "user", "content": exp})
        content = _action_text(rng)
        action = fmt.encode_action(content)
        if truncate and rng.random() < 0.5:
            action = action[: -len(fmt.end_of_turn_ids)]  # cut off by max_new_tokens
            assert not fmt.ends_turn(action)
        assert fmt.decode_action(action) == content
        ids += fmt.header_ids + action
        msgs.append({"role": "assistant", "content": content})
        obs = _text(rng)
        ids += fmt.observation_ids(action, obs)
        msgs.append({"role": "user", "content": obs})
    return ids, msgs


def test_deltas_equal_whole_template_random_conversations(fmt):
    rng = random.Random(1234)
    for _ in range(40):
        ids, msgs = _random_conversation(fmt, rng)
        assert ids == _render(fmt.tokenizer, msgs)


def test_truncated_actions_get_end_of_turn_as_context(fmt):
    rng = random.Random(99)
    for _ in range(20):
        ids, msgs = _random_conversation(fmt, rng, truncate=True)
        assert ids == _render(fmt.tokenizer, msgs)


def test_header_and_stop_ids_match_the_family(fmt):
    tok = fmt.tokenizer
    header = tok.decode(fmt.header_ids)
    eot = tok.decode(fmt.end_of_turn_ids)
    if "<|im_start|>" in tok.chat_template:
        assert header == "<|im_start|>assistant\n"
        assert eot == "<|im_end|>" and tok.decode(fmt.closing_ids) == "\n"
    else:
        assert header == "<|start_header_id|>assistant<|end_header_id|>\n\n"
        assert eot == "<|eot_id|>" and fmt.closing_ids == []
    assert fmt.end_of_turn_ids[-1] in fmt.stop_ids and tok.eos_token_id in fmt.stop_ids
    # The generation prompt of a conversation = prompt deltas + header.
    msgs = [{"role": "user", "content": "hi"}]
    gen = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert fmt.prompt_ids(msgs) + fmt.header_ids == list(gen)


def test_conversation_ending_on_an_action_is_whole_rendering_minus_closing(fmt):
    msgs = [{"role": "user", "content": "task"}]
    ids = fmt.prompt_ids(msgs) + fmt.header_ids + fmt.encode_action("answer")
    whole = _render(fmt.tokenizer, msgs + [{"role": "assistant", "content": "answer"}])
    assert ids + fmt.closing_ids == whole


@pytest.mark.parametrize(
    "template, match",
    [
        # the message count in the header rewrites earlier tokens every turn
        (
            "<|im_start|>system\n{{ messages|length }}<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "not incremental",
        ),
        # the last message is rendered differently from earlier ones
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if loop.last %} (latest){% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "not incremental",
        ),
        # turn numbers: each delta depends on its position in the conversation
        (
            "{% for m in messages %}<|im_start|>{% if m['role'] == 'user' %}{{ loop.index }} {% endif %}{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "differ from the whole rendering",
        ),
        # assistant turns closed by plain text: nothing to stop generation on
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\nEND\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "end-of-turn",
        ),
    ],
)
def test_non_incremental_template_is_refused(template, match):
    tok = tiny_tokenizer("qwen2")
    tok.chat_template = template
    with pytest.raises(ChatTemplateError, match=match):
        ChatFormat.from_tokenizer(tok)


def test_missing_template_is_refused():
    tok = tiny_tokenizer("qwen2")
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatFormat.from_tokenizer(tok)
