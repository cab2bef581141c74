"""Trainer configuration and the bugs of issue 10/11/14 in the trainer: config parts and their flags,
user errors that name the field or flag, the learning-rate schedule, resume refusals, metrics after a
resume, damaged checkpoints, host-side normalisers (step and epoch scope), FSDP2 sum reduction and
gradient-sync choice, flat vs computed tokens, the layout hook."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_train_utils import random_samples, tiny  # noqa: E402

from leafe_fast.errors import UserError  # noqa: E402
from leafe_fast.train import TrainConfig, Trainer, load_model  # noqa: E402
from leafe_fast.train.config import (  # noqa: E402
    CheckpointConfig,
    ComputeConfig,
    DataConfig,
    OptimConfig,
    part_classes,
)


def _trainer(tmp_path, samples=None, model_seed=5, **kw):
    tok, cfg = tiny("qwen2")
    samples = samples if samples is not None else random_samples(14, len(tok), seed=3)
    model = load_model(cfg, dtype="float32", device="cpu", seed=model_seed)
    conf = dict(max_steps=6, token_budget=64, grad_accum=2, lr=2e-3, output_dir=str(tmp_path), save_every=3,
                progress=False, peak_flops=None, export=False)
    conf.update(kw)
    return Trainer(model, samples, TrainConfig(**conf), tokenizer=tok)


# ------------------------------------------------------------------------------------------ config
def test_parts_and_flat_keywords_build_the_same_config():
    nested = TrainConfig(max_steps=3, optim=OptimConfig(lr=3e-4, warmup_steps=2),
                         data=DataConfig(token_budget=128, grad_accum=4, truncation="left"),
                         checkpoint=CheckpointConfig(keep_last=5), compute=ComputeConfig(precision="fp32"))
    flat = TrainConfig(max_steps=3, lr=3e-4, warmup_steps=2, token_budget=128, grad_accum=4, truncation="left",
                       keep_last=5, precision="fp32")
    assert nested == flat
    assert flat.data.token_budget == 128 and flat.optim.lr == 3e-4 and flat.checkpoint.keep_last == 5
    assert dataclasses.replace(flat, max_steps=7).data == flat.data  # replace keeps the parts
    with pytest.raises(TypeError, match="unknown option 'budget'"):
        TrainConfig(budget=64)
    # reads and writes of a part's field through the whole config reach that part (no stray attribute)
    assert flat.lr == 3e-4 and flat.token_budget == 128 and flat.output_dir is None
    flat.lr = 1e-2
    assert flat.optim.lr == 1e-2 and "lr" not in vars(flat)
    with pytest.raises(AttributeError, match="no field 'budget'"):
        flat.budget


def test_field_names_are_unique_across_parts_and_every_field_is_documented():
    seen: dict[str, str] = {f.name: "TrainConfig" for f in dataclasses.fields(TrainConfig)
                            if f.name not in part_classes()}
    for part, cls in part_classes().items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"{cls.__name__}.{f.name} clashes with {seen[f.name]}"
            seen[f.name] = cls.__name__
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("field,flag", [("token_budget", "--token-budget"), ("grad_accum", "--grad-accum"),
                                        ("max_steps", "--max-steps"), ("log_every", "--log-every")])
def test_zero_is_a_user_error_naming_field_and_flag(field, flag):
    with pytest.raises(UserError, match=f"{field} \\({flag}\\): must be >= 1, got 0"):
        TrainConfig(**{field: 0})


def test_cli_zero_values_exit_2_naming_the_flag(tmp_path, capsys):
    from leafe_fast.cli import main

    tok, _ = tiny("qwen2")
    path = tmp_path / "s.npz"
    random_samples(4, len(tok), seed=1).save(path)
    for flag in ("--grad-accum", "--token-budget", "--max-steps"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--samples", str(path), "--model", "tiny", "--out", str(tmp_path / "r"), flag, "0"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1, err


def test_cli_reaches_packing_truncation_keep_last_layout_and_loss_options(tmp_path):
    from leafe_fast.cli import build_parser
    from leafe_fast.train.command import train_config

    args = build_parser(["train"]).parse_args([
        "train", "--samples", "s.npz", "--model", "tiny", "--out", str(tmp_path), "--truncation", "left",
        "--pack-strategy", "balanced", "--keep-last", "7", "--layout", "flat", "--norm-scope", "step",
        "--grad-sync", "micro_batch", "--lambdas", "1", "0.25", "--warmup-steps", "3", "--no-export",
        "--max-grad-norm", "none", "--resume"])
    cfg = train_config(args)
    assert (cfg.data.truncation, cfg.data.pack_strategy, cfg.checkpoint.keep_last) == ("left", "balanced", 7)
    assert cfg.norm_scope == "step" and cfg.compute.grad_sync == "micro_batch"
    assert cfg.loss.lambdas == (1.0, 0.25) and cfg.optim.warmup_steps == 3 and cfg.optim.max_grad_norm is None
    assert cfg.checkpoint.export is False and cfg.checkpoint.resume is True
    assert cfg.checkpoint.output_dir == str(tmp_path)
    # untouched fields keep the dataclass defaults: they live once
    assert cfg.data.token_budget == DataConfig().token_budget and cfg.optim.lr == OptimConfig().lr


def test_cli_config_file_then_flags(tmp_path):
    from leafe_fast.cli import build_parser
    from leafe_fast.train.command import train_config

    conf = tmp_path / "train.json"
    conf.write_text(json.dumps({"optim": {"lr": 0.5}, "data": {"token_budget": 512}, "norm_scope": "step"}))
    args = build_parser(["train"]).parse_args(["train", "--samples", "s", "--model", "tiny", "--out", "o",
                                               "--config", str(conf), "--token-budget", "256"])
    cfg = train_config(args)
    assert cfg.optim.lr == 0.5 and cfg.data.token_budget == 256 and cfg.norm_scope == "step"
    conf.write_text(json.dumps({"data": {"grad_accum": "four"}}))
    with pytest.raises(UserError, match="grad_accum"):
        train_config(args)


# ------------------------------------------------------------------------------------------ schedule
def test_lr_schedule_first_step_is_not_zero():
    """The demo with 2 train steps used warm-up 1 and trained its first step at lr 0."""
    opt = OptimConfig(lr=1.0, warmup_steps=1)
    factors = [opt.lr_factor(s, 2) for s in range(2)]
    assert factors[0] > 0 and factors[1] == 1.0
    opt = OptimConfig(lr=1.0, warmup_steps=3)
    ramp = [opt.lr_factor(s, 10) for s in range(4)]
    assert ramp == [0.25, 0.5, 0.75, 1.0]
    # warm-up 0: the cosine of transformers' get_cosine_schedule_with_warmup, exactly (the stored trajectory)
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    hf = get_cosine_schedule_with_warmup(torch.optim.SGD([p], lr=1.0), 0, 6)
    want = []
    for _ in range(6):
        want.append(hf.get_last_lr()[0])
        hf.optimizer.step()
        hf.step()
    assert [OptimConfig(lr=1.0).lr_factor(s, 6) for s in range(6)] == want


def test_two_step_run_with_warmup_trains_at_nonzero_lr(tmp_path):
    t = _trainer(tmp_path, max_steps=2, warmup_steps=1, save_every=None, output_dir=None)
    t.train()
    assert all(r["lr"] > 0 for r in t.history), [r["lr"] for r in t.history]


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("change", [dict(token_budget=80), dict(seed=1), dict(grad_accum=3),
                                    dict(truncation="left"), dict(pack_strategy="balanced"),
                                    dict(keep_trees_together=True)])
def test_resume_refuses_changed_data_settings(tmp_path, change):
    _trainer(tmp_path).train(steps=3)
    name = next(iter(change))
    with pytest.raises(UserError, match=f"trained with {name}=.*different packing.*--{name.replace('_', '-')}"):
        _trainer(tmp_path, resume=True, **change)


def test_resume_refuses_other_samples(tmp_path):
    tok, _ = tiny("qwen2")
    _trainer(tmp_path, samples=random_samples(14, len(tok), seed=3)).train(steps=3)
    with pytest.raises(UserError, match="pack differently"):
        _trainer(tmp_path, samples=random_samples(14, len(tok), seed=4), resume=True)
    # a refused resume restores nothing: the weights and optimizer of the trainer stay as they were
    other = _trainer(tmp_path / "other", samples=random_samples(14, len(tok), seed=4), model_seed=9)
    before = {k: v.clone() for k, v in other.wrapper.state_dict().items()}
    with pytest.raises(UserError, match="pack differently"):
        other.resume(tmp_path / "checkpoints" / "step_00000003")
    assert all(torch.equal(before[k], v) for k, v in other.wrapper.state_dict().items())
    assert other.step == 0 and not other.optimizer.state
    # the same samples resume fine
    assert _trainer(tmp_path, samples=random_samples(14, len(tok), seed=3), resume=True).step == 3


def test_metrics_do_not_repeat_steps_after_a_resume(tmp_path):
    first = _trainer(tmp_path, save_every=3)
    first.train(steps=5)  # checkpoints at 3 and (end of this call) 5; metrics 1..5
    ck = tmp_path / "checkpoints"
    import shutil

    shutil.rmtree(ck / "step_00000005")  # as if killed before step 5's checkpoint: newest is step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and killed in the middle of a write
    second = _trainer(tmp_path, resume=True)
    assert second.step == 3
    second.train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fresh_run_into_a_run_directory_with_checkpoints_is_refused_and_metrics_restart(tmp_path):
    _trainer(tmp_path, max_steps=2, save_every=1).train()
    with pytest.raises(UserError, match="holds checkpoints of an earlier run .*--resume"):
        _trainer(tmp_path, max_steps=2, save_every=1)
    # without checkpoints to mix up, a fresh run starts metrics.jsonl over (one record per step)
    _trainer(tmp_path / "plain", max_steps=2, save_every=None).train()
    _trainer(tmp_path / "plain", max_steps=3, save_every=None).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_damaged_or_missing_state_pt_is_a_one_line_user_error(tmp_path, capsys):
    t = _trainer(tmp_path, max_steps=2, save_every=1)
    t.train()
    state = tmp_path / "checkpoints" / "step_00000002" / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"state.pt: is truncated or damaged .*delete .*step_00000002"):
        _trainer(tmp_path, max_steps=2, save_every=1, resume=True)
    state.unlink()
    with pytest.raises(UserError, match=r"state.pt: is missing"):
        _trainer(tmp_path, max_steps=2, save_every=1, resume=True)
    # through the CLI: exit 2 and one line, no traceback
    from leafe_fast.cli import main

    tok, _ = tiny("qwen2")
    path = tmp_path / "s.npz"
    random_samples(14, len(tok), seed=3).save(path)
    rc = main(["train", "--samples", str(path), "--model", "tiny", "--out", str(tmp_path), "--resume",
               str(tmp_path / "checkpoints" / "step_00000002"), "--token-budget", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "state.pt: is missing" in err and len(err.strip().splitlines()) == 1, err


def test_check_ranges_names_the_offending_value():
    tok, cfg = tiny("qwen2")
    t = Trainer(load_model(cfg, dtype="float32", device="cpu"), random_samples(4, len(tok), seed=1),
                TrainConfig(max_steps=1, progress=False, peak_flops=None))
    low = SimpleNamespace(input_ids=np.array([-3, 5], dtype=np.int32), group=np.zeros(1, dtype=np.int8))
    with pytest.raises(UserError, match="token id -3 is outside"):
        t._check_ranges([low])
    high = SimpleNamespace(input_ids=np.array([1, len(tok) + 4], dtype=np.int32), group=np.zeros(1, dtype=np.int8))
    with pytest.raises(UserError, match=f"token id {len(tok) + 4} is outside"):
        t._check_ranges([high])
    neg_group = SimpleNamespace(input_ids=np.array([1], dtype=np.int32), group=np.array([-1, 1], dtype=np.int8))
    with pytest.raises(UserError, match="group -1"):
        t._check_ranges([neg_group])


# ------------------------------------------------------------------------------------------ normalisers
def _token_shares(samples, budget, grad_accum, scope, lambdas=(1.0, 1.0), seed=0):
    """Each sample's share of the epoch objective: sum over its targets of lambda_g w / norm_g(step),
    divided by the epoch total, with norms from the trainer's own functions."""
    from leafe_fast.packing import pack
    from leafe_fast.train.trainer import local_step_counts, step_norms

    mbs = pack(samples, budget, seed=seed).micro_batches
    norms = step_norms(local_step_counts(mbs, grad_accum, 2, False), scope).numpy()
    share: dict[int, float] = {}
    for i, mb in enumerate(mbs):
        step = i // grad_accum
        # row -> sample: cu_seqlens bounds the samples of the micro-batch
        owner = np.searchsorted(mb.cu_seqlens, mb.rows, side="right") - 1
        for r, g in zip(owner, mb.group):
            sid = int(mb.sample_ids[r])
            share[sid] = share.get(sid, 0.0) + lambdas[g] / norms[step, g]
    total = sum(share.values())
    return {k: v / total for k, v in share.items()}


