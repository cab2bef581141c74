"""Every LM-head kernel variant compiles for a CUDA target ahead of time, on the CPU, within shared
memory and without register spills (issue 14 item 2). No GPU needed: ``triton.compile`` with
``GPUTarget("cuda", arch, 32)``, shared memory from the compiled metadata, registers and spills from the
bundled ``ptxas -v`` (see ``leafe_fast.kernels.aot_check``).

The fast test covers what a bf16 training run on an H100/H200 can start (sm_90, default flags, both
operand paths); the full matrix (all flags, fp16/fp32, sm_80) is ``-m slow``. Compiles run in a
subprocess without TRITON_INTERPRET (CI runs the other tests under the interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")


def _run(tmp_path, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "reports.json"
    proc = subprocess.run([sys.executable, "-m", "leafe_fast.kernels.aot_check", "--json", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"aot_check did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _bad(reports: list[dict]) -> list[str]:
    return [f"{r['variant']}: smem {r['shared_bytes']} B (limit {r['smem_limit']}), {r['registers']} regs, "
            f"spills {r['spill_stores']}/{r['spill_loads']} B" for r in reports if not r["ok"]]


def test_bf16_variants_compile_clean_for_sm90(tmp_path):
    reports = _run(tmp_path)
    kernels = {r["variant"].split("[")[0] for r in reports}
    assert kernels == {"fwd", "dz", "bwd_atomic", "row"}
    assert all("sm_90" in r["variant"] and "bf16" in r["variant"] for r in reports)
    assert any("TMA=1" in r["variant"] for r in reports) and any("TMA=0" in r["variant"] for r in reports)
    assert not _bad(reports), "\n".join(_bad(reports))


@pytest.mark.slow
def test_full_matrix_compiles_clean(tmp_path):
    """All flag combinations, bf16/fp16/fp32, sm_90 and sm_80 (several minutes on 2 cores). fp32 operands
    use tf32x3 on tensor cores; their register budget is reported but only bf16/fp16 must be spill-free."""
    reports = _run(tmp_path, "--full", "--jobs", str(max(1, min(4, os.cpu_count() or 1))))
    low = [r for r in reports if "fp32 " not in r["variant"]]
    assert not _bad(low), "\n".join(_bad(low))
    assert all(r["shared_bytes"] <= r["smem_limit"] for r in reports), "\n".join(_bad(reports))


def test_aot_check_sees_a_spilling_config():
    """The checker can fail: a deliberately oversized pointer-path tile spills on sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from leafe_fast.kernels import aot_check as A\n"
        "v = next(v for v in A.variants() if v.kernel == 'fwd' and dict(v.flags)['TMA'] is False)\n"
        "big = A.Variant('fwd', 'bf16', 90, v.flags, (('BLOCK_D', 64), ('BLOCK_M', 128), ('BLOCK_V', 256)), 4, 4)\n"
        "r = A.compile_variant(big)\n"
        "print('OK' if r.ok else 'BAD', r.registers, r.spill_stores)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.startswith("BAD"), proc.stdout + proc.stderr[-2000:]
