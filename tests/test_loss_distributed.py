"""group_norms under torch.distributed (gloo, 2 CPU processes): every rank gets the global normalisers,
and the per-rank gradients, summed as data parallelism does, equal the gradient of one big batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leafe_fast.loss import group_norms, leafe_loss


def _batch():
    g = torch.Generator().manual_seed(7)
    n, h, v, m = 16, 12, 29, 30
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    rows = torch.randint(0, n, (m,), generator=g)
    targets = torch.randint(0, v, (m,), generator=g)
    weights = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    group = (torch.rand(m, generator=g) < 0.3).long()  # unequal group sizes on the two ranks
    return hidden, weight, rows, targets, weights, group


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hidden, weight, rows, targets, weights, group = _batch()
        mine = torch.arange(rows.numel()) % world == rank
        # two micro-batches per rank, global normalisers over micro-batches and ranks
        parts = [mine & (torch.arange(rows.numel()) % 4 < 2), mine & (torch.arange(rows.numel()) % 4 >= 2)]
        norms = group_norms([group[p] for p in parts], [weights[p] for p in parts], mode="weight")
        hidden.requires_grad_()
        weight.requires_grad_()
        total = sum(
            leafe_loss(hidden, weight, rows[p], targets[p], weights[p], group[p], norms=norms,
                       lambdas=(1.0, 0.5), impl="torch").loss
            for p in parts
        )
        total.backward()
        for t in (hidden.grad, weight.grad):
            dist.all_reduce(t)  # what DDP / FSDP do to gradients
        torch.save({"norms": norms, "d_hidden": hidden.grad, "d_weight": weight.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_data_parallel_gradient_equals_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    hidden, weight, rows, targets, weights, group = _batch()
    expect_norms = torch.zeros(2, dtype=torch.float64).index_add_(0, group, weights)
    hidden.requires_grad_()
    weight.requires_grad_()
    one = leafe_loss(hidden, weight, rows, targets, weights, group, norms=expect_norms, lambdas=(1.0, 0.5),
                     impl="torch").loss
    one.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["norms"].double(), expect_norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["d_hidden"], hidden.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["d_weight"], weight.grad, rtol=1e-6, atol=1e-7)
