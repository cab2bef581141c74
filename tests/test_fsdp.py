"""FSDP2 on the CPU (gloo, 2 processes) gives the loss of one process on the same data, also across a
stop and a resume from the distributed checkpoint.

Each optimizer step covers the whole data set (grad_accum large), so the one-process run and the
two-rank run see the same targets per step even though the packer splits them differently; with the
global token normalization the two must agree to float rounding, in the first step (same weights)
and in later steps (same update, so FSDP's gradient reduction sums correctly).
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_train_utils import ensure_packing, random_samples, tiny  # noqa: E402

STEPS = 3


def _run(world: int, rank: int, out_dir: str, port: int) -> list[float]:
    ensure_packing()
    from leafe_fast.train import TrainConfig, Trainer, load_model

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok, cfg = tiny("qwen2", hidden_size=32, intermediate_size=64)
    samples = random_samples(16, len(tok), seed=5)

    def make(**kw):
        model = load_model(cfg, dtype="float32", device="cpu", seed=3)
        conf = TrainConfig(max_steps=STEPS, token_budget=64, grad_accum=64, lr=3e-3, max_grad_norm=1.0,
                           progress=False, output_dir=out_dir, save_every=2, export=True, peak_flops=None, **kw)
        return Trainer(model, samples, conf, tokenizer=tok)

    trainer = make()
    assert trainer.fsdp == (world > 1)
    if world == 1:
        return trainer.train().losses
    # the sharded run stops after 2 steps and a fresh trainer resumes from the distributed checkpoint
    first = trainer.train(steps=2).losses
    resumed = make(resume=True)
    assert resumed.step == 2
    return first + resumed.train().losses


def _worker(rank: int, world: int, out_dir: str, port: int, q) -> None:
    try:
        losses = _run(world, rank, out_dir, port)
        q.put((rank, losses, None))
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        q.put((rank, None, traceback.format_exc()))
        raise exc
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_cpu_ranks_match_one_process(tmp_path):
    single = _run(1, 0, str(tmp_path / "single"), 0)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "fsdp"), port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, losses, err = q.get(timeout=240)
        assert err is None, f"rank {rank} failed:\n{err}"
        results[rank] = losses
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # every rank logs the same all-reduced loss
    assert len(single) == STEPS
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)
    assert single[-1] < single[0]  # it trains

    # the FSDP run wrote a distributed checkpoint and a full safetensors export from rank 0
    ckpt = tmp_path / "fsdp" / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / ".metadata").exists() and (ckpt / "meta.pt").exists()
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "final")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
