"""The build-data, eval and bench subcommands through ``leafe_fast.cli.main``."""

from __future__ import annotations

import json
import sys

import pytest

from leafe_fast.cli import main
from leafe_fast.data import Node, SampleColumns, Tree, TreeWriter


def _tree(task_id: str, success: bool = True) -> Tree:
    nodes = [
        Node(0, -1, 0, [10, 11], [20], done=True),
        Node(1, -1, 0, [12], [21], done=True, success=success, experience_ids=[90], rollback_from=0, branch=1),
    ]
    return Tree(task_id, "toy", [1, 2, 3], [7], nodes, success=success)


def test_build_data_writes_samples_and_stats(tmp_path, capsys):
    trees = tmp_path / "trees.jsonl"
    with TreeWriter(trees) as w:
        w.write(_tree("a"))
        w.write(_tree("b", success=False))
    out = tmp_path / "data" / "samples.npz"
    stats = tmp_path / "stats.json"
    rc = main(["build-data", str(trees), "--out", str(out), "--stats-json", str(stats),
               "--counterfactual-weight", "0.5", "--counterfactual-steps", "all"])
    assert rc == 0
    cols = SampleColumns.load(out)
    # tree a: one rehearsal and one counterfactual with the same tokens, different groups and weights
    assert sorted(zip(cols.group.tolist(), cols.weight.tolist())) == [(0, 1.0), (1, 0.5)]
    assert cols.tokens.tolist() == [1, 2, 3, 7, 12] * 2
    printed = capsys.readouterr().out
    assert "1 rehearsal" in printed and "1 counterfactual" in printed and "wrote 2 samples" in printed
    record = json.loads(stats.read_text())
    assert record["trees"] == 2 and record["trees_with_success"] == 1 and record["tokens"] == 10


def test_build_data_errors_are_clear(tmp_path, capsys):
    assert main(["build-data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": "leafe.tree/1"}\n')
    assert main(["build-data", str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-data", str(bad), "--out", "x.npz", "--counterfactual-steps", "0"])


def test_eval_cli_on_a_saved_tiny_model(tmp_path, capsys):
    from leafe_fast.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "2", "--n", "2", "--k", "1,2", "--max-turns", "3",
               "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_tasks"] == 2 and res["n"] == 2 and set(res["pass@k"]) == {"1", "2"}
    assert all(len(t["steps"]) == 2 and max(t["steps"]) <= 3 for t in res["tasks"])
    assert "pass@2" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert main(["eval", "--model", str(model_dir), "--n", "2", "--k", "4"]) == 2
    assert "k=4 > n=2" in capsys.readouterr().err


def test_bench_runs_the_checkout_script(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    marker = tmp_path / "ran.json"
    (bench / "bench_pack.py").write_text(
        "import json, sys\n"
        f"json.dump(sys.argv[1:], open({str(marker)!r}, 'w'))\n"
        "sys.exit(3 if '--fail' in sys.argv else 0)\n"
    )
    assert main(["bench", "pack", "--benchmarks-dir", str(bench), "--", "--quick", "--size", "4"]) == 0
    assert json.loads(marker.read_text()) == ["--quick", "--size", "4"]
    assert main(["bench", "pack", "--benchmarks-dir", str(bench), "--", "--fail"]) == 3  # exit status passes through
    assert main(["bench", "loss", "--benchmarks-dir", str(bench)]) == 2
    assert "bench_loss.py does not exist" in capsys.readouterr().err


def test_bench_without_a_checkout_says_so(monkeypatch, capsys):
    import leafe_fast.bench_command as bc

    monkeypatch.setattr(bc, "find_benchmarks_dir", lambda start=None: None)
    assert main(["bench", "train"]) == 2
    assert "source repository" in capsys.readouterr().err


def test_bench_finds_benchmarks_from_a_subfolder(tmp_path):
    from leafe_fast.bench_command import find_benchmarks_dir

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_x.py").write_text("")
    (tmp_path / "a" / "b").mkdir(parents=True)
    found = find_benchmarks_dir(tmp_path / "a" / "b")
    # the package's own checkout wins when it has benchmark scripts; otherwise the folder above cwd
    assert found is not None and found.name == "benchmarks" and any(found.glob("bench_*.py"))
    assert sys.executable  # the scripts run with this interpreter
