"""The reproduction's tokenizer: a byte-level BPE trained on compact Sokoban text, Qwen2 chat template.

``leafe_fast.tiny.tiny_tokenizer`` spends one token per board cell (29 for a 5x5 compact board): the
attention cost of a from-scratch policy whose context holds every board of an episode grows with the
square of that. Trained on the benchmark's own texts (instructions, boards, feedback, diagnoses) with
merges allowed across whole lines, a board row becomes one or two tokens and a turn about half as many
tokens. Moves stay one token each (``u d l r``). Deterministic: the same levels give the same merges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A ``PreTrainedTokenizerFast`` (ChatML template) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # merges may span anything, newlines included: a board row and its newline become one token, and so
    # does "assistant\n", so the position that predicts a move is a token seen only in generation headers
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap(tok)


def wrap(backend: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = _TEMPLATE
    out.name_or_path = "leafe-repro-sokoban"
    return out


def save(tokenizer: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.backend_tokenizer.save(str(tmp))
    tmp.replace(path)


def load(path: Path) -> Any:
    from tokenizers import Tokenizer

    return wrap(Tokenizer.from_file(str(path)))


def sokoban_corpus(env: Any, tasks: Iterable[Any], seed: int = 0) -> list[str]:
    """Instructions, the boards and feedback of random-walk and solver episodes, and diagnoses."""
    import random

    rng = random.Random(seed)
    texts = [env.instructions(), "Experience from an earlier attempt that went wrong from this point on: "
             "Use it for your next action. Avoid: u. Avoid: d. Avoid: l. Avoid: r.", "u", "d", "l", "r"]
    texts += ["system\n", "user\n", "assistant\n"] * 50  # role lines of the chat template: one token each
    for task in tasks:
        texts.append(env.reset(task))
        history = []
        for d in task.spec.get("solution", []):
            r = env.step(env.action_text(d))
            texts.append(r.observation)
            if r.done:
                break
        env.reset(task)
        for _ in range(40):
            r = env.step(env.action_text(rng.choice(("up", "down", "left", "right"))))
            history.append(r)
            texts.append(r.observation)
            if r.done:
                break
        g = env.ground_reflection(history)
        if g is not None:
            texts.append(g.experience)
    return texts
