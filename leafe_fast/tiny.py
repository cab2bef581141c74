"""Tiny tokenizers and random models built in-process, for tests, the CPU demo and benchmarks.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in a fraction of a
second on a built-in corpus, with a chat template of the chosen family, and the model is a
random-init transformers model from a config. Real checkpoints are loaded from local paths instead.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

Style = Literal["qwen2", "llama3"]

# Jinja chat templates written for this project, in the shape of the two families' own templates:
# ChatML (Qwen2) and header/eot (Llama-3). What matters for tests is the token structure.
_TEMPLATES: dict[str, str] = {
    "qwen2": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}

_SPECIALS: dict[str, dict[str, str | list[str]]] = {
    "qwen2": {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    },
    "llama3": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "additional": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
}

_CORPUS = """\
You are an agent playing Sokoban. Push every box onto a target. Actions: up, down, left, right.
The map uses # for walls, _ for floor, O for targets, X for boxes, P for the player.
I will move up. I will move down. I will move left. I will move right. Move up. Move left.
Feedback: the box is stuck in a corner, a deadlock. Experience: avoid pushing boxes into corners.
{"rollback_step": 2, "experience": "Push the box left before going up."}
Write a Python program that reads from standard input and prints the answer.
def main():\n    n = int(input())\n    print(sum(map(int, input().split())))\nmain()
Test failed: input 3 expected 6 got 5. Runtime error: IndexError: list index out of range.
The quick brown fox jumps over the lazy dog 0123456789 ()[]{}<>=+-*/%:;,.!?'"`~@$^&|\\
"""


@lru_cache(maxsize=4)
def _trained_tokenizer_json(style: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(_SPECIALS[style]["additional"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(style: Style = "qwen2", vocab_size: int = 512):
    """A byte-level BPE tokenizer with the chat template and special tokens of ``style``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style not in _TEMPLATES:
        raise ValueError(f"tiny_tokenizer: unknown style {style!r}; choose from {sorted(_TEMPLATES)}")
    spec = _SPECIALS[style]
    backend = Tokenizer.from_str(_trained_tokenizer_json(style, vocab_size))
    kwargs = {k: v for k, v in spec.items() if k != "additional"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok.chat_template = _TEMPLATES[style]
    tok.name_or_path = f"leafe-tiny-{style}"
    return tok


def tiny_config(
    tokenizer,
    family: Literal["qwen2", "llama"] = "qwen2",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(family)
    if cls is None:
        raise ValueError(f"tiny_config: unknown family {family!r}; choose 'qwen2' or 'llama'")
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def tiny_model(tokenizer, family: Literal["qwen2", "llama"] = "qwen2", *, seed: int = 0, **config_kwargs):
    """A random-init causal LM sized for CPU tests (about 0.1M parameters by default)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(tokenizer, family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()
