"""Fused LM head + masked CE: leafe-fast against its peers, forward+backward, in one run.

Every variant computes the same quantity, ``sum_i CE(hidden[rows_i] @ W.T, targets_i)`` (weights 1; our
variant goes through the two-group path with lambdas (1, 1)), and returns d_hidden and d_weight.
Reported per (shape, variant): median fwd+bwd ms, extra peak memory (CUDA: peak during the call minus
memory before it minus the two gradient outputs every variant must return), the floor
``6·M·H·V / matmul rate`` with the rate measured in this run, and the error vs float64 on a subsample
(loss; d_hidden on sampled rows; d_weight on sampled vocabulary rows incl. targets). The floor's matmul
rate is the better of a square matmul and the shape's own [M, H] @ [H, V] matmul, best of N runs.

  python -m benchmarks.bench_loss            # CUDA: shapes a, b10, b50, c in bf16
  python -m benchmarks.bench_loss --small    # CPU default: small fp32 shapes + a tiny interpreter shape

Peers that are not installed (liger-kernel, cut-cross-entropy) are skipped with a note, never faked.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

if "--small" in sys.argv or not any(a.startswith("--gpu") for a in sys.argv):
    # On a CPU-only machine the Triton kernels can only run through the interpreter; it must be set
    # before triton is imported. Harmless on CUDA (we never set it there).
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from benchmarks.common import env_info, peak_memory, save_plot, time_fn, write_result
except ImportError:  # run as a plain script from benchmarks/
    from common import env_info, peak_memory, save_plot, time_fn, write_result  # type: ignore[no-redef]

from leafe_fast.loss import LossOptions, leafe_loss

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # loss, d_hidden [N, H], d_weight [V, H]


@dataclass
class Shape:
    name: str
    n: int
    h: int
    v: int
    frac: float

    @property
    def m(self) -> int:
        return max(1, int(round(self.n * self.frac)))


GPU_SHAPES = [  # issue 14: (a) Qwen2.5-7B head, 25% supervised; (b) the same at 10% / 50%; (c) a 32k vocab
    Shape("a", 16384, 3584, 152064, 0.25),
    Shape("b10", 16384, 3584, 152064, 0.10),
    Shape("b50", 16384, 3584, 152064, 0.50),
    Shape("c", 16384, 4096, 32000, 0.25),
]
CPU_SHAPES = [Shape("cpu_small", 1024, 256, 8192, 0.25), Shape("cpu_tiny", 64, 32, 256, 0.25)]
INTERPRETER_MAX_MHV = 64 * 32 * 256  # the Triton interpreter runs only at the tiny shape


def make_inputs(s: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(s.n, s.h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(s.v, s.h, generator=g) / math.sqrt(s.h)).to(device, dtype).requires_grad_()
    rows = torch.randperm(s.n, generator=g)[: s.m].sort().values.to(device)
    targets = torch.randint(0, s.v, (s.m,), generator=g).to(device)
    labels = torch.full((s.n,), -100, dtype=torch.long, device=device)
    labels[rows] = targets
    group = (torch.arange(s.m, device=device) % 2)  # two groups, as in LEAFE
    return {"hidden": hidden, "weight": weight, "rows": rows, "targets": targets, "labels": labels, "group": group}


def _grad(loss: torch.Tensor, x: dict) -> Grads:
    dh, dw = torch.autograd.grad(loss, [x["hidden"], x["weight"]])
    return loss.detach(), dh, dw


# ------------------------------------------------------------------------------------------ peers


def torch_eager_all(x: dict) -> Grads:
    logits = (x["hidden"] @ x["weight"].T).float()
    return _grad(F.cross_entropy(logits, x["labels"], ignore_index=-100, reduction="sum"), x)


def torch_eager_gathered(x: dict) -> Grads:
    logits = (x["hidden"][x["rows"]] @ x["weight"].T).float()
    return _grad(F.cross_entropy(logits, x["targets"], reduction="sum"), x)


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    z = (h @ w.T).float()
    lse = z.logsumexp(-1)
    loss = (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
    dz = torch.exp(z - lse[:, None])
    dz = dz.scatter_add(1, t[:, None], -torch.ones_like(lse)[:, None]).to(h.dtype)
    return loss, dz @ w, dz.T @ h


_COMPILED: dict[str, Callable] = {}


class _ChunkedCompiledCE(torch.autograd.Function):
    """Gathered rows in chunks; each chunk's loss and gradients from one compiled function (grad in fwd)."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk):  # type: ignore[override]
        fn = _COMPILED.get("chunk")
        if fn is None:
            import torch._dynamo.config as dynamo_config

            for knob in ("recompile_limit", "cache_size_limit"):  # one graph per (shape, tail chunk)
                if hasattr(dynamo_config, knob):
                    setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))
            fn = _COMPILED["chunk"] = torch.compile(_chunk_loss_and_grads, dynamic=False)
        d_hidden = torch.zeros_like(hidden)
        d_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, rows.numel(), chunk):
            r = rows[s : s + chunk]
            lc, dh, dw = fn(hidden[r], weight, targets[s : s + chunk])
            loss += lc
            d_hidden.index_add_(0, r, dh)
            d_weight += dw
        ctx.save_for_backward(d_hidden, d_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        d_hidden, d_weight = ctx.saved_tensors
        return d_hidden * g, d_weight * g, None, None, None


def torch_compile_chunked(x: dict, chunk: int = 4096) -> Grads:
    return _grad(_ChunkedCompiledCE.apply(x["hidden"], x["weight"], x["rows"], x["targets"], chunk), x)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def liger_all(x: dict) -> Grads:
    return _grad(_liger()(x["weight"], x["hidden"], x["labels"]), x)


def liger_gathered(x: dict) -> Grads:
    return _grad(_liger()(x["weight"], x["hidden"][x["rows"]], x["targets"]), x)


def cce_all(x: dict) -> Grads:
    from cut_cross_entropy import linear_cross_entropy

    return _grad(linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="sum"), x)


