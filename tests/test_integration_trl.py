"""The loss mixin drops into TRL's SFTTrainer: its first logged loss is the LEAFE loss of the batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _rows(tok):
    def row(task, answer, group):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": task}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ans = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        return {"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans, "group": group}

    return [
        row("Push the box onto the target.", "I will move left.", 0),
        row("The box is stuck in a corner.", "Move up.", 1),
        row("Write a program that prints 6.", "print(6)", 0),
        row("Test failed: expected 6 got 5.", "print(1 + 2 + 3)", 1),
    ]


def _expected_loss(model, rows) -> float:
    """Sum over groups of the mean token CE, each sample run alone (no packing, no fused kernel)."""
    ce = {0: [], 1: []}
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            labels = torch.tensor(r["labels"][1:])
            keep = labels != -100
            ce[r["group"]].append(F.cross_entropy(logits[keep], labels[keep], reduction="none"))
    return sum(torch.cat(v).mean().item() for v in ce.values())


def test_sft_trainer_with_leafe_mixin_logs_the_leafe_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from leafe_fast.integrations.hf import LeafeCollator, LeafeLossMixin
    from leafe_fast.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    model = tiny_model(tok)
    rows = _rows(tok)
    expected = _expected_loss(copy.deepcopy(model), rows)

    class LeafeSFTTrainer(LeafeLossMixin, SFTTrainer):
        pass

    trainer = LeafeSFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                       logging_steps=1, report_to="none", bf16=False, save_strategy="no"),
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=LeafeCollator(),
        processing_class=tok,
    )
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    assert logged[0] == pytest.approx(expected, rel=1e-4)
    assert logged[1] != logged[0]  # the optimizer step changed the model