def test_epoch_scope_gives_a_counterfactual_token_the_same_weight_whatever_the_packing():
    tok, _ = tiny("qwen2")
    samples = random_samples(24, len(tok), lo=4, hi=60, seed=11)
    layouts = [(64, 1), (64, 3), (128, 2), (4096, 1)]
    for scope in ("epoch", "step"):
        shares = [_token_shares(samples, b, ga, scope) for b, ga in layouts]
        same = all(s.keys() == shares[0].keys() and all(abs(s[k] - shares[0][k]) < 1e-12 for k in s)
                   for s in shares[1:])
        # epoch scope: packing-independent; step scope: it is not (the defect this option removes)
        assert same == (scope == "epoch"), scope
    # and every counterfactual target weighs the same under epoch scope: lambda_1 / N_1 of the epoch
    from leafe_fast.data.columns import SampleColumns

    cols = samples if isinstance(samples, SampleColumns) else SampleColumns.from_samples(samples)
    shares = _token_shares(samples, 64, 3, "epoch")
    n_targets = {j: int(cols.target_mask[cols.offsets[j] + 1 : cols.offsets[j + 1]].sum())
                 for j in range(len(cols))}
    per_token = {j: shares[j] / n_targets[j] for j in shares}
    cf = [v for j, v in per_token.items() if cols.group[j] == 1]
    assert max(cf) - min(cf) < 1e-15


