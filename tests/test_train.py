"""Trainer: global normalization across micro-batches, exact resume, export, metrics and the CLI."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_train_utils import ensure_packing, random_samples, tiny  # noqa: E402

ensure_packing()

from leafe_fast.train import LeafeCausalLM, TrainConfig, Trainer, load_model  # noqa: E402


def _reference_loss(model, samples, lambdas, mode="count"):
    """Plain LEAFE loss: stock forward one sample at a time, full logits, per-group normalization."""
    ce_sum = torch.zeros(2, dtype=torch.float64)
    norm = torch.zeros(2, dtype=torch.float64)
    terms = []
    for s in samples.to_samples():
        ids = torch.as_tensor(s.input_ids).long()
        logits = model(input_ids=ids[None]).logits[0].double()
        idx = torch.as_tensor(np.nonzero(s.target_mask)[0])
        ce = torch.nn.functional.cross_entropy(logits[idx - 1], ids[idx], reduction="none")
        terms.append((s.group, s.weight * ce.sum()))
        norm[s.group] += len(idx) if mode == "count" else s.weight * len(idx)
    loss = sum(lambdas[g] * t / norm[g] for g, t in terms)
    return loss, ce_sum


def test_accumulated_microbatches_equal_one_big_batch_and_plain_reference():
    from leafe_fast.loss import group_norms
    from leafe_fast.packing import pack

    tok, cfg = tiny("qwen2")
    samples = random_samples(10, len(tok), lo=2, hi=30, seed=1)
    lambdas = (1.0, 0.5)
    grads = {}
    for name, budget in (("small", 40), ("big", 1000)):
        model = load_model(cfg, dtype="float32", device="cpu", seed=7)
        wrapper = LeafeCausalLM(model, lambdas)
        mbs = [mb.to_torch("cpu") for mb in pack(samples, budget, seed=0).micro_batches]
        if name == "small":
            assert len(mbs) >= 4
        else:
            assert len(mbs) == 1
        norms = group_norms([b.group for b in mbs], [b.weights for b in mbs], num_groups=2, mode="weight")
        total = 0.0
        for b in mbs:
            out = wrapper(b, norms)
            out.loss.backward()
            total += float(out.loss.detach())
        grads[name] = ({n: p.grad.clone() for n, p in model.named_parameters()}, total)
    ref_model = load_model(cfg, dtype="float32", device="cpu", attn="sdpa", seed=7)
    ref_loss, _ = _reference_loss(ref_model, samples, lambdas, mode="weight")
    ref_loss.backward()
    for name in ("small", "big"):
        g, total = grads[name]
        assert abs(total - float(ref_loss)) < 1e-4, (name, total, float(ref_loss))
        for n, p in ref_model.named_parameters():
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    tok, cfg = tiny("llama")
    samples = random_samples(12, len(tok), seed=2)
    runs = []
    for ac in (False, True):
        model = load_model(cfg, dtype="float32", device="cpu", seed=1)
        t = Trainer(model, samples, TrainConfig(max_steps=3, token_budget=64, grad_accum=2, lr=1e-3,
                                                activation_checkpointing=ac, progress=False, peak_flops=None))
        runs.append(t.train().losses)
    assert runs[0] == runs[1]


def _trainer(cfg, tok, samples, out, **kw):
    model = load_model(cfg, dtype="float32", device="cpu", seed=5)
    conf = dict(max_steps=6, token_budget=64, grad_accum=2, lr=2e-3, warmup_steps=2, weight_decay=0.1,
                output_dir=str(out), save_every=3, progress=False, peak_flops=None)
    conf.update(kw)
    return Trainer(model, samples, TrainConfig(**conf), tokenizer=tok)


def test_resume_gives_identical_losses(tmp_path):
    tok, cfg = tiny("qwen2")
    samples = random_samples(14, len(tok), seed=3)
    full = _trainer(cfg, tok, samples, tmp_path / "full")
    assert full.steps_per_epoch < 6  # the run crosses an epoch boundary: the data position must survive
    want = full.train().losses
    first = _trainer(cfg, tok, samples, tmp_path / "split")
    part1 = first.train(steps=3).losses
    torch.manual_seed(1234)  # disturb the RNG: resume must restore it
    second = _trainer(cfg, tok, samples, tmp_path / "split", resume=True)
    assert second.step == 3
    part2 = second.train().losses
    assert len(want) == 6 and part1 + part2 == want  # bitwise on the CPU
    for (n, a), b in zip(full.wrapper.state_dict().items(), second.wrapper.state_dict().values()):
        assert torch.equal(a, b), n
    # metrics.jsonl: one record per step of each run, with per-group losses and throughput
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all("ce_rehearsal" in r and "ce_counterfactual" in r and r["tokens_per_s"] > 0 for r in lines)


def test_resume_without_checkpoint_starts_fresh_and_bad_path_errors(tmp_path):
    tok, cfg = tiny("qwen2")
    samples = random_samples(6, len(tok), seed=4)
    t = _trainer(cfg, tok, samples, tmp_path / "none", resume=True, max_steps=1)
    assert t.step == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _trainer(cfg, tok, samples, tmp_path / "x", resume=str(tmp_path / "missing"))


def test_export_reloads_in_transformers_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leafe_fast.train.model import packed_logits

    tok, cfg = tiny("llama")
    samples = random_samples(8, len(tok), seed=6)
    t = _trainer(cfg, tok, samples, tmp_path, max_steps=2, save_every=None, export=True)
    summary = t.train()
    assert summary.export == str(tmp_path / "final")
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "leafe_varlen" not in json.dumps(config)
    assert (tmp_path / "final" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == tok.chat_template
    ids = torch.randint(0, len(tok), (1, 9))
    with torch.no_grad():
        want = packed_logits(t.hf_model.eval(), ids[0], torch.arange(9), torch.tensor([0, 9]), 9)
        got = loaded(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cli_train_on_tiny_samples_file(tmp_path, capsys):
    from leafe_fast.cli import main

    tok, _ = tiny("qwen2")
    path = tmp_path / "samples.npz"
    random_samples(10, len(tok), seed=7).save(path)
    rc = main(["train", "--samples", str(path), "--model", "tiny", "--out", str(tmp_path / "run"), "--steps", "3",
               "--budget", "64", "--lr", "1e-3", "--save-every", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt").exists()
    assert "train: 3 steps" in capsys.readouterr().out
    # a samples file with ids outside the model's vocabulary is refused with a clear message
    bad = random_samples(3, 100000, seed=1)
    bad.save(tmp_path / "bad.npz")
    assert main(["train", "--samples", str(tmp_path / "bad.npz"), "--model", "tiny", "--out",
                 str(tmp_path / "bad"), "--steps", "1", "--no-progress"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="norm_mode"):
        TrainConfig(norm_mode="tokens")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_checkpoint_half_written_is_ignored_and_old_ones_pruned(tmp_path):
    from leafe_fast.train.checkpoint import latest_checkpoint

    tok, cfg = tiny("qwen2")
    samples = random_samples(8, len(tok), seed=8)
    t = _trainer(cfg, tok, samples, tmp_path, max_steps=3, save_every=1, keep_last=2)
    t.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    (root / ".tmp_step_00000009").mkdir()  # a crash in the middle of a save leaves only this behind
    assert latest_checkpoint(root) == root / "step_00000003"
    (root / "latest").unlink()  # without the pointer, the newest complete directory wins
    assert latest_checkpoint(root) == root / "step_00000003"


def test_throughput_and_mfu_arithmetic(tmp_path):
    from leafe_fast.train.metrics import MetricsLog, Throughput, flops_per_token
    from leafe_fast.train.model import count_parameters

    tok, cfg = tiny("qwen2")
    model = load_model(cfg, dtype="float32", device="cpu")
    n_all = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == n_all - model.get_input_embeddings().weight.numel()  # untied: lookup only
    meter = Throughput(flops_per_token(1000), peak_flops=1e9, world_size=2)
    meter._t -= 2.0  # pretend two seconds passed
    m = meter.measure(tokens=4000)
    assert abs(m["tokens_per_s"] - 2000) / 2000 < 0.01
    assert abs(m["mfu"] - 2000 * 6000 / 2e9) < 1e-4
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 2, "loss": torch.tensor(1.5).item()})
    log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]
