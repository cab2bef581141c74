"""leafe_fast.loss: every backend against the float64 reference, edge cases, errors, accumulation.

The Triton backend runs here only on CUDA or under TRITON_INTERPRET=1 (as in CI), at interpreter-sized
shapes (N <= 24, H <= 40, V <= 70) chosen so that no size is a multiple of the 16/32 tiles.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafe_fast.errors import UserError
from leafe_fast.loss import (
    LeafeLoss,
    LossOptions,
    group_norms,
    labels_to_rows,
    leafe_loss,
    leafe_loss_from_labels,
    reference_leafe_loss,
)

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
_NEEDS_TRITON = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
# every named implementation (leafe_fast.loss.IMPL_NAMES minus "auto" and "reference")
BACKENDS = ["torch"] + [pytest.param(name, marks=_NEEDS_TRITON) for name in ("chunked", "triton_gemm", "triton_atomic")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(n=19, h=37, v=67, m=23, dtype=torch.float32, bias=False, scale=1.0, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "hidden": (torch.randn(n, h, generator=g) * scale).to(DEV, dtype).requires_grad_(),
        "weight": (torch.randn(v, h, generator=g) / h**0.5).to(DEV, dtype).requires_grad_(),
        "rows": torch.randint(0, n, (m,), generator=g).to(DEV),
        "targets": torch.randint(0, v, (m,), generator=g).to(DEV),
        "weights": (torch.rand(m, generator=g) + 0.5).to(DEV),
        "group": torch.randint(0, groups, (m,), generator=g).to(DEV),
    }
    if bias:
        t["bias"] = torch.randn(v, generator=g).to(DEV, dtype).requires_grad_()
    return t


def grads(out, t):
    params = [t["hidden"], t["weight"]] + ([t["bias"]] if "bias" in t else [])
    return torch.autograd.grad(out.loss.sum(), params, allow_unused=True)


def run(t, backend, **kw):
    args = [t[k] for k in ("hidden", "weight", "rows", "targets", "weights", "group")]
    if "bias" in t:
        kw["bias"] = t["bias"]
    if backend == "reference":
        return reference_leafe_loss(*args, **kw)
    return leafe_loss(*args, impl=backend, **kw)


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if bool((err > bound).any()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: max err {err.max().item():.3g}; worst at flat {i}: {actual.flatten()[i].item():.6g} vs {expected.flatten()[i].item():.6g}"
        )


def check_against_reference(t, backend, rtol=2e-5, atol=2e-5, **kw):
    out = run(t, backend, **kw)
    ref = run(t, "reference", **kw)
    assert torch.isfinite(out.loss).all()
    assert_close(out.loss, ref.loss, rtol, atol, "loss")
    assert_close(out.group_sums, ref.group_sums, rtol, atol, "group_sums")
    assert torch.equal(out.group_counts, ref.group_counts)
    got = grads(out, t)
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), got, grads(ref, t)):
        assert a is not None and torch.isfinite(a).all(), name
        assert_close(a, b, rtol, atol * max(1.0, b.abs().max().item()), name)
    return out, ref, got


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_sum_matches_reference(backend):
    check_against_reference(make(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_at_once_matches_reference(backend):
    t = make(bias=True, groups=3)
    check_against_reference(
        t, backend, lambdas=(0.7, 1.3, 0.25), norms=torch.tensor([11.0, 5.5, 3.0]), z_loss=1e-3, softcap=4.0,
        reduction="mean",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(backend, reduction):
    out, ref, _ = check_against_reference(make(bias=True), backend, reduction=reduction, lambdas=(1.0, 2.0))
    if reduction == "none":
        assert out.loss.shape == (23,)
        summed = run(make(bias=True), backend, reduction="sum", lambdas=(1.0, 2.0)).loss
        assert_close(out.loss.sum(), summed, 1e-5, 1e-5, "none sums to sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_is_sum_over_local_counts(backend):
    t = make()
    mean = run(t, backend, reduction="mean").loss
    counts = torch.bincount(t["group"], minlength=2).double()
    sums = reference_leafe_loss(*[t[k] for k in ("hidden", "weight", "rows", "targets", "weights", "group")]).group_sums
    assert_close(mean, (sums / counts).sum(), 1e-5, 1e-5, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_rows_accumulate_in_d_hidden(backend):
    t = make(n=6, m=21)
    t["rows"] = torch.tensor([0, 0, 0, 5, 5, 1, 1, 1, 1, 2] + [3] * 11, device=DEV)
    _, _, (d_hidden, _) = check_against_reference(t, backend)
    assert d_hidden[4].abs().max() == 0  # a row nobody selected gets no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_group_contributes_zero(backend):
    t = make()
    t["group"] = torch.zeros_like(t["group"])
    out, _, _ = check_against_reference(t, backend, reduction="mean")
    assert out.group_counts.tolist() == [23.0, 0.0] and out.group_sums[1] == 0
    # a group with rows but a zero global normaliser is dropped, not divided by zero
    t2 = make()
    z = check_against_reference(t2, backend, norms=torch.tensor([7.0, 0.0]))[0]
    only0 = run(t2, "reference", norms=torch.tensor([7.0, 0.0]), reduction="none").loss
    assert (only0[t2["group"] == 1] == 0).all() and torch.isfinite(z.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    t = make(m=0)
    out = run(t, backend, reduction="mean")
    assert out.loss.item() == 0.0 and out.group_counts.tolist() == [0.0, 0.0]
    dh, dw = grads(out, t)
    assert dh.abs().sum() == 0 and dw.abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row(backend):
    check_against_reference(make(m=1), backend, z_loss=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 3, 2, 4), (24, 40, 70, 24), (7, 17, 33, 9)])
def test_sizes_off_the_tile_grid(backend, shape):
    n, h, v, m = shape
    check_against_reference(make(n=n, h=h, v=v, m=m, bias=True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite_and_exact(backend):
    # logits of order 1e3-1e4: a naive exp overflows fp32; the online log-sum-exp must not
    t = make(scale=300.0)
    out, ref, _ = check_against_reference(t, backend, rtol=1e-5, atol=1e-3)
    assert ref.loss.item() > 1e3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", [{"z_loss": 0.05}, {"softcap": 2.5}, {"softcap": 30.0, "z_loss": 1e-4}])
def test_z_loss_and_softcap(backend, opt):
    t = make(scale=3.0, bias=True)
    out, ref, _ = check_against_reference(t, backend, **opt)
    plain = run(t, "reference").loss
    assert abs(ref.loss.item() - plain.item()) > 1e-3  # the option really changes the loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    # The reference sees the same rounded bf16/fp16 inputs in float64, so input rounding cancels. What is
    # left: the loss is accumulated in fp32 (rel ~1e-6), and each gradient is rounded once to the input
    # dtype on output (half an ulp: 2**-9 bf16, 2**-12 fp16) after dlogits were rounded to the input dtype
    # before the two matmuls (another 2**-9 / 2**-12 relative per term). Hence rtol 1e-5 on the loss and
    # a gradient bound of 2 ulps of the largest entry.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    t = make(dtype=dtype, bias=True)
    out = run(t, backend, z_loss=1e-3, softcap=10.0)
    ref = run(t, "reference", z_loss=1e-3, softcap=10.0)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, 1e-5, 1e-5, "loss")
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), grads(out, t), grads(ref, t)):
        assert a.dtype == dtype
        assert_close(a, b, 0.0, 2 * ulp * b.abs().max().item(), name)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradient-in-forward and recompute paths
def test_gradcheck_float64_torch_path(reduction):
    t = make(n=5, h=4, v=7, m=6, dtype=torch.float64, bias=True)
    rows, targets, weights, group = t["rows"], t["targets"], t["weights"].double(), t["group"]

    def f(hidden, weight, bias):
        return leafe_loss(hidden, weight, rows, targets, weights, group, bias=bias, z_loss=0.1, softcap=3.0,
                          reduction=reduction, impl="torch", lambdas=(0.5, 2.0)).loss

    assert torch.autograd.gradcheck(f, (t["hidden"], t["weight"], t["bias"]), eps=1e-6, atol=1e-6)


def test_scalar_loss_gradient_scales_with_upstream_gradient():
    t = make(bias=True)
    out = run(t, "torch", reduction="mean")
    g1 = grads(out, t)
    out2 = run(t, "torch", reduction="mean")
    g3 = torch.autograd.grad(3.0 * out2.loss, [t["hidden"], t["weight"], t["bias"]])
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])  # gradient-in-forward and recompute paths
def test_autocast_around_the_loss_changes_nothing(backend, reduction):
    """An HF Trainer with bf16=True calls the loss inside autocast: it must keep the inputs' dtype
    (it used to crash in the gradient-in-forward path and round logits to bf16 in the other)."""
    t = make(bias=True)
    plain = run(t, backend, reduction=reduction)
    g_plain = grads(plain, t)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        cast = run(t, backend, reduction=reduction)
        g_cast = grads(cast, t)
    assert cast.loss.dtype == plain.loss.dtype
    assert_close(cast.loss, plain.loss, 1e-6, 1e-6, "loss under autocast")
    for a, b, name in zip(g_cast, g_plain, ("d_hidden", "d_weight", "d_bias")):
        assert_close(a, b, 1e-6, 1e-6, f"{name} under autocast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_evaluation_gives_the_same_loss(backend, monkeypatch):
    from leafe_fast.kernels import leafe_ce_torch

    t = make(bias=True)
    with_grad = run(t, backend, reduction="mean", z_loss=1e-3).loss
    monkeypatch.setattr(leafe_ce_torch, "forward_backward", None)  # must not be reached without grad
    with torch.no_grad():
        out = run(t, backend, reduction="mean", z_loss=1e-3)
    assert not out.loss.requires_grad
    assert_close(out.loss, with_grad.detach(), 1e-6, 1e-6, "no_grad loss")


def test_torch_chunking_is_invisible():
    from leafe_fast.kernels import leafe_ce_torch as tk
    from leafe_fast.kernels.leafe_ce_operands import GradNeeds, LossHead

    t = make(m=23)
    head = LossHead(t["hidden"].detach(), t["weight"].detach(), None, t["rows"], t["targets"])
    lse_a, tgt_a = tk.forward(head, max_chunk_elems=1)  # one row per chunk
    lse_b, tgt_b = tk.forward(head, max_chunk_elems=1 << 30)
    assert torch.allclose(lse_a, lse_b) and torch.allclose(tgt_a, tgt_b)
    g = torch.rand(23)
    needs = GradNeeds(hidden=True, weight=True, bias=False)
    a = tk.backward(head, lse_a, g, needs, max_chunk_elems=5 * 67)
    b = tk.backward(head, lse_a, g, needs)
    c = tk.forward_backward(head, g, needs, max_chunk_elems=5 * 67)
    for x, y in ((a[0], b[0]), (a[1], b[1]), (c[2], b[0]), (c[3], b[1]), (c[0], lse_b), (c[1], tgt_b)):
        assert torch.allclose(x, y, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 30), st.integers(0, 14)),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
    z_loss=st.sampled_from([0.0, 1e-2]),
    softcap=st.sampled_from([None, 2.0]),
    reduction=st.sampled_from(["sum", "mean", "none"]),
    groups=st.integers(1, 3),
)
def test_random_shapes_and_options_torch_path(shape, seed, bias, z_loss, softcap, reduction, groups):
    n, h, v, m = shape
    t = make(n=n, h=h, v=v, m=m, bias=bias, groups=groups, seed=seed)
    lam = tuple(0.5 + 0.5 * i for i in range(groups))
    check_against_reference(t, "torch", z_loss=z_loss, softcap=softcap, reduction=reduction, lambdas=lam)


def test_gradient_accumulation_over_four_micro_batches_equals_one_batch():
    t = make(n=24, m=40, seed=3)
    keys = ("rows", "targets", "weights", "group")
    parts = [{k: t[k][i::4] for k in keys} for i in range(4)]  # uneven group mixes per micro-batch
    norms = group_norms([p["group"] for p in parts], num_groups=2)
    assert norms.tolist() == torch.bincount(t["group"], minlength=2).float().tolist()
    hidden, weight = t["hidden"], t["weight"]
    lam = (1.0, 0.6)
    total = sum(
        leafe_loss(hidden, weight, p["rows"], p["targets"], p["weights"], p["group"], lambdas=lam, norms=norms,
                   impl="torch").loss
        for p in parts
    )
    acc = torch.autograd.grad(total, [hidden, weight])
    one = leafe_loss(hidden, weight, *[t[k] for k in keys], lambdas=lam, reduction="mean", impl="torch").loss
    full = torch.autograd.grad(one, [hidden, weight])
    assert_close(total, one, 1e-6, 1e-6, "loss")
    for a, b in zip(acc, full):
        assert_close(a, b, 1e-5, 1e-7, "grad")
    wnorm = group_norms([p["group"] for p in parts], [p["weights"] for p in parts], mode="weight")
    expect = torch.zeros(2, dtype=torch.float64).index_add_(0, t["group"], t["weights"].double())
    assert torch.allclose(wnorm.double(), expect, rtol=1e-6)


def test_group_norms_skips_negative_ids_and_checks_inputs():
    assert group_norms([torch.tensor([0, -1, 1, 1]), torch.tensor([-100, 2])], num_groups=3).tolist() == [1, 2, 1]
    with pytest.raises(IndexError, match="num_groups"):
        group_norms([torch.tensor([0, 2])], num_groups=2)
    with pytest.raises(ValueError, match="needs weights"):
        group_norms([torch.tensor([0])], mode="weight")


def test_labels_form_matches_explicit_rows():
    g = torch.Generator().manual_seed(1)
    b, s, h, v = 3, 9, 16, 29
    hidden = torch.randn(b, s, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 6] = -100
    per_sample_group = torch.tensor([0, 1, 1])
    out = leafe_loss_from_labels(hidden, weight, labels, per_sample_group, reduction="mean", impl="torch")
    rows, targets, group = [], [], []
    for i in range(b):
        for j in range(s - 1):
            if labels[i, j + 1] != -100:
                rows.append(i * s + j), targets.append(int(labels[i, j + 1])), group.append(int(per_sample_group[i]))
    m = len(rows)
    ref = reference_leafe_loss(hidden.reshape(-1, h), weight, torch.tensor(rows), torch.tensor(targets), torch.ones(m),
                               torch.tensor(group), reduction="mean")
    assert_close(out.loss, ref.loss, 1e-6, 1e-6, "labels loss")
    assert out.group_counts.tolist() == [float(group.count(0)), float(group.count(1))] and m == 17


def test_labels_packed_never_cross_samples():
    labels = torch.tensor([-100, 5, 6, 7, 8, 9])  # two packed samples: [0..2], [3..5]
    rows, targets, _, _ = labels_to_rows(labels, cu_seqlens=torch.tensor([0, 3, 6]))
    assert rows.tolist() == [0, 1, 3, 4] and targets.tolist() == [5, 6, 8, 9]
    rows, targets, _, _ = labels_to_rows(labels, shift=False)
    assert rows.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_wrapper_equals_function(backend):
    t = make(bias=True)
    mod = LeafeLoss((0.5, 1.5), z_loss=1e-3, softcap=8.0, impl=backend)
    a = mod(*[t[k] for k in ("hidden", "weight", "rows", "targets", "weights", "group")], bias=t["bias"]).loss
    b = run(t, "reference", lambdas=(0.5, 1.5), z_loss=1e-3, softcap=8.0).loss
    assert_close(a, b, 2e-5, 2e-5, "module")
    assert "lambdas=(0.5, 1.5)" in repr(mod)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t: t.update(weight=torch.randn(67, 36)), ValueError, "hidden size mismatch"),
        (lambda t: t.update(weight=t["weight"].detach().double()), TypeError, "share a dtype"),
        (lambda t: t.update(hidden=t["hidden"].detach()[0]), ValueError, "hidden must be a 2-D"),
        (lambda t: t["targets"].__setitem__(0, 67), IndexError, "targets out of range"),
        (lambda t: t["targets"].__setitem__(0, -100), IndexError, "targets out of range"),
        (lambda t: t["rows"].__setitem__(2, 19), IndexError, "rows out of range"),
        (lambda t: t["group"].__setitem__(2, 2), IndexError, "group ids out of range"),
        (lambda t: t.update(weights=t["weights"][:-1]), ValueError, "1-D of one length"),
        (lambda t: t.update(rows=t["rows"].float()), TypeError, "rows must be an integer"),
        (lambda t: t.update(bias=torch.randn(66)), ValueError, "bias must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    t = make()
    mutate(t)
    with pytest.raises(error, match=match):
        run(t, "torch")


def test_bad_options_raise_clear_errors():
    t = make()
    with pytest.raises(ValueError, match="reduction"):
        run(t, "torch", reduction="avg")
    with pytest.raises(ValueError, match="norms has 3 entries"):
        run(t, "torch", norms=[1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="lambdas: has 2 values for num_groups=3"):
        run(t, "torch", lambdas=(1.0, 2.0), num_groups=3)
    with pytest.raises(UserError, match="impl: must be one of"):
        run(t, "cuda-magic")
    with pytest.raises(TypeError, match="unknown loss option"):
        leafe_loss(*[t[k] for k in ("hidden", "weight", "rows", "targets", "weights", "group")], backend="torch")
    with pytest.raises(ValueError, match="softcap"):
        run(t, "torch", softcap=-1.0)


def test_readme_example_runs():
    # the README's leafe_loss example, verbatim
    import torch
    from leafe_fast.loss import group_norms, leafe_loss

    hidden = torch.randn(10, 16, requires_grad=True)  # [N, H] final hidden states
    weight = torch.randn(50, 16, requires_grad=True)  # [V, H] lm_head weight
    rows = torch.tensor([2, 3, 3, 7])  # positions that predict a target (may repeat)
    targets = torch.tensor([5, 9, 1, 42])
    weights = torch.ones(4)
    group = torch.tensor([0, 0, 1, 1])  # 0 rehearsal, 1 counterfactual
    norms = group_norms([group], num_groups=2)  # over all micro-batches (and ranks) of the step
    out = leafe_loss(hidden, weight, rows, targets, weights, group, lambdas=(1.0, 1.0), norms=norms)
    out.loss.backward()
    per_group_ce = out.group_sums / out.group_counts  # for logging

    assert hidden.grad is not None and torch.isfinite(per_group_ce).all()
    assert_close(out.loss, per_group_ce.sum(), 1e-6, 1e-6, "readme loss")