def test_epoch_scope_step_losses_average_to_the_per_group_means(tmp_path):
    """lr 0 (weights fixed): with epoch scope the mean step loss over one epoch is sum_g lambda_g mean_g,
    whatever the budget and accumulation; the trainer computes no normaliser on the device."""
    import leafe_fast.loss as loss_mod

    tok, cfg = tiny("qwen2")
    samples = random_samples(12, len(tok), lo=4, hi=40, seed=21)
    lambdas = (1.0, 0.5)
    means = []
    for budget, ga in ((48, 1), (64, 2), (2048, 1)):
        model = load_model(cfg, dtype="float32", device="cpu", seed=2)
        t = Trainer(model, samples, TrainConfig(token_budget=budget, grad_accum=ga, lr=0.0, lambdas=lambdas,
                                                norm_scope="epoch", progress=False, peak_flops=None,
                                                max_grad_norm=None))
        orig = loss_mod.group_norms
        loss_mod.group_norms = None  # any use of the device-side helper would fail
        try:
            t.train()
        finally:
            loss_mod.group_norms = orig
        assert len(t.history) == t.steps_per_epoch
        assert t.plan.norms.dtype == torch.float64
        # ce_<group> * targets_<group> is the step's sum of w_i * CE_i of the group (count mode)
        ce = {g: sum((r[f"ce_{n}"] or 0.0) * r[f"targets_{n}"] for r in t.history)
              / sum(r[f"targets_{n}"] for r in t.history) for g, n in enumerate(("rehearsal", "counterfactual"))}
        want = lambdas[0] * ce[0] + lambdas[1] * ce[1]
        got = sum(r["loss"] for r in t.history) / len(t.history)
        assert abs(got - want) < 1e-5 * want, (budget, ga, got, want)
        means.append(got)
    assert max(means) - min(means) < 1e-5 * means[0]