def cce_gathered(x: dict) -> Grads:
    from cut_cross_entropy import linear_cross_entropy

    return _grad(linear_cross_entropy(x["hidden"][x["rows"]], x["weight"], x["targets"], reduction="sum"), x)


def _leafe(impl: str) -> Callable[[dict], Grads]:
    """leafe_loss with the named implementation (LossOptions.impl), two groups with lambdas (1, 1)."""
    opts = LossOptions(lambdas=(1.0, 1.0), reduction="sum", impl=impl, check_ranges=False)

    def run(x: dict) -> Grads:
        ones = torch.ones(x["rows"].numel(), device=x["rows"].device)
        out = leafe_loss(x["hidden"], x["weight"], x["rows"], x["targets"], ones, x["group"], options=opts)
        return _grad(out.loss, x)

    return run


PEERS: dict[str, tuple[Callable[[dict], Grads], str | None]] = {
    "torch_eager_all": (torch_eager_all, None),
    "torch_eager_gathered": (torch_eager_gathered, None),
    "torch_compile_chunked": (torch_compile_chunked, None),
    "liger_flce_all": (liger_all, "liger_kernel"),
    "liger_flce_gathered": (liger_gathered, "liger_kernel"),
    "cce_all": (cce_all, "cut_cross_entropy"),
    "cce_gathered": (cce_gathered, "cut_cross_entropy"),
    "leafe_torch": (_leafe("torch"), None),
    "leafe_chunked": (_leafe("chunked"), "triton"),  # gradient in forward: 6 M H V
    "leafe_triton_gemm": (_leafe("triton_gemm"), "triton"),  # recompute, dlogits chunks + cuBLAS: 8 M H V
    "leafe_triton_atomic": (_leafe("triton_atomic"), "triton"),  # recompute, one fused kernel: 8 M H V
}
TRITON_VARIANTS = ("leafe_chunked", "leafe_triton_gemm", "leafe_triton_atomic")


