"""Triton kernels of the fused LM-head cross-entropy, called directly (launcher level).

Runs on CUDA or under TRITON_INTERPRET=1 (CI); tiny shapes because the interpreter is slow. The
end-to-end loss tests (all options, edge cases, every named implementation) live in tests/test_loss.py;
the "chunked" schedule's own exactness tests in tests/test_loss_chunked.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from leafe_fast.kernels.leafe_ce_operands import GradNeeds, LossHead

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ALL = GradNeeds(hidden=True, weight=True, bias=True)


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


@pytest.mark.parametrize("splits", [None, 1, 3, 64])  # 64 > V/BLOCK_V: some splits see no column at all
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_forward_split_merge_is_exact(splits, softcap):
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs()
    lse, tgt = K.forward(LossHead(hidden, weight, bias, rows, targets, softcap), splits=splits)
    z = ref_logits(hidden, weight, bias, rows, softcap)
    torch.testing.assert_close(lse.double(), z.logsumexp(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tgt.double(), z.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)


def test_forward_merges_stale_partial_rows_away():
    """The split count follows the config's BLOCK_M; buffer rows a config leaves unwritten have s = 0.
    A buffer pre-filled with garbage partials beyond the used splits must not change the result."""
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs()
    head = LossHead(hidden, weight, bias, rows, targets)
    lse1, _ = K.forward(head, splits=1)
    lse3, _ = K.forward(head, splits=3)
    torch.testing.assert_close(lse1, lse3, rtol=1e-6, atol=1e-6)


def _expected_grads(hidden, weight, bias, rows, targets, g, z_loss):
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    z = hd[rows] @ wd.T + bd
    lse64 = z.logsumexp(1)
    loss = (g.double() * (lse64 - z.gather(1, targets[:, None]).squeeze(1) + z_loss * lse64**2)).sum()
    return torch.autograd.grad(loss, [hd, wd, bd])


@pytest.mark.parametrize("schedule", ["gemm", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_chunks_match_one_pass(dtype, schedule):
    """Both recompute schedules stage V in chunks; chunk edges off the tile grid change nothing."""
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs(dtype=dtype)
    rows[:5] = 2  # repeated rows meet in the same d_hidden row
    head = LossHead(hidden, weight, bias, rows, targets, None, 0.01)
    lse, _ = K.forward(head)
    g = torch.rand(rows.numel(), device=DEV)
    one = K.backward(head, lse, g, ALL, schedule)
    per_col = 4 * hidden.shape[1] if schedule == "atomic" else rows.numel() * hidden.element_size()
    chunked = K.backward(head, lse, g, ALL, schedule, chunk_bytes=7 * per_col)  # 7 columns per chunk
    for a, b in zip(one, chunked):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    expect = _expected_grads(hidden, weight, bias, rows, targets, g, 0.01)
    # bf16: dlogits and outputs rounded once each, repeated rows added in bf16 (one more rounding)
    tol = 1e-4 if dtype == torch.float32 else 3 * 2.0**-8
    for a, b in zip(one, expect):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("schedule", ["gemm", "atomic"])
def test_only_requested_gradients_are_computed(schedule):
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs()
    head = LossHead(hidden, weight, None, rows, targets)
    lse, _ = K.forward(head)
    g = torch.ones(rows.numel(), device=DEV)
    full = K.backward(head, lse, g, GradNeeds(True, True, False), schedule)
    d_h, d_w, d_b = K.backward(head, lse, g, GradNeeds(True, False, False), schedule)
    assert d_w is None and d_b is None and torch.allclose(d_h, full[0])
    d_h2, d_w2, _ = K.backward(head, lse, g, GradNeeds(False, True, False), schedule)
    assert d_h2 is None and torch.allclose(d_w2, full[1])


def test_unknown_schedule_is_refused():
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs()
    lse = torch.zeros(rows.numel(), device=DEV)
    with pytest.raises(ValueError, match="schedule must be"):
        K.backward(LossHead(hidden, weight, None, rows, targets), lse, lse, ALL, "magic")


def test_float64_is_refused_with_a_hint():
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='torch'"):
        K.forward(LossHead(hidden, weight, None, rows, targets))


def test_transposed_weight_is_refused_not_misread():
    """A [V, H] view of a transposed [H, V] tensor has strides (1, V): the kernels would read it wrongly."""
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, _, rows, targets = inputs()
    weight_t = weight.T.contiguous().T  # same values, column-major
    assert weight_t.stride(-1) != 1
    with pytest.raises(ValueError, match="weight must be contiguous in its last dimension"):
        K.forward(LossHead(hidden, weight_t, None, rows, targets))


def test_transposed_weight_through_the_loss_gives_the_right_values():
    """leafe_loss makes such a weight contiguous before the kernels see it."""
    from leafe_fast.loss import leafe_loss, reference_leafe_loss

    hidden, weight, _, rows, targets = inputs()
    weight_t = weight.T.contiguous().T
    w = torch.ones(rows.numel(), device=DEV)
    grp = torch.zeros(rows.numel(), dtype=torch.long, device=DEV)
    for impl in ("chunked", "triton_gemm"):
        out = leafe_loss(hidden, weight_t, rows, targets, w, grp, impl=impl)
        ref = reference_leafe_loss(hidden, weight, rows, targets, w, grp)
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)


def test_launchers_do_not_sync_with_the_host(monkeypatch):
    """No torch.unique / .item() / .tolist() in the launchers: each would be a device sync per micro-batch."""
    from leafe_fast.kernels import leafe_ce_triton as K

    def boom(*_a, **_k):
        raise AssertionError("host sync in a launcher")

    hidden, weight, bias, rows, targets = inputs()
    rows[:3] = 4
    head = LossHead(hidden, weight, bias, rows, targets)
    monkeypatch.setattr(torch, "unique", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    lse, _ = K.forward(head)
    g = torch.rand(rows.numel(), device=DEV)
    for schedule in ("gemm", "atomic"):
        K.backward(head, lse, g, ALL, schedule)
    K.forward_backward(head, g, ALL)


@pytest.mark.parametrize("impl", ["chunked", "triton_gemm", "triton_atomic"])
def test_leafe_loss_with_every_option_under_each_impl(impl):
    from leafe_fast.loss import LossOptions, leafe_loss, reference_leafe_loss

    hidden, weight, bias, rows, targets = inputs(m=17)
    hidden, weight, bias = (x.requires_grad_() for x in (hidden, weight, bias))
    rows[:4] = 5
    weights = torch.rand(rows.numel(), device=DEV) + 0.5
    group = torch.arange(rows.numel(), device=DEV) % 3
    opts = LossOptions(lambdas=(0.5, 1.0, 2.0), z_loss=1e-3, softcap=5.0, impl=impl)
    kw = dict(norms=torch.tensor([6.0, 6.0, 0.0]), bias=bias)
    out = leafe_loss(hidden, weight, rows, targets, weights, group, options=opts, **kw)
    ref = reference_leafe_loss(hidden, weight, rows, targets, weights, group, options=opts, **kw)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5)
    for a, b in zip(torch.autograd.grad(out.loss, [hidden, weight, bias]),
                    torch.autograd.grad(ref.loss, [hidden, weight, bias])):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton_gemm", "triton_atomic"])
def test_cuda_bf16_medium_shape_matches_reference(impl):
    """Real tile sizes and autotuned configs (CUDA only): V spans many tiles and several forward splits."""
    from leafe_fast.loss import leafe_loss, reference_leafe_loss

    hidden, weight, bias, rows, targets = inputs(n=700, h=320, v=5003, m=450, dtype=torch.bfloat16)
    hidden, weight = hidden.requires_grad_(), (weight / 16).detach().requires_grad_()
    weights = torch.ones(rows.numel(), device=DEV)
    group = torch.arange(rows.numel(), device=DEV) % 2
    out = leafe_loss(hidden, weight, rows, targets, weights, group, impl=impl, reduction="mean")
    ref = reference_leafe_loss(hidden, weight, rows, targets, weights, group, reduction="mean")
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out.loss, [hidden, weight]), torch.autograd.grad(ref.loss, [hidden, weight])):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=4 * 2.0**-8 * b.abs().max().item())


@pytest.mark.parametrize("schedule", ["gemm", "atomic"])
def test_tensor_descriptor_and_pointer_paths_agree(schedule, monkeypatch):
    """Aligned operands (H*elem % 16 == 0) take the TMA tensor-descriptor path, the rest plain pointers;
    both must give the same numbers (the interpreter emulates the descriptors)."""
    from leafe_fast.kernels import leafe_ce_triton as K

    hidden, weight, bias, rows, targets = inputs(h=32)
    head = LossHead(hidden, weight, bias, rows, targets, 4.0, 0.01)
    g = torch.rand(rows.numel(), device=DEV)
    assert K._Launch(head).tma
    lse_t, tgt_t = K.forward(head)
    grads_t = K.backward(head, lse_t, g, ALL, schedule)
    monkeypatch.setattr(K, "_tma_ok", lambda *_: False)
    assert not K._Launch(head).tma
    lse_p, tgt_p = K.forward(head)
    grads_p = K.backward(head, lse_p, g, ALL, schedule)
    torch.testing.assert_close(lse_t, lse_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tgt_t, tgt_p, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_t, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
