"""Training metrics: tokens/s, MFU, memory, and one JSON line per logged step.

Two token counts: ``tokens`` are the samples' tokens back to back (what the data holds: the flat layout's
count, the basis of ``tokens_per_s``), ``computed_tokens`` the tokens the model actually ran (fewer with
the trie layout, which computes a shared prefix once). MFU counts computed tokens only (padding never
counts) at ``6 N`` FLOPs per token, ``N`` from
:func:`leafe_fast.train.model.count_parameters` (input embedding table excluded unless tied to the head),
over a peak rate that is either measured here (a large bf16 matmul, ``measure_matmul_flops``) or taken
from a small table of vendor dense bf16 peaks. Attention FLOPs are not counted, so MFU is conservative
for long samples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) per device-name fragment, from vendor data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def flops_per_token(num_params: int) -> float:
    return 6.0 * num_params


def peak_flops_from_table(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():
        if key in name:
            return val
    return None


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int = 8192, iters: int = 20,
    trials: int = 5,
) -> float:
    """Achieved FLOP/s of a square matmul on ``device``: the practical peak MFU is measured against.

    The best of ``trials`` timed runs: a peak is what the hardware can do, and a shared machine only
    ever makes a run slower. On the CPU use a small ``size`` (e.g. 512) and fp32: bf16 matmuls on CPUs
    without AMX are emulated.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(max(1, trials)):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = max(best, 2.0 * size**3 * iters / (time.perf_counter() - t0))
    return best


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak and current allocated GiB on CUDA; resident set size of the process on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        import resource

        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"mem_peak_rss_gib": rss_kib / 2**20}
    except Exception:
        return {}


class Throughput:
    """Tokens/s and MFU over the interval since the last ``measure`` call."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def measure(self, tokens: int, computed_tokens: int | None = None) -> dict[str, float]:
        """``tokens``: sample tokens processed by ALL ranks since the last call; ``computed_tokens``: the
        tokens the model ran for them (default: ``tokens``). MFU counts the computed ones."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        self._t = now
        computed = tokens if computed_tokens is None else computed_tokens
        out = {"tokens_per_s": tokens / dt, "computed_tokens_per_s": computed / dt, "step_time_s": dt}
        if self.peak_flops:
            out["mfu"] = computed / dt * self.flops_per_token / (self.peak_flops * self.world_size)
        return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one object per line, flushed each write: a crash loses nothing)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @staticmethod
    def truncate_after(path: str | Path, step: int) -> int:
        """Keep only the records of ``path`` up to ``step`` (a resume from that step logs the rest again).

        A last line cut by a crash, or any line that is not a JSON record with a ``step``, is dropped too.
        Rewritten atomically (tmp + rename). Returns the number of records dropped.
        """
        path = Path(path)
        if not path.exists():
            return 0
        keep, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and int(rec["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return dropped
