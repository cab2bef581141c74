"""Triton kernels of the fused LM-head cross-entropy, called directly (launcher level).

Runs on CUDA or under TRITON_INTERPRET=1 (CI); tiny shapes because the interpreter is slow. The
end-to-end loss tests (all options, edge cases) live in tests/test_loss.py and cover both backends.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(n=11, h=21, v=45, m=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEV, dtype)
    weight = torch.randn(v, h, generator=g).to(DEV, dtype)
    bias = torch.randn(v, generator=g).to(DEV, dtype)
    rows = torch.randint(0, n, (m,), generator=g).to(DEV)
    targets = torch.randint(0, v, (m,), generator=g).to(DEV)
    return hidden, weight, bias, rows, targets


def ref_logits(hidden, weight, bias, rows, softcap=None):
    z = hidden.double()[rows] @ weight.double().T + bias.double()
    return softcap * torch.tanh(z / softcap) if softcap else z


def test_smoke_test_runs_a_real_kernel():
    from leafe_fast.kernels.leafe_ce_triton import smoke_test

    assert smoke_test(DEV) < 1e-4


@pytest.mark.parametrize("splits", [1, 3, 64])  # 64 > V/BLOCK_V: some splits see no column at all
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_forward_split_merge_is_exact(splits, softcap):
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs()
    lse, tgt = K.forward(hidden, weight, bias, rows, targets, softcap, splits=splits)
    z = ref_logits(hidden, weight, bias, rows, softcap)
    torch.testing.assert_close(lse.double(), z.logsumexp(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tgt.double(), z.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["gemm", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_chunks_match_one_pass(dtype, mode):
    """Both backward schedules stage V in chunks; chunk edges off the tile grid change nothing."""
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs(dtype=dtype)
    rows[:5] = 2  # repeated rows meet in the same d_hidden slot
    lse, _ = K.forward(hidden, weight, bias, rows, targets, None)
    g = torch.rand(rows.numel(), device=DEV)
    one = K.backward(hidden, weight, bias, rows, targets, lse, g, None, 0.01, True, True, True, mode=mode)
    per_col = 4 * hidden.shape[1] if mode == "atomic" else rows.numel() * hidden.element_size()
    chunked = K.backward(hidden, weight, bias, rows, targets, lse, g, None, 0.01, True, True, True, mode=mode,
                         chunk_bytes=7 * per_col)  # 7 columns per chunk
    for a, b in zip(one, chunked):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    # against float64 autograd of the same per-row loss
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    z = hd[rows] @ wd.T + bd
    lse64 = z.logsumexp(1)
    loss = (g.double() * (lse64 - z.gather(1, targets[:, None]).squeeze(1) + 0.01 * lse64**2)).sum()
    expect = torch.autograd.grad(loss, [hd, wd, bd])
    tol = 1e-4 if dtype == torch.float32 else 2 * 2.0**-8  # bf16: dlogits and outputs rounded once each
    for a, b in zip(one, expect):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("mode", ["gemm", "atomic"])
def test_only_requested_gradients_are_computed(mode):
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs()
    lse, _ = K.forward(hidden, weight, None, rows, targets, None)
    g = torch.ones(rows.numel(), device=DEV)
    full = K.backward(hidden, weight, None, rows, targets, lse, g, None, 0.0, True, True, False, mode=mode)
    d_h, d_w, d_b = K.backward(hidden, weight, None, rows, targets, lse, g, None, 0.0, True, False, False, mode=mode)
    assert d_w is None and d_b is None and torch.allclose(d_h, full[0])
    d_h2, d_w2, _ = K.backward(hidden, weight, None, rows, targets, lse, g, None, 0.0, False, True, False, mode=mode)
    assert d_h2 is None and torch.allclose(d_w2, full[1])


def test_unknown_backward_mode_is_refused():
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs()
    lse = torch.zeros(rows.numel(), device=DEV)
    with pytest.raises(ValueError, match="mode must be"):
        K.backward(hidden, weight, None, rows, targets, lse, lse, None, 0.0, True, True, False, mode="magic")


def test_float64_is_refused_with_a_hint():
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        K.forward(hidden, weight, None, rows, targets, None)


@pytest.mark.parametrize("mode", ["gemm", "atomic"])
def test_leafe_loss_with_every_option_under_each_backward_mode(mode, monkeypatch):
    from leafe_fast.kernels import leafe_ce_triton as K
    from leafe_fast.loss import leafe_loss, reference_leafe_loss

    monkeypatch.setattr(K, "BACKWARD_MODE", mode)
    hidden, weight, bias, rows, targets = inputs(m=17)
    hidden, weight, bias = (x.requires_grad_() for x in (hidden, weight, bias))
    rows[:4] = 5
    weights = torch.rand(rows.numel(), device=DEV) + 0.5
    group = torch.arange(rows.numel(), device=DEV) % 3
    kw = dict(lambdas=(0.5, 1.0, 2.0), norms=torch.tensor([6.0, 6.0, 0.0]), bias=bias, z_loss=1e-3, softcap=5.0)
    out = leafe_loss(hidden, weight, rows, targets, weights, group, backend="triton", **kw)
    ref = reference_leafe_loss(hidden, weight, rows, targets, weights, group, **kw)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5)
    for a, b in zip(torch.autograd.grad(out.loss, [hidden, weight, bias]),
                    torch.autograd.grad(ref.loss, [hidden, weight, bias])):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["gemm", "atomic"])
def test_cuda_bf16_medium_shape_matches_reference(mode, monkeypatch):
    """Real tile sizes and autotuned configs (CUDA only): V spans many tiles and several forward splits."""
    from leafe_fast.kernels import leafe_ce_triton as K
    from leafe_fast.loss import leafe_loss, reference_leafe_loss

    monkeypatch.setattr(K, "BACKWARD_MODE", mode)
    hidden, weight, bias, rows, targets = inputs(n=700, h=320, v=5003, m=450, dtype=torch.bfloat16)
    hidden, weight = hidden.requires_grad_(), (weight / 16).detach().requires_grad_()
    weights = torch.ones(rows.numel(), device=DEV)
    group = torch.arange(rows.numel(), device=DEV) % 2
    out = leafe_loss(hidden, weight, rows, targets, weights, group, backend="triton", reduction="mean")
    ref = reference_leafe_loss(hidden, weight, rows, targets, weights, group, reduction="mean")
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out.loss, [hidden, weight]), torch.autograd.grad(ref.loss, [hidden, weight])):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=4 * 2.0**-8 * b.abs().max().item())
