"""The Hugging Face integration: the README example runs as written, and its loss is leafe_loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

# The README's example, verbatim: the test executes this exact text.
README_HF_EXAMPLE = '''
from transformers import Trainer, TrainingArguments

from leafe_fast.integrations.hf import LeafeCollator, LeafeLossMixin
from leafe_fast.tiny import tiny_model, tiny_tokenizer

# Your model and tokenizer (here a tiny random one; AutoModelForCausalLM.from_pretrained(path) works too).
tokenizer = tiny_tokenizer("qwen2")
model = tiny_model(tokenizer)


def row(task, answer, group):
    """A chat prompt, then the answer as targets; group 0 = rehearsal, 1 = counterfactual."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": task}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    answer = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "group": group}


train_dataset = [
    row("Push the box onto the target.", "I will move left.", 0),
    row("The box is stuck in a corner.", "Move up.", 1),
    row("Write a Python program that prints 6.", "print(6)", 0),
    row("Feedback: test failed, expected 6 got 5.", "print(sum([1, 2, 3]))", 1),
]


class LeafeSFTTrainer(LeafeLossMixin, Trainer):  # the same line works with trl.SFTTrainer
    pass


trainer = LeafeSFTTrainer(
    model=model,
    args=TrainingArguments(
        output_dir="runs/hf-example", max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to="none",
    ),
    train_dataset=train_dataset,
    data_collator=LeafeCollator(),  # packs each batch into one varlen row: no padding
)
trainer.train()
'''


def _run_readme_example(tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(README_HF_EXAMPLE, "README_HF_EXAMPLE", "exec"), scope)
    return scope


def test_readme_example_trains_and_its_loss_is_leafe_loss(tmp_path, monkeypatch):
    from leafe_fast.integrations.hf import LeafeCollator, enable_packed_attention
    from leafe_fast.loss import leafe_loss
    from leafe_fast.tiny import tiny_model
    from leafe_fast.train.model import packed_hidden_states

    scope = _run_readme_example(tmp_path, monkeypatch)
    trainer, rows, tokenizer = scope["trainer"], scope["train_dataset"], scope["tokenizer"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2

    # Step 1 saw every row (batch size 4 = the dataset) with the initial weights: recompute it with
    # leafe_loss on the same packed batch and a fresh copy of the same initial model.
    initial = tiny_model(tokenizer)
    enable_packed_attention(initial)
    batch = LeafeCollator()(rows)
    hidden = packed_hidden_states(initial, batch["input_ids"][0], batch["position_ids"][0], batch["cu_seqlens"], batch["max_seqlen"])
    counts = torch.bincount(batch["group"], minlength=2).double()
    want = leafe_loss(hidden, initial.lm_head.weight, batch["rows"], batch["targets"], batch["weights"], batch["group"],
                      norms=counts, reduction="sum").loss.item()
    assert losses[0] == pytest.approx(want, rel=1e-3)  # the Trainer logs 4 significant digits
    assert losses[1] != pytest.approx(losses[0], rel=1e-6)  # the first step changed the weights
    # The model trained: its weights moved away from the initial ones.
    moved = any(not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), initial.parameters()))
    assert moved


def test_collator_matches_hf_loss_with_equal_groups(tmp_path):
    """With one group, leafe_compute_loss = HF's own token-mean CE over the padded batch."""
    from leafe_fast.integrations.hf import LeafeCollator, enable_packed_attention, leafe_compute_loss
    from leafe_fast.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    model = tiny_model(tok, seed=3).float()
    rng = np.random.default_rng(0)
    feats = []
    for L in (7, 13, 5):
        ids = rng.integers(0, len(tok), size=L).tolist()
        labels = [t if rng.random() < 0.6 else -100 for t in ids]
        labels[-1] = ids[-1]
        feats.append({"input_ids": ids, "labels": labels})
    # HF reference: padded batch, stock attention, model's own loss (mean over all target tokens)
    S = max(len(f["input_ids"]) for f in feats)
    pad = lambda x, v: x + [v] * (S - len(x))  # noqa: E731
    ref_model = copy.deepcopy(model)
    out = ref_model(
        input_ids=torch.tensor([pad(f["input_ids"], 0) for f in feats]),
        attention_mask=torch.tensor([[1] * len(f["input_ids"]) + [0] * (S - len(f["input_ids"])) for f in feats]),
        labels=torch.tensor([pad(f["labels"], -100) for f in feats]),
    )
    enable_packed_attention(model)
    batch = LeafeCollator()(feats)
    loss = leafe_compute_loss(model, batch)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    loss.backward()
    out.loss.backward()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_collator_formats_and_errors():
    from leafe_fast.integrations.hf import LeafeCollator

    coll = LeafeCollator()
    b = coll([
        {"input_ids": [5, 6, 7, 8], "labels": [5, -100, 7, 8], "group": 1, "weight": 0.5},  # labels[0] never predicted
        {"input_ids": [9, 10, 11], "completion_mask": [0, 0, 1]},
        {"input_ids": torch.tensor([12, 13])},  # no labels: every token after the first
    ])
    assert b["input_ids"].shape == (1, 9) and b["cu_seqlens"].tolist()[-1] == 9
    got = sorted(zip(b["targets"].tolist(), b["group"].tolist(), b["weights"].tolist()))
    assert got == [(7, 1, 0.5), (8, 1, 0.5), (11, 0, 1.0), (13, 0, 1.0)]
    ids = b["input_ids"][0]
    for r, t in zip(b["rows"].tolist(), b["targets"].tolist()):
        assert ids[r + 1].item() == t  # the hidden state at rows predicts the next token
        assert b["position_ids"][0, r + 1] != 0  # never across a sample boundary
    with pytest.raises(ValueError, match="differs from input_ids"):
        coll([{"input_ids": [1, 2, 3], "labels": [-100, 2, 4]}])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        coll([{"input_ids": [1, 2, 3], "labels": [-100, 2]}])
    with pytest.raises(KeyError, match="input_ids"):
        coll([{"labels": [1]}])
    with pytest.raises(ValueError, match="max_tokens=4"):
        LeafeCollator(max_tokens=4)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    with pytest.raises(ValueError, match="empty batch"):
        coll([])
    with pytest.raises(ValueError, match="no row of this batch has a target"):
        coll([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
    from leafe_fast.integrations.hf import leafe_compute_loss

    partial = {k: v for k, v in b.items() if k not in ("weights", "group")}  # not from LeafeCollator
    with pytest.raises(KeyError, match=r"batch lacks \['weights', 'group'\]"):
        leafe_compute_loss(torch.nn.Linear(1, 1), partial)


def test_mixin_normalizes_over_accumulated_step(tmp_path):
    """Gradient accumulation over 2 micro-batches gives the gradient of one batch of both."""
    from transformers import Trainer, TrainingArguments

    from leafe_fast.integrations.hf import LeafeCollator, LeafeLossMixin
    from leafe_fast.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    rng = np.random.default_rng(1)
    rows = []
    for j in range(4):
        ids = rng.integers(0, len(tok), size=int(rng.integers(6, 14))).tolist()
        labels = [-100] * 3 + ids[3:]
        rows.append({"input_ids": ids, "labels": labels, "group": j % 2})

    class T(LeafeLossMixin, Trainer):
        pass

    grads = []
    for bs, accum in ((4, 1), (2, 2)):
        model = tiny_model(tok, seed=5)
        args = TrainingArguments(output_dir=str(tmp_path / f"o{bs}"), max_steps=1, per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=accum, learning_rate=0.0, report_to="none",
                                 max_grad_norm=0.0, logging_steps=1)
        tr = T(model=model, args=args, train_dataset=rows, data_collator=LeafeCollator())
        captured: dict = {}
        tr.add_callback(_grad_grabber(captured, model))
        tr.train()
        grads.append((captured["g"], tr.state.log_history[0]["loss"]))
    (g1, l1), (g2, l2) = grads
    assert l1 == pytest.approx(l2, rel=1e-3)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _grad_grabber(store: dict, model):
    """A TrainerCallback that copies the gradients just before the optimizer step."""
    from transformers import TrainerCallback

    class GradGrab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            store["g"] = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    return GradGrab()
