"""Which dtype the "chunked" schedule stores its logits chunk in: measured against float64 on the CPU.

The chunked schedule keeps a ``[R, V]`` logits block per row chunk between the cuBLAS matmul and the
Triton row kernel. This script measures, at a Qwen2.5-7B-like head (H = 3584, V = 152064) and a few rows,
the error of lse, of the loss and of ``d_hidden`` when that block is stored in fp32, bf16 or fp16 (the
matmul itself accumulates in fp32, as cuBLAS does), against float64 from the same bf16 inputs. The
answer decides ``LOGITS_BUDGET_BYTES // (4 * V)`` rows per chunk (fp32) in ``leafe_ce_triton``.

    python -m benchmarks.logit_chunk_precision [--rows 32] [--hidden 3584] [--vocab 152064]

CPU only (numbers of precision, not speed); writes ``benchmarks/results/logit_chunk_precision.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def measure(rows: int, hidden: int, vocab: int, logit_std: float, seed: int = 0) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, generator=gen) * (logit_std / hidden**0.5)).bfloat16()
    w[:64] += (torch.randn(64, hidden, generator=gen) * (3 * logit_std / hidden**0.5)).bfloat16()  # hot tokens
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    z64 = h.double() @ w.double().T
    lse64 = z64.logsumexp(1)
    loss64 = (lse64 - z64.gather(1, targets[:, None]).squeeze(1)).mean()
    onehot = torch.nn.functional.one_hot(targets, vocab).double()
    dh64 = (torch.softmax(z64, 1) - onehot) @ w.double() / rows
    z32 = h.float() @ w.float().T  # fp32 accumulation, as cuBLAS with an fp32 output
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        z = z32.to(dt).double()
        lse = z.logsumexp(1)
        loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).mean()
        dz = (torch.softmax(z, 1) - onehot).to(torch.bfloat16).double()  # dlogits in the input dtype
        dh = dz @ w.double() / rows
        out[name] = {
            "max_abs_lse_err": (lse - lse64).abs().max().item(),
            "rel_loss_err": abs((loss - loss64).item()) / abs(loss64.item()),
            "rel_d_hidden_err": ((dh - dh64).abs().max() / dh64.abs().max()).item(),
            "bytes_per_logit": torch.finfo(dt).bits // 8,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32, help="rows M (the error is per row; a few suffice)")
    p.add_argument("--hidden", type=int, default=3584, help="H")
    p.add_argument("--vocab", type=int, default=152064, help="V")
    args = p.parse_args(argv)
    results = {f"logit_std={s}": measure(args.rows, args.hidden, args.vocab, s) for s in (2.0, 6.0)}
    path = write_result("logit_chunk_precision", {"shape": vars(args), "results": results})
    for case, by_dtype in results.items():
        for name, r in by_dtype.items():
            print(f"{case:14s} {name}: lse err {r['max_abs_lse_err']:.2e}  loss rel {r['rel_loss_err']:.2e}  "
                  f"d_hidden rel {r['rel_d_hidden_err']:.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