def test_step_scope_still_normalises_each_step_by_its_own_counts():
    tok, cfg = tiny("qwen2")
    samples = random_samples(12, len(tok), seed=22)
    model = load_model(cfg, dtype="float32", device="cpu", seed=2)
    t = Trainer(model, samples, TrainConfig(token_budget=48, grad_accum=2, lr=0.0, norm_scope="step",
                                            progress=False, peak_flops=None, max_grad_norm=None))
    t.train()
    for r in t.history:  # the step loss is exactly the step's per-group means summed (lambdas 1, 1)
        want = sum(r[f"ce_{n}"] or 0.0 for n in ("rehearsal", "counterfactual"))
        assert abs(r["loss"] - want) < 1e-5 * want


# ------------------------------------------------------------------------------------------ FSDP parts
class _Unit:
    def __init__(self, force_sum: bool = True):
        self.calls: list[str] = []
        if force_sum:
            self.set_force_sum_reduction_for_comms = lambda v: self.calls.append("force_sum")

    def set_gradient_divide_factor(self, v):
        self.calls.append("divide")


def test_sum_reduction_is_all_or_nothing():
    """The gloo fallback bug: units set to sum before one lacked the setter were then scaled again."""
    from leafe_fast.train.distributed import set_sum_reduction

    units = [_Unit(), _Unit(), _Unit(force_sum=False)]
    assert set_sum_reduction(units, force_sum=True) is False
    assert all(u.calls == [] for u in units)  # nobody sums: the caller's world-size scaling is right for all
    units = [_Unit(), _Unit()]
    assert set_sum_reduction(units, force_sum=True) is True
    assert all(u.calls == ["divide", "force_sum"] for u in units)
    assert set_sum_reduction([_Unit(force_sum=False)], force_sum=False) is True  # NCCL needs no force_sum


