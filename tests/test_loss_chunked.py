"""The "chunked" gradient-in-forward schedule (Triton row kernel + matmuls) and its torch twin.

Exactness against the float64 reference in fp32, bf16 and fp16, fp16 with tiny row scales (global
normalisers), several row chunks, repeated rows, one token, no rows, gradient accumulation, an fp32
master weight with bf16 hidden states, and the FLOP accounting (6·M·H·V vs 8·M·H·V) that makes it the
CUDA default. Triton runs under TRITON_INTERPRET=1 on the CPU (CI) or on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from leafe_fast.kernels.leafe_ce_operands import GradNeeds, LossHead
from leafe_fast.loss import LossOptions, group_norms, leafe_loss, reference_leafe_loss

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("chunked", marks=needs_triton)]
ULP = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
KEYS = ("hidden", "weight", "rows", "targets", "row_weight", "group")


def make(n=21, h=35, v=75, m=29, dtype=torch.float32, seed=0, groups=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(n, h, generator=g).to(DEV, dtype).requires_grad_(),
        "weight": (torch.randn(v, h, generator=g) / h**0.5).to(DEV, dtype).requires_grad_(),
        "rows": torch.randint(0, n, (m,), generator=g).to(DEV),
        "targets": torch.randint(0, v, (m,), generator=g).to(DEV),
        "row_weight": (torch.rand(m, generator=g) + 0.5).to(DEV),
        "group": torch.randint(0, groups, (m,), generator=g).to(DEV),
    }


def loss_and_grads(t, impl, **kw):
    fn = reference_leafe_loss if impl == "reference" else leafe_loss
    if impl != "reference":
        kw["impl"] = impl
    out = fn(*[t[k] for k in KEYS], **kw)
    return out, torch.autograd.grad(out.loss, [t["hidden"], t["weight"]])


@pytest.fixture
def small_chunks(monkeypatch):
    """Row chunks of 4 rows: every test below crosses several chunk edges."""
    from leafe_fast.kernels import leafe_ce_triton as K

    monkeypatch.setattr(K, "LOGITS_BUDGET_BYTES", 4 * 4 * 75)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference_across_chunks(impl, dtype, small_chunks):
    t = make(dtype=dtype)
    t["rows"][:6] = 3  # repeated rows, spread over two chunks
    opts = dict(lambdas=(0.7, 1.3), z_loss=1e-3, softcap=6.0, norms=torch.tensor([20.0, 9.0]))
    out, got = loss_and_grads(t, impl, **opts)
    ref, want = loss_and_grads(t, "reference", **opts)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    # low precision: dlogits rounded once, the output once, repeated rows added in the input dtype once
    tol = 1e-5 if dtype == torch.float32 else 3 * ULP[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol * b.abs().max().item())


def _tiny_scale_case():
    """Row scales ~1e-4 (global normalisers) and V = 2048: g * p ~ 5e-8 is below fp16's normal range
    (6e-5) and mostly flushes to zero, while the gradients (~g) are normal fp16 numbers. The head rows
    share a common direction, as a trained head's do, so d_hidden = g (E_p[W] - W_t) lives on the
    cancellation the flushed dlogits lose. The real case: V = 152k, g ~ 1e-4."""
    g = torch.Generator().manual_seed(5)
    t = make(n=24, h=16, v=2048, m=20, dtype=torch.float16, seed=5)
    with torch.no_grad():
        common = torch.randn(16, generator=g)
        t["weight"].copy_((torch.randn(2048, 16, generator=g) * 0.5 + common).to(DEV, torch.float16))
    return t, dict(norms=torch.tensor([1.0e4, 1.2e4]), lambdas=(1.0, 1.0))


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("impl", ["torch", pytest.param("chunked", marks=needs_triton),
                                  pytest.param("triton_gemm", marks=needs_triton)])
@pytest.mark.parametrize("reduction", ["sum", "none"])  # gradient in forward, and recompute
def test_fp16_tiny_row_scales_do_not_underflow(impl, reduction):
    """Folding the row scale into fp16 dlogits flushed almost all of them to zero (d_hidden 8-10% wrong
    at V = 152k). The unscaled dlogits are cast, the scale applied in fp32 after the matmuls."""
    t, kw = _tiny_scale_case()
    out = leafe_loss(*[t[k] for k in KEYS], impl=impl, reduction=reduction, **kw)
    ref = reference_leafe_loss(*[t[k] for k in KEYS], reduction=reduction, **kw)
    got = torch.autograd.grad(out.loss.sum(), [t["hidden"], t["weight"]])
    want = torch.autograd.grad(ref.loss.sum(), [t["hidden"], t["weight"]])
    for name, a, b in zip(("d_hidden", "d_weight"), got, want):
        assert _rel_err(a, b) < 4 * ULP[torch.float16], f"{name}: relative error {_rel_err(a, b):.3g}"


def test_fp16_tiny_row_scales_control_folded_scale_fails():
    """Control for the test above: the old order (scale, then cast dlogits to fp16) on the same case
    is far outside the bound, so the test can tell the two apart."""
    t, kw = _tiny_scale_case()
    h = t["hidden"].detach().double()[t["rows"]]
    w = t["weight"].detach().double()
    z = h @ w.T
    p = torch.softmax(z, 1)
    onehot = torch.nn.functional.one_hot(t["targets"], w.shape[0]).double()
    norms = kw["norms"].double()
    g = t["row_weight"].double() / norms[t["group"]]
    exact = (g[:, None] * (p - onehot)) @ w
    folded = (g[:, None] * (p - onehot)).half().double() @ w
    unscaled = g[:, None] * ((p - onehot).half().double() @ w)
    assert _rel_err(folded, exact) > 4 * 4 * ULP[torch.float16]
    assert _rel_err(unscaled, exact) < 4 * ULP[torch.float16]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_token_and_no_tokens(impl):
    t = make(m=1)
    out, got = loss_and_grads(t, impl, z_loss=1e-2)
    ref, want = loss_and_grads(t, "reference", z_loss=1e-2)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    t = make(m=0)
    out, got = loss_and_grads(t, impl, reduction="mean")
    assert out.loss.item() == 0.0 and all(bool((g == 0).all()) for g in got)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_equals_one_batch(impl, small_chunks):
    t = make(m=40, seed=3)
    keys = ("rows", "targets", "row_weight", "group")
    parts = [{k: t[k][i::3] for k in keys} for i in range(3)]
    norms = group_norms([p["group"] for p in parts], num_groups=2)
    hidden, weight = t["hidden"], t["weight"]
    total = sum(leafe_loss(hidden, weight, *[p[k] for k in keys], norms=norms, lambdas=(1.0, 0.6), impl=impl).loss
                for p in parts)
    acc = torch.autograd.grad(total, [hidden, weight])
    one = leafe_loss(hidden, weight, *[t[k] for k in keys], lambdas=(1.0, 0.6), reduction="mean", impl=impl).loss
    full = torch.autograd.grad(one, [hidden, weight])
    torch.testing.assert_close(total, one, rtol=1e-6, atol=1e-6)
    for a, b in zip(acc, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_scales_the_forward_gradient(impl):
    t = make()
    out = leafe_loss(*[t[k] for k in KEYS], impl=impl, reduction="mean")
    g1 = torch.autograd.grad(out.loss, [t["hidden"], t["weight"]])
    out = leafe_loss(*[t[k] for k in KEYS], impl=impl, reduction="mean")
    g3 = torch.autograd.grad(2.5 * out.loss, [t["hidden"], t["weight"]])
    for a, b in zip(g1, g3):
        torch.testing.assert_close(2.5 * a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_master_weight_with_bf16_hidden(impl, small_chunks):
    """The trainer passes its fp32 master head: matmuls in bf16, the weight gradient comes back in fp32,
    accumulated in fp32 over the row chunks (no per-chunk bf16 rounding)."""
    t = make(dtype=torch.bfloat16)
    master = t["weight"].detach().float().requires_grad_()
    t_m = dict(t, weight=master)
    out, (d_h, d_w) = loss_and_grads(t_m, impl, lambdas=(1.0, 2.0))
    ref, (r_h, r_w) = loss_and_grads(t, "reference", lambdas=(1.0, 2.0))  # same values, bf16 weight
    assert d_w.dtype == torch.float32 and d_h.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_w.double(), r_w.double(), rtol=0, atol=2 * ULP[torch.bfloat16] * r_w.abs().max().item())
    torch.testing.assert_close(d_h.double(), r_h.double(), rtol=0, atol=3 * ULP[torch.bfloat16] * r_h.abs().max().item())


@needs_triton
def test_master_weight_is_cast_once_per_version():
    from leafe_fast.kernels.leafe_ce_triton import compute_weight

    w = torch.randn(7, 5)
    a = compute_weight(w, torch.bfloat16)
    assert compute_weight(w, torch.bfloat16) is a  # a second micro-batch reuses the cast
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step bumps the version
    b = compute_weight(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.to(torch.bfloat16))


@needs_triton
def test_row_kernel_alone_matches_logsumexp():
    """The row kernel on one chunk: lse and target logit, and the in-place unscaled dlogits."""
    from leafe_fast.kernels import leafe_ce_triton as K

    t = make(dtype=torch.bfloat16)
    head = LossHead(t["hidden"].detach(), t["weight"].detach(), None, t["rows"], t["targets"], None, 0.0)
    g = torch.rand(t["rows"].numel(), device=DEV) + 0.1
    lse, tgt, d_h, d_w, _ = K.forward_backward(head, g, GradNeeds(True, True, False))
    z = t["hidden"].detach().double()[t["rows"]] @ t["weight"].detach().double().T
    torch.testing.assert_close(lse.double(), z.logsumexp(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tgt.double(), z.gather(1, t["targets"][:, None]).squeeze(1), rtol=1e-6, atol=1e-5)
    lse_only = K.forward_backward(head, None, GradNeeds(False, False, False))
    assert torch.equal(lse_only[0], lse) and lse_only[2] is None


class _Flops:
    """Matmul FLOPs of one call: torch's mm/addmm (in place or not, via a dispatch mode) plus the Triton
    interpreter's tl.dot."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.count = 0
        orig = interpreter.InterpreterBuilder.create_dot

        def counting(builder, a, b, d, *args):
            self.count += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
            return orig(builder, a, b, d, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)

    def run(self, fn):
        from torch.utils._python_dispatch import TorchDispatchMode

        flops = self
        matmuls = {"mm", "addmm", "addmm_"}

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._overloadpacket.__name__
                if name in matmuls:
                    a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
                    flops.count += 2 * a.shape[0] * a.shape[1] * b.shape[1]
                return func(*args, **(kwargs or {}))

        self.count = 0
        with Count():
            fn()
        return self.count


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's tl.dot")
def test_flop_accounting_chunked_is_6mhv_recompute_is_8mhv(monkeypatch):
    """Why "chunked" is the CUDA default before any GPU timing: 6·M·H·V matmul flops against 8·M·H·V for
    the recompute schedules, measured by counting every matmul (shapes on the interpreter's tile grid,
    so padded tiles do not inflate the count)."""
    m, h, v = 32, 32, 64
    t = make(n=40, h=h, v=v, m=m)
    flops = _Flops(monkeypatch)
    mhv = m * h * v

    def step(impl):
        def go():
            out = leafe_loss(*[t[k] for k in KEYS], impl=impl)
            torch.autograd.grad(out.loss, [t["hidden"], t["weight"]])
        return flops.run(go)

    assert step("chunked") == 6 * mhv
    assert step("triton_gemm") == 8 * mhv
    assert step("triton_atomic") == 8 * mhv
    assert step("torch") == 6 * mhv


def test_auto_picks_chunked_on_cuda_and_torch_on_cpu():
    from leafe_fast.loss import resolve_impl

    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "chunked"
    assert resolve_impl("auto", torch.device("cuda"), torch.float64) == "torch"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert LossOptions().impl == "auto"
