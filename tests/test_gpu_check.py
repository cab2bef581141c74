"""``benchmarks/gpu_check.py --dry-run``: every part of the GPU check runs at tiny shapes on the CPU, so the
script that will run on a GPU machine cannot rot between GPU sessions (its numbers here mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_one_json_with_every_part(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out-dir", str(tmp_path),
         "--parts", "loss,attention,train"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["dry_run"] is True and report["env"]["device_type"] == "cpu"
    loss = report["loss"]
    assert loss["status"] == "ok"
    by_variant = {r["variant"]: r for r in loss["results"]}
    for name in ("leafe_torch", "leafe_chunked"):
        assert by_variant[name]["status"] == "ok", by_variant[name]
        assert by_variant[name]["d_hidden_rel_err"] < 1e-4 and by_variant[name]["ratio_to_floor"] > 0
    assert report["attention"]["status"] == "ok"
    assert all("max_abs_err" in b and b["max_abs_err"] < 1e-4 for b in report["attention"]["backends"].values())
    train = report["train_tiny"]
    assert train["status"] == "ok", train
    results = train["result"]["results"]
    assert "leafe-fast" in results and results["hf-padded-eager"]["tokens_per_s"] > 0
    # the training goal is against HF + Liger padded batches: wired in, skipped with a note off CUDA
    for peer in ("hf-liger-padded", "hf-liger-packed"):
        assert "liger" in results[peer]["skipped"], results[peer]
    assert train["result"]["speedup_vs_hf_liger_padded"] is None


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path is for CPU-only machines")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