# ------------------------------------------------------------------------------- measurement helpers


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: str) -> float:
    """Best-of-N rate of one [m, k] @ [k, n] matmul in ``dtype``: the machine's own ceiling for the floor."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b.T, warmup=2, iters=7 if device == "cpu" else 20)
    return 2 * m * k * n / (t["min_ms"] * 1e-3) / 1e12


@torch.no_grad()
def reference_subsample(x: dict, n_rows: int = 16, n_vocab: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """float64 loss over all rows, d_hidden on sampled rows, d_weight on sampled vocabulary rows."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight, rows, targets = x["hidden"], x["weight"], x["rows"], x["targets"]
    m, v = rows.numel(), weight.shape[0]
    sel = torch.randperm(m, generator=g)[: min(n_rows, m)].to(rows.device)
    voc = torch.cat([targets[: n_vocab // 2].cpu(), torch.randperm(v, generator=g)[: n_vocab // 2]]).unique().to(rows.device)
    w64 = weight.detach().double()
    lse = torch.empty(m, dtype=torch.float64, device=rows.device)
    loss = torch.zeros((), dtype=torch.float64, device=rows.device)
    step = max(1, (1 << 26) // v)
    for s in range(0, m, step):
        z = hidden.detach()[rows[s : s + step]].double() @ w64.T
        lse[s : s + step] = z.logsumexp(-1)
        loss += (lse[s : s + step] - z.gather(1, targets[s : s + step, None]).squeeze(1)).sum()
    h_sel = hidden.detach()[rows[sel]].double()
    dz = torch.exp(h_sel @ w64.T - lse[sel, None])
    dz[torch.arange(sel.numel()), targets[sel]] -= 1.0
    d_hidden_sel = dz @ w64  # rows are unique in this benchmark
    h_all = hidden.detach()[rows].double()
    dzv = torch.exp(h_all @ w64[voc].T - lse[:, None]) - (targets[:, None] == voc[None, :]).double()
    return {"loss": loss, "sel_rows": rows[sel], "d_hidden": d_hidden_sel, "voc": voc, "d_weight": dzv.T @ h_all}


def errors(out: Grads, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    loss, dh, dw = out

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {
        "loss_rel_err": abs(loss.double().item() - ref["loss"].item()) / abs(ref["loss"].item()),
        "d_hidden_rel_err": rel(dh[ref["sel_rows"]], ref["d_hidden"]),
        "d_weight_rel_err": rel(dw[ref["voc"]], ref["d_weight"]),
    }


def available(module: str | None) -> str | None:
    if module is None:
        return None
    try:
        __import__(module)
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return f"{module} not importable ({type(exc).__name__}: {exc})"


def check_one(name: str, fn: Callable, x: dict, s: Shape, ref: dict, warmup: int) -> dict:
    """Correctness vs float64, warm-up (compilation, autotuning) and extra peak memory of one variant."""
    row: dict = {"shape": s.name, "variant": name}
    try:
        out = fn(x)
        row.update(errors(out, ref))
        del out
        for _ in range(warmup):
            fn(x)
        extra = peak_memory(lambda: fn(x))
        if extra is not None:
            grads_gib = (x["hidden"].numel() + x["weight"].numel()) * x["hidden"].element_size() / 2**30
            row["extra_peak_gib"] = extra - grads_gib
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Round-robin timing: each round times every variant once, so load drift (a shared CPU, GPU clocks)
    hits all variants alike; per-variant median over the rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(rounds), desc="timing rounds", leave=False):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, warmup=0, iters=1)["median_ms"])
    out = {}
    for name, ts in samples.items():
        ts.sort()
        n = len(ts)
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": ts[int(0.2 * (n - 1))],
                     "p80_ms": ts[int(0.8 * (n - 1))], "min_ms": ts[0], "iters": n}
    return out


def measure(shapes: list[Shape], variants: list[str], device: str, dtype: torch.dtype, warmup: int, iters: int,
            interpret: bool) -> tuple[list[dict], dict[str, float], float]:
    """Every variant at every shape: error vs float64, extra peak memory, round-robin timing, ratio to the
    6·M·H·V floor at the matmul rate measured in this run. Returns (rows, floor rate per shape, square rate)."""
    cuda = device == "cuda"
    square = 1024 if device == "cpu" else 8192
    rate_square = matmul_tflops(square, square, square, dtype, device)
    print(f"device {env_info()['device']}  dtype {dtype}  matmul {square}^3: {rate_square:.3f} TFLOP/s")
    results, rates = [], {}
    for s in shapes:
        # the floor uses the rate of this shape's own logits matmul [M, H] @ [H, V], measured now
        rate = rates[s.name] = max(rate_square, matmul_tflops(s.m, s.h, s.v, dtype, device))
        x = make_inputs(s, dtype, device)
        ref = reference_subsample(x)
        rows_here = []
        for name in tqdm(variants, desc=f"shape {s.name}", leave=False):
            fn, module = PEERS[name]
            missing = available(module)
            too_big = s.m * s.h * s.v > INTERPRETER_MAX_MHV
            if name in TRITON_VARIANTS and device == "cpu" and (not interpret or too_big):
                missing = missing or "Triton on CPU runs only under TRITON_INTERPRET=1, at the tiny shape"
            if missing:
                results.append({"shape": s.name, "variant": name, "status": f"skipped: {missing}"})
                continue
            rows_here.append(check_one(name, fn, x, s, ref, warmup))
        ok = {r["variant"]: (lambda f=PEERS[r["variant"]][0]: f(x)) for r in rows_here if r["status"] == "ok"}
        timings = time_interleaved(ok, iters)
        floor_ms = 6 * s.m * s.h * s.v / (rate * 1e12) * 1e3
        for r in rows_here:
            if r["variant"] in timings:
                r.update(timings[r["variant"]], floor_ms=floor_ms)
                r["ratio_to_floor"] = r["median_ms"] / floor_ms
        results.extend(rows_here)
        del x, ref
        if cuda:
            torch.cuda.empty_cache()

    return results, rates, rate_square


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small CPU shapes (default without CUDA)")
    p.add_argument("--shapes", default=None, help="comma list of shape names to run (default: all of the mode)")
    p.add_argument("--variants", default=None, help="comma list of variants (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on a CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared, loaded CPU more threads make timings erratic)")
    p.add_argument("--name", default=None, help="result file name (default loss_cpu_small / loss_<gpu>)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda and not args.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = CPU_SHAPES if small else GPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes.split(",")]
    variants = list(PEERS) if not args.variants else args.variants.split(",")
    if args.no_compile:
        variants = [v for v in variants if v != "torch_compile_chunked"]
    warmup, iters = (1, args.iters or 5) if device == "cpu" else (3, args.iters or 10)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    results, rates, rate_square = measure(shapes, variants, device, dtype, warmup, iters, interpret)
    notes = []
    notes.append("Variants are timed round-robin (one call each per round), median over rounds.")
    if device == "cpu":
        notes.append("CPU run (fp32): timings are CPU numbers, not GPU numbers; H100 figures still to be measured.")
        notes.append(f"{torch.get_num_threads()} CPU thread(s) on a machine shared with other jobs: expect noise.")
        if interpret:
            notes.append("The leafe Triton variants ran through the Triton interpreter (numpy on the CPU): a correctness "
                         "check, its time says nothing about GPU speed.")
    payload = {
        "benchmark": "fused LM head + masked CE, forward+backward",
        "notes": notes,
        "dtype": str(dtype),
        "matmul_tflops_square": rate_square,
        "matmul_tflops_floor_per_shape": rates,
        "floor": "6*M*H*V / max(square matmul rate, rate of the shape's [M,H]@[H,V] matmul), best of N",
        "shapes": [vars(s) | {"m": s.m} for s in shapes],
        "results": results,
        "env": env_info(),
    }
    name = args.name or ("loss_cpu_small" if device == "cpu" else "loss_" + torch.cuda.get_device_name(0).split()[-1].lower())
    path = write_result(name, payload)
    ok = [r for r in results if r.get("status") == "ok"]
    save_plot(name, [f"{r['shape']}:{r['variant']}" for r in ok], [r["median_ms"] for r in ok],
              groups=[r["shape"] for r in ok], logy=True, title=f"{name}: fwd+bwd median ms ({env_info()['device']}, {dtype})")

    print(f"\n{'shape':<10}{'variant':<24}{'ms':>10}{'x floor':>9}{'GiB':>8}{'loss err':>10}{'dh err':>10}{'dw err':>10}")
    for r in results:
        if r.get("status") != "ok":
            print(f"{r['shape']:<10}{r['variant']:<24}  {r['status']}")
            continue
        gib = r.get("extra_peak_gib")
        print(f"{r['shape']:<10}{r['variant']:<24}{r['median_ms']:>10.2f}{r['ratio_to_floor']:>9.2f}"
              f"{'-' if gib is None else f'{gib:.2f}':>8}{r['loss_rel_err']:>10.1e}{r['d_hidden_rel_err']:>10.1e}"
              f"{r['d_weight_rel_err']:>10.1e}")
    for n in notes:
        print("note:", n)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
