"""Shared helpers for the benchmark scripts: environment header, timing, peak memory, output files.

Every benchmark writes one JSON file under ``benchmarks/results/`` whose ``env`` block says where the
numbers came from (device, versions, date, commit), so a CPU or Triton-interpreter number can never be
mistaken for a GPU one. Import as ``from benchmarks.common import ...`` (run scripts from the repo root
with ``python -m benchmarks.<script>``) or as ``common`` when the script sits beside this file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # an optional peer that is missing or broken is just "absent"
        return None
    return getattr(mod, "__version__", "unknown")


def env_info() -> dict[str, Any]:
    """Device, versions, date and commit: the header every result file carries."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_type": "cuda" if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "commit": _git_commit(),
        "platform": platform.platform(),
    }
    return info


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (of ``device``, default: the current one); a no-op on the CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], warmup: int = 3, iters: int = 10, *,
            before: Callable[[], Any] | None = None, host: bool = False) -> dict[str, Any]:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised), plus spread and every run.

    Warm-up calls are dropped (compilation, autotuning, allocator growth). On CUDA each call is timed
    with events; on the CPU, or with ``host=True`` (host-only work such as packing), with ``perf_counter``.
    ``before`` runs untimed ahead of every timed call (e.g. dropping a cache for a cold run).
    ``runs_ms`` lists the timed calls in call order.
    """
    for _ in range(max(0, warmup)):
        fn()
    sync()
    times: list[float] = []
    cuda = torch.cuda.is_available() and not host
    for _ in range(max(1, iters)):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    runs = list(times)
    times.sort()
    n = len(times)
    return {
        "runs_ms": runs,
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (n - 1))],
        "p80_ms": times[int(0.8 * (n - 1))],
        "min_ms": times[0],
        "iters": n,
    }


def peak_memory(fn: Callable[[], Any]) -> float | None:
    """Extra peak CUDA memory (GiB) of one ``fn()`` call above what was allocated before; None on CPU."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (env header added if absent); returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    body = dict(payload)
    body.setdefault("env", env_info())
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def save_plot(
    name: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    ylabel: str = "median ms (lower is better)",
    title: str = "",
    groups: Sequence[str] | None = None,
    logy: bool = False,
) -> Path | None:
    """Bar chart ``benchmarks/results/<name>.png``; bars with value None are drawn as 'n/a'.

    ``groups`` (one per bar, e.g. the shape) colours the bars by group; ``logy`` for values that span
    orders of magnitude. Returns None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    vals = [float("nan") if v is None else float(v) for v in values]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if groups is not None:
        keys = list(dict.fromkeys(groups))
        colors = [palette[keys.index(g) % len(palette)] for g in groups]
    else:
        colors = [palette[0]] * len(labels)
    floor = min([v for v in vals if v == v and v > 0], default=1.0) / 2 if logy else 0.0
    ax.bar(range(len(labels)), [floor if v != v else v for v in vals], color=colors)
    for i, v in enumerate(vals):
        ax.text(i, floor if v != v else v, "n/a" if v != v else f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    if groups is not None:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=palette[i % len(palette)], label=k) for i, k in enumerate(keys)], fontsize=7)
    return save_figure(fig, name)


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, name: str) -> Path:
    """Lay out ``fig``, write it to ``benchmarks/results/<name>.png`` and close it; returns the path."""
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