def test_grad_sync_auto_by_parameter_count():
    from leafe_fast.train.config import GRAD_SYNC_AUTO_PARAMS

    auto = ComputeConfig()
    assert not auto.sync_every_micro_batch(GRAD_SYNC_AUTO_PARAMS)
    assert auto.sync_every_micro_batch(GRAD_SYNC_AUTO_PARAMS + 1)
    assert ComputeConfig(grad_sync="micro_batch").sync_every_micro_batch(10)
    assert not ComputeConfig(grad_sync="step").sync_every_micro_batch(10**12)


# ------------------------------------------------------------------------------------------ metrics, layout
def test_flat_and_computed_tokens_are_logged_apart(tmp_path):
    t = _trainer(tmp_path, max_steps=1, save_every=None, output_dir=None)
    mbs, norms = t._next_step()
    rec = t.train_step(mbs, norms)
    assert rec["tokens"] == rec["computed_tokens"] == sum(mb.num_tokens for mb in mbs)  # flat layout
    # a trie batch computes fewer tokens than its samples hold (flat_tokens from the packer)
    fake = [SimpleNamespace(**{**mb.__dict__, "flat_tokens": mb.num_tokens + 10}) for mb in mbs]
    for f, mb in zip(fake, mbs):
        f.to_torch = mb.to_torch
    rec = t.train_step(fake, norms)
    assert rec["tokens"] == rec["computed_tokens"] + 10 * len(mbs)
    from leafe_fast.train.metrics import Throughput

    m = Throughput(6.0, peak_flops=1e3)
    m._t -= 1.0
    out = m.measure(100, 50)
    assert abs(out["tokens_per_s"] / out["computed_tokens_per_s"] - 2) < 1e-6
    assert abs(out["mfu"] - out["computed_tokens_per_s"] * 6.0 / 1e3) < 1e-9


def test_layout_is_handed_to_the_packer(monkeypatch):
    import leafe_fast.packing as packing

    seen = {}
    real = packing.pack

    def spy(*a, **kw):
        seen.update(kw)
        kw.pop("layout", None)
        return real(*a, **kw)

    monkeypatch.setattr(packing, "pack", spy)
    tok, cfg = tiny("qwen2")
    Trainer(load_model(cfg, dtype="float32", device="cpu"), random_samples(4, len(tok), seed=1),
            TrainConfig(max_steps=1, layout="trie", progress=False, peak_flops=None))
    assert seen["layout"] == "trie"


def test_normalisers_stay_exact_above_2_pow_24():
    """float32 (the old NCCL cast) rounds 2^24 + 1 to 2^24; the trainer's normalisers are float64 throughout."""
    from leafe_fast.train.trainer import step_norms

    big = np.array([[2.0**24 + 1, 3.0], [2.0**40 + 1, 1.0]])
    assert float(np.float32(big[0, 0])) != big[0, 0]  # the rounding in question
    step = step_norms(big, "step")
    assert step.dtype == torch.float64 and step[0, 0].item() == 2**24 + 1 and step[1, 0].item() == 2**40 + 1
    epoch = step_norms(big, "epoch")
    assert epoch[0, 0].item() == epoch[1, 0].item() == (2**24 + 1 + 2**40 + 1) / 2


def test_cli_resume_with_another_budget_is_one_line_exit_2(tmp_path, capsys):
    from leafe_fast.cli import main

    tok, _ = tiny("qwen2")
    path = tmp_path / "s.npz"
    random_samples(10, len(tok), seed=7).save(path)
    base = ["train", "--samples", str(path), "--model", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--save-every", "1", "--no-progress", "--no-export"]
    first = {"--token-budget": "64", "--grad-accum": "2", "--seed": "0"}
    assert main(base + [x for kv in first.items() for x in kv]) == 0
    capsys.readouterr()
    for flag, value in (("--token-budget", "96"), ("--seed", "3"), ("--grad-accum", "1")):
        changed = {**first, flag: value}
        assert main(base + [x for kv in changed.items() for x in kv] + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "different packing" in err and flag in err, err
