"""One command for everything that needs a CUDA GPU: ``make gpu-check`` (or ``python benchmarks/gpu_check.py``).

Planned for one H200 from a bare machine in well under 10 minutes (torch 2.11, triton 3.6 or 3.9,
transformers 5.x; liger-kernel and cut-cross-entropy used when importable, skipped with a note when not):

1. ``pytest -m gpu`` (the CUDA-only tests);
2. the loss: every leafe implementation (chunked, triton_gemm, triton_atomic, torch) and every peer
   (torch eager, torch.compile chunked, Liger FLCE, Cut Cross-Entropy) at (a) N=16384 H=3584 V=152064 25%
   supervised, (b) the same at 10% and 50%, (c) a 32k vocabulary; error vs float64, median time, extra
   peak memory, ratio to the 6·M·H·V floor at the matmul rate measured in the same run;
3. the attention backends on a packed batch (vs the exact per-sample loop), timed;
4. a training-step benchmark at the Qwen2.5-0.5B and 1.5B configs (random init, LEAFE-shaped packed data)
   against Hugging Face padded batches and HF + Liger, through ``benchmarks/bench_train.py``.

Writes one JSON, ``benchmarks/results/gpu_check_<device>.json`` (device, versions, date, shapes, results).
Each part runs under its own time limit and records its failure instead of stopping the rest.
``--dry-run`` runs every part at tiny shapes on the CPU (Triton through the interpreter), so the script
is exercised in CI (tests/test_gpu_check.py) and cannot rot.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(ROOT))  # a bare machine: run from the checkout, no install needed for the loss parts

import torch  # noqa: E402

from benchmarks.common import env_info, time_fn, write_result  # noqa: E402


class Budget:
    """A wall-clock deadline shared by the parts; a part that would start too late is skipped, with a note."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_part(name: str, fn: Callable[[], Any], budget: Budget, need_s: float, report: dict) -> None:
    if budget.left() < need_s:
        report[name] = {"status": f"skipped: {budget.left():.0f} s left, needs ~{need_s:.0f} s"}
        return
    t0 = time.monotonic()
    try:
        report[name] = {"status": "ok", **fn()}
    except Exception as exc:  # noqa: BLE001 - record it, run the other parts
        report[name] = {"status": f"error: {type(exc).__name__}: {str(exc)[:500]}"}
    report[name]["seconds"] = round(time.monotonic() - t0, 1)
    print(f"[gpu-check] {name}: {report[name]['status']} ({report[name]['seconds']} s)", flush=True)


def part_pytest(dry: bool, timeout: float) -> dict:
    """``pytest -m gpu``; the dry run only collects (the gpu tests skip without CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry:
        cmd += ["--collect-only", "tests/test_kernels_leafe_ce.py"]
    env = {k: v for k, v in os.environ.items() if not (k == "TRITON_INTERPRET" and not dry)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": proc.returncode, "summary": tail[0], "output_tail": proc.stdout[-4000:]}


def part_loss(dry: bool) -> dict:
    from benchmarks import bench_loss as B

    if dry:
        shapes, variants, device, dtype = [B.Shape("tiny", 64, 32, 256, 0.25)], ["torch_eager_gathered",
                                           "leafe_torch", "leafe_chunked"], "cpu", torch.float32
        warmup, iters = 0, 2
    else:
        shapes, variants, device, dtype = B.GPU_SHAPES, list(B.PEERS), "cuda", torch.bfloat16
        warmup, iters = 2, 10
    results, rates, square = B.measure(shapes, variants, device, dtype, warmup, iters,
                                       os.environ.get("TRITON_INTERPRET") == "1")
    return {"dtype": str(dtype), "shapes": [vars(s) | {"m": s.m} for s in shapes],
            "matmul_tflops_square": square, "matmul_tflops_floor_per_shape": rates,
            "floor": "6*M*H*V / measured matmul rate", "results": results}


def part_attention(dry: bool) -> dict:
    """Every available varlen attention backend on one packed batch: max error vs the per-sample loop
    (fp32 reference) and median time."""
    from leafe_fast.train import attention as A

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    lengths = [17, 33, 9] if dry else [4096, 2048, 1024, 3000, 6192]
    heads, kv_heads, head_dim = (4, 2, 16) if dry else (12, 2, 128)  # Qwen2.5-1.5B attention shapes
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=g).to(device, dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    ref = A.varlen_attention_packed(q.float(), k.float(), v.float(), cu, max(lengths), backend="loop")
    out = {}
    for name in A.available_backends(device):
        try:
            got = A.varlen_attention_packed(q, k, v, cu, max(lengths), backend=name)
            err = (got.float() - ref).abs().max().item()
            t = time_fn(lambda: A.varlen_attention_packed(q, k, v, cu, max(lengths), backend=name),
                        warmup=1 if dry else 3, iters=2 if dry else 10)
            out[name] = {"max_abs_err": err, "median_ms": t["median_ms"]}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    fa3 = hasattr(torch.nn.attention, "activate_flash_attention_impl")
    return {"lengths": lengths, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype),
            "torch_offers_flash_attention_impl_switch": fa3, "backends": out}


def part_train(dry: bool, config: str, timeout: float, out_dir: Path) -> dict:
    """bench_train in a subprocess (its own CUDA context and memory); its JSON is embedded."""
    import json

    name = f"gpu_check_train_{config}"
    path = out_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--name", str(path.with_suffix(""))]
    if dry:
        cmd += ["--small", "--samples", "6", "--steps", "1", "--warmup", "0", "--min-len", "96", "--max-len", "200",
                "--token-budget", "256", "--peers", "leafe-fast,hf-padded-eager,hf-liger-padded,hf-liger-packed"]
    else:
        cmd += ["--config", config, "--steps", "4", "--warmup", "1",
                "--peers", "leafe-fast,hf-padded-eager,hf-liger-padded,hf-liger-packed"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"bench_train exited {proc.returncode}: {proc.stderr[-1500:]}")
    return {"command": " ".join(cmd[1:]), "result": json.loads(path.read_text())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI): checks the script, no GPU numbers")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all parts (seconds)")
    p.add_argument("--parts", default="pytest,loss,attention,train", help="comma list of parts to run")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    out_dir = args.out_dir or (ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"dry_run": dry, "env": env_info(), "optional_peers": {
        m: _importable(m) for m in ("liger_kernel", "cut_cross_entropy", "flash_attn")}}
    if "pytest" in parts:
        run_part("pytest_gpu", lambda: part_pytest(dry, min(150.0, budget.left())), budget, 30, report)
    if "loss" in parts:
        run_part("loss", lambda: part_loss(dry), budget, 60, report)
    if "attention" in parts:
        run_part("attention", lambda: part_attention(dry), budget, 20, report)
    if "train" in parts:
        for config in (["tiny"] if dry else ["qwen2.5-0.5b", "qwen2.5-1.5b"]):
            run_part(f"train_{config}", lambda c=config: part_train(dry, c, max(30.0, budget.left() - 10), out_dir),
                     budget, 60, report)
    device = "dry_run" if dry else torch.cuda.get_device_name(0).split()[-1].lower()
    path = write_result(str(out_dir / f"gpu_check_{device}"), report)
    print(f"wrote {path}")
    failed = [k for k, v in report.items() if isinstance(v, dict) and str(v.get("status", "ok")).startswith("error")]
    return 1 if failed else 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
