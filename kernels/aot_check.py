"""Ahead-of-time compile check of every kernel variant the launchers can start, for a CUDA target, on a
CPU machine (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds each (kernel, autotune
config, flag combination, dtype) to PTX and cubin; shared memory comes from the compiled metadata,
registers and spills from the bundled ``ptxas -v``. ``tests/test_kernel_compile.py`` runs the bf16 /
default-flag set for sm_90 in CI and the full matrix (all flags, fp16/fp32, sm_80) under ``-m slow``.

    python -m leafe_fast.kernels.aot_check [--full] [--arch 90] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block: H100/H200, A100
REG_LIMIT = 255
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Variant:
    """One compile job: kernel name, its runtime-argument types, constexpr values and launch options."""

    kernel: str
    dtype: str
    arch: int
    flags: tuple[tuple[str, Any], ...]
    config: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        c = dict(self.config)
        cfg = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_D") if k in c) or str(c.get("BLOCK_V"))
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.flags if k != "DOT_PREC")
        return f"{self.kernel}[{self.dtype} sm_{self.arch} {cfg} w{self.num_warps} s{self.num_stages} {flags}]"


@dataclass
class Report:
    variant: str
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    smem_limit: int

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= self.smem_limit


def _kernels() -> dict[str, Any]:
    from leafe_fast.kernels import leafe_ce_triton as K

    return {"fwd": K._lse_fwd_kernel, "dz": K._dz_kernel, "bwd_atomic": K._ce_bwd_kernel, "row": K._row_grad_kernel}


def _signature(kernel: str, ptr: str) -> dict[str, str]:
    lead = {"H_ptr": ptr, "W_ptr": ptr, "B_ptr": ptr, "tgt_ptr": "*i64", "M": "i32", "V": "i32", "D": "i32",
            "stride_h": "i32", "stride_w": "i32", "softcap": "fp32"}
    f32 = "*fp32"
    if kernel == "fwd":
        return {**lead, "m_part_ptr": f32, "s_part_ptr": f32, "tgt_part_ptr": f32}
    if kernel == "dz":
        return {**lead, "lse_ptr": f32, "g_ptr": f32, "DZ_ptr": ptr, "DB_ptr": f32, "ldz": "i32", "v_lo": "i32",
                "v_hi": "i32", "z_loss": "fp32"}
    if kernel == "bwd_atomic":
        return {**lead, "lse_ptr": f32, "g_ptr": f32, "gmax_ptr": f32, "DH_ptr": f32, "DW_ptr": f32, "DB_ptr": f32,
                "v_lo": "i32", "v_hi": "i32", "z_loss": "fp32"}
    return {"Z_ptr": f32, "B_ptr": ptr, "tgt_ptr": "*i64", "lse_ptr": f32, "t_ptr": f32, "LIKE_ptr": ptr,
            "V": "i32", "ldz": "i32", "softcap": "fp32", "z_loss": "fp32"}


def _flag_sets(kernel: str, full: bool) -> list[dict[str, bool]]:
    """The flag combinations the launchers pass (default: no bias, no soft-cap, every gradient wanted)."""
    names = {"fwd": [], "dz": ["COMPUTE_DB"], "bwd_atomic": ["COMPUTE_DH", "COMPUTE_DW", "COMPUTE_DB"],
             "row": ["COMPUTE_DZ"]}[kernel]
    common = ["HAS_BIAS", "SOFTCAP"]
    if not full:
        default = {"HAS_BIAS": False, "SOFTCAP": False, "COMPUTE_DB": False, "COMPUTE_DH": True, "COMPUTE_DW": True,
                   "COMPUTE_DZ": True}
        return [{k: default[k] for k in common + names}]
    out = []
    for values in itertools.product([False, True], repeat=len(common) + len(names)):
        flags = dict(zip(common + names, values))
        if kernel == "bwd_atomic" and not (flags["COMPUTE_DH"] or flags["COMPUTE_DW"]):
            continue  # never launched: the backward is skipped when nothing is wanted
        out.append(flags)
    return out


def variants(dtypes: tuple[str, ...] = ("bf16",), archs: tuple[int, ...] = (90,), full: bool = False) -> Iterator[Variant]:
    """Every (kernel, config, flags, dtype, arch) the launchers can start (``full=False``: default flags)."""
    from leafe_fast.kernels import leafe_ce_triton as K

    for name, kern in _kernels().items():
        for dtype, arch, flags in itertools.product(dtypes, archs, _flag_sets(name, full)):
            extra: dict[str, Any] = dict(flags)
            if name == "row":
                paths = [None]
            else:
                extra["DOT_PREC"] = "tf32x3" if dtype == "fp32" else "tf32"
                extra["UPCAST"] = False
                # sm_90+: TMA for aligned operands (every real head), pointers for misaligned ones; older: pointers
                paths = [True, False] if arch >= 90 else [False]
            for tma, cfg in itertools.product(paths, kern.configs):
                if tma is not None and not K.config_fits(cfg, tma, dtype == "fp32"):
                    continue  # early_config_prune never starts it on this path
                flags_all = dict(extra) if tma is None else {**extra, "TMA": tma}
                yield Variant(name, dtype, arch, tuple(sorted(flags_all.items())), tuple(sorted(cfg.kwargs.items())),
                              cfg.num_warps, cfg.num_stages)


def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        from triton import knobs

        return knobs.nvidia.ptxas.path


def compile_variant(v: Variant) -> Report:
    """Compile one variant for its target and read shared memory, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = _kernels()[v.kernel]
    sig = _signature(v.kernel, DTYPES[v.dtype])
    constexprs = {**dict(v.flags), **dict(v.config)}
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(kern.fn, sig, constexprs=constexprs, attrs={})
    compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{v.arch}a" if v.arch >= 90 else f"sm_{v.arch}"
        log = subprocess.run([_ptxas(v.arch), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"aot_check: cannot read ptxas -v output for {v.label()}:\n{log}")
    return Report(v.label(), int(compiled.metadata.shared), int(regs[-1]), int(spills[-1][0]), int(spills[-1][1]),
                  SMEM_LIMIT[v.arch])


def check(vs: list[Variant], jobs: int = 2) -> list[Report]:
    """Compile ``vs`` in ``jobs`` processes (each variant is independent; compiles are CPU bound)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if jobs <= 1:
        return [compile_variant(v) for v in vs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, vs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compile every kernel variant ahead of time; report smem/regs/spills")
    p.add_argument("--full", action="store_true", help="all flags, bf16/fp16/fp32, sm_90 and sm_80")
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--kernel", nargs="*", help="only these kernels (fwd, dz, bwd_atomic, row)")
    p.add_argument("--arch", nargs="*", type=int, help="only these archs (with --full)")
    p.add_argument("--dtype", nargs="*", help="only these dtypes (with --full)")
    p.add_argument("--json", type=str, help="also write the reports to this JSON file")
    args = p.parse_args(argv)
    vs = list(variants(("bf16", "fp16", "fp32"), (90, 80), True) if args.full else variants())
    if args.kernel:
        vs = [v for v in vs if v.kernel in args.kernel]
    if args.arch:
        vs = [v for v in vs if v.arch in args.arch]
    if args.dtype:
        vs = [v for v in vs if v.dtype in args.dtype]
    reports = check(vs, args.jobs)
    bad = [r for r in reports if not r.ok]
    for r in reports:
        print(("OK  " if r.ok else "BAD ") + f"{r.variant}: smem {r.shared_bytes} B, {r.registers} regs, "
              f"spill {r.spill_stores}/{r.spill_loads} B")
    print(f"{len(reports)} variants, {len(bad)} over the limits")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "ok": r.ok} for r in reports], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["Report", "Variant", "asdict", "check", "compile_variant", "variants"]
