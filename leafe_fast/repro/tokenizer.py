"""The reproduction's tokenizer: a byte-level BPE trained on compact Sokoban text, Qwen2 chat template.

Board cells, the newlines between board rows and a lone move letter are never merged (``_ISOLATED``):
the policy must locate the player and the boxes on the grid, and a row that BPE turns into one opaque
token hides that. With rows merged, a 1.2M-parameter policy cloned for 600 steps stayed at chance
(greedy action accuracy 0.29 on held-out levels); with cells isolated it left chance after ~900 steps
(``leafe_fast.repro.pipeline`` records the settings). Instructions, feedback and diagnoses still merge
into words, and role lines (``assistant\n``) stay one token, so the position that predicts a move is
a token seen only in generation headers. The move in a diagnosis's ``Avoid: d.`` slot is the same
token as the action ``d``. Deterministic: the same levels give the same merges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Pieces BPE may not merge with anything: board cells, the newlines between board rows, and a move letter
# standing alone ("Avoid: d."). Role lines ("assistant\n") stay whole.
_ISOLATED = r"[#_XOP√S]|(?<!assistant|user|system)\n|\b[udlr]\b"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A ``PreTrainedTokenizerFast`` (ChatML template) trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_ISOLATED), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
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
