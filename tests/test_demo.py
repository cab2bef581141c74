"""``leafe-fast demo`` in quick mode, end to end in a temporary folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leafe_fast.cli import main
from leafe_fast.data import SampleColumns, read_trees


def test_demo_quick_mode_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--tasks", "3", "--eval-tasks", "2", "--n", "2", "--k", "1,2,8",
            "--max-episode-steps", "12", "--max-branches", "2", "--format-sft-steps", "12", "--train-steps", "2",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "leafe-fast demo report" in printed and "pass@2" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "leafe.demo/1"
    trees = read_trees(out / "trees.jsonl")
    assert sorted(t.task_id for t in trees) == sorted(report["tasks"]["train"]) and len(trees) == 3
    assert report["explore"]["finished"] == 3 and report["explore"]["successes"] == sum(t.success for t in trees)
    cols = SampleColumns.load(out / "samples.npz")
    assert len(cols) == sum(report["samples"]["samples"].values())
    assert report["warmup"]["steps"] == 12 and report["warmup"]["final_loss"] < report["warmup"]["first_loss"]
    for key in ("eval_before", "eval_after"):
        pk = report[key]["pass@k"]
        assert set(pk) == {"1", "2"}  # k=8 > n=2 is left out
        assert 0.0 <= pk["1"] <= pk["2"] <= 1.0
        assert sorted(report[key]["successes"]) == sorted(report["tasks"]["test"])
    if len(cols):
        assert report["train"]["steps"] == 2 and np.isfinite(report["train"]["final_loss"])
        assert report["packing"]["target_rows"] == int(cols.target_mask.sum())
    else:
        assert report["train"]["steps"] == 0 and "skipped" in report["train"]
    assert report["timings_s"]["total"] > 0
    # the method as issue 11 asks: diagnosis reflector, periodic reflection, the LEAFE recipe, and a report
    # with both groups' token counts and the dropped-sample counts
    assert all(t.meta["reflector"] == "grounded" and not t.meta["ablation"] for t in trees)
    assert all(t.meta["config"]["reflect_every"] == 3 for t in trees)
    assert report["samples"]["recipe"] == "leafe" and "counterfactual_dropped" in report["samples"]
    assert "rehearsal (" in printed and "counterfactual (" in printed and "target tokens" in printed
    assert "dropped:" in printed and "same-as-abandoned" in printed and "never succeeded" in printed


def test_demo_rerun_starts_fresh_and_keeps_other_files(tmp_path):
    from leafe_fast.demo import _fresh_outputs

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("{}")
    (tmp_path / "trees.jsonl").write_text("stale")
    (tmp_path / "notes.txt").write_text("mine")
    _fresh_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path), "--tasks", "0"])
    assert exit_.value.code == 2 and "--tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--k", "1,x"])
    assert "--k" in capsys.readouterr().err
