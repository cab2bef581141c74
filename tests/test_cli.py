"""The CLI through ``leafe_fast.cli.main``: build-data, eval and bench, the one error boundary
(user mistakes -> one line + exit 2, bugs -> traceback), and the frozen flag surface."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

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
               "--counterfactual-weight", "0.5", "--counterfactual-steps", "all",
               "--guided", "rehearsal"])  # the guided success as rehearsal too (default: left out)
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
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file


def test_eval_cli_defaults_are_the_api_defaults():
    """`leafe-fast eval` and `leafe_fast.eval.evaluate` run the same evaluation when nothing is given."""
    import inspect

    from leafe_fast.eval import evaluate
    from leafe_fast.eval.command import EvalConfig

    api = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()}
    cfg = EvalConfig()
    assert (cfg.n, tuple(cfg.k), cfg.max_turns, cfg.seed) == (api["n"], tuple(api["ks"]), api["max_turns"], api["seed"])
    assert api["sampling"] is None and cfg.max_new_tokens is None  # both: the env's action token limit
    from leafe_fast.engines.base import SamplingParams

    assert (cfg.temperature, cfg.top_p) == (SamplingParams().temperature, SamplingParams().top_p)


@pytest.mark.parametrize("argv, words", [
    (["--model", "{missing}"], "--model: {missing} is not a local model directory"),
    (["--model", "{empty}"], "has no config.json"),
    (["--model", "{model}", "--n", "2", "--k", "4"], "--k: k=4 > n=2"),
    (["--model", "{model}", "--env", "chess"], "--env: unknown environment 'chess'"),
    (["--model", "{model}", "--out", "{model}"], "--out: {model} is a directory"),
    (["--model", "{model}", "--env-arg", "no_such_option=1"], "--env-arg: "),
    (["--model", "{model}", "--task-arg", "no_such_option=1"], "--task-arg: "),
])
def test_eval_user_errors_are_one_line_naming_the_flag(argv, words, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    paths = {k: str(tmp_path / k) for k in ("missing", "empty", "model")}
    assert main(["eval", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leafe-fast eval: error: ") and err.count("\n") == 1
    assert words.format(**paths) in err


@pytest.mark.parametrize("argv, words", [
    (["eval", "--model", "m", "--tasks", "0"], "argument --tasks: must be >= 1, got 0"),
    (["eval", "--model", "m", "--n", "four"], "argument --n: expected an integer, got 'four'"),
    (["eval", "--model", "m", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (["eval"], "the following arguments are required: --model"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and words in err, err


def _fake_command(tmp_path, monkeypatch, body: str) -> None:
    """Register `leafe-fast fake`, whose run() executes ``body``."""
    (tmp_path / "fake_cmd.py").write_text(textwrap.dedent(f"""
        from leafe_fast.errors import UserError

        def add_arguments(p):
            p.add_argument("--x", type=int, default=0, help="x")

        def run(args):
            {body}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import leafe_fast.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_cmd", "a test command"))
    sys.modules.pop("fake_cmd", None)


def test_user_error_from_a_stage_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _fake_command(tmp_path, monkeypatch, 'raise UserError("data.jsonl:3", "max_branches is \'four\'", "write an integer\\nplease")')
    assert main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err == "leafe-fast fake: error: data.jsonl:3: max_branches is 'four'; write an integer please\n"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    _fake_command(tmp_path, monkeypatch, 'raise RuntimeError("a real bug")')
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["fake"])
    _fake_command(tmp_path, monkeypatch, 'raise ValueError("a plain ValueError is a bug too")')
    with pytest.raises(ValueError, match="is a bug too"):
        main(["fake"])


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch, capsys):
    _fake_command(tmp_path, monkeypatch, "import sglang_not_installed_xyz")
    assert main(["fake"]) == 2
    err = capsys.readouterr().err
    assert "'sglang_not_installed_xyz', which is not installed" in err and err.count("\n") == 1


def test_a_missing_stage_module_is_not_silent(monkeypatch):
    import leafe_fast.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "bench", ("leafe_fast.bench.command_gone", "x"))
    with pytest.raises(ModuleNotFoundError, match="command_gone"):
        main(["bench", "--help"])


def test_bench_runs_the_checkout_script(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    marker = tmp_path / "ran.json"
    (bench / "bench_pack.py").write_text(
        '"""Packer throughput."""\n'
        "import json, sys\n"
        f"json.dump(sys.argv[1:], open({str(marker)!r}, 'w'))\n"
        "sys.exit(3 if '--fail' in sys.argv else 0)\n"
    )
    assert main(["bench", "pack", "--benchmarks-dir", str(bench), "--", "--quick", "--size", "4"]) == 0
    assert json.loads(marker.read_text()) == ["--quick", "--size", "4"]
    assert main(["bench", "pack", "--benchmarks-dir", str(bench), "--", "--fail"]) == 3  # exit status passes through
    assert main(["bench", "loss", "--benchmarks-dir", str(bench)]) == 2
    assert "bench_loss.py does not exist" in capsys.readouterr().err
    assert main(["bench", "--list", "--benchmarks-dir", str(bench)]) == 0
    listing = capsys.readouterr().out
    assert "Packer throughput." in listing and "(missing)" in listing


def test_bench_all_runs_every_script_in_turn(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    log = tmp_path / "log.txt"
    for name in ("loss", "pack", "rollout", "train"):
        (bench / f"bench_{name}.py").write_text(
            f"open({str(log)!r}, 'a').write({name!r} + '\\n')\n"
            f"raise SystemExit({1 if name == 'pack' else 0})\n")
    assert main(["bench", "all", "--benchmarks-dir", str(bench)]) == 1  # pack failed, the others still ran
    assert log.read_text().split() == ["loss", "pack", "rollout", "train"]
    assert "failed: pack (exit 1)" in capsys.readouterr().err
    assert main(["bench", "all", "--benchmarks-dir", str(bench), "--", "--small"]) == 2


def test_bench_without_a_checkout_says_so(monkeypatch, capsys):
    import leafe_fast.bench.command as bc

    monkeypatch.setattr(bc, "find_benchmarks_dir", lambda start=None: None)
    assert main(["bench", "train"]) == 2
    assert "source repository" in capsys.readouterr().err


def test_bench_finds_benchmarks_from_a_subfolder(tmp_path):
    from leafe_fast.bench.command import find_benchmarks_dir

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "bench_x.py").write_text("")
    (repo / "a" / "b" / "benchmarks").mkdir(parents=True)  # no bench_*.py: not a benchmarks folder
    pkg = tmp_path / "site" / "leafe_fast"  # an installed package: no checkout beside it
    pkg.mkdir(parents=True)
    assert find_benchmarks_dir(repo / "a" / "b", package_dir=pkg) == repo / "benchmarks"
    assert find_benchmarks_dir(tmp_path / "site", package_dir=pkg) is None
    # the package's own checkout wins over the current directory
    (tmp_path / "site" / "benchmarks").mkdir()
    (tmp_path / "site" / "benchmarks" / "bench_y.py").write_text("")
    assert find_benchmarks_dir(repo / "a" / "b", package_dir=pkg) == tmp_path / "site" / "benchmarks"
    # and this checkout's own folder is found from anywhere
    assert find_benchmarks_dir(tmp_path) == Path(__file__).resolve().parents[1] / "benchmarks"


# --- the frozen CLI surface -------------------------------------------------------------------------
SURFACE = Path(__file__).parent / "data" / "cli_surface.json"
REGENERATE = "python -m leafe_fast.cli --dump-surface > tests/data/cli_surface.json"


def test_cli_surface_is_frozen():
    """Adding, renaming or re-defaulting a flag must be deliberate: regenerate the file with
    `python -m leafe_fast.cli --dump-surface > tests/data/cli_surface.json` and commit it."""
    from leafe_fast.cli import cli_surface

    stored = json.loads(SURFACE.read_text())
    now = json.loads(json.dumps(cli_surface()))
    assert sorted(now) == sorted(stored), f"subcommands changed; regenerate: {REGENERATE}"
    for cmd in now:
        added, removed = sorted(set(now[cmd]) - set(stored[cmd])), sorted(set(stored[cmd]) - set(now[cmd]))
        changed = sorted(k for k in set(now[cmd]) & set(stored[cmd]) if now[cmd][k] != stored[cmd][k])
        assert not (added or removed or changed), (
            f"`leafe-fast {cmd}` flags changed: added {added}, removed {removed}, changed {changed}; "
            f"if on purpose, regenerate: {REGENERATE}")


# one concept, one flag name in every command (see the naming table in DESIGN.md)
RETIRED = {"--budget": "--token-budget", "--steps": "--max-steps", "--train-steps-total": "--max-steps",
           "--tiny-family": "--tiny-style", "--warmup": "--warmup-steps", "--env-kwargs": "--env-arg",
           "--output": "--out", "--output-dir": "--out", "--no-export": "--export/--no-export"}
LONE_NO_FLAGS_LEFT: set[tuple[str, str]] = set()  # keep it empty: a bool flag is --x/--no-x


def test_flag_names_follow_one_scheme():
    from leafe_fast.cli import cli_surface

    surface = cli_surface()
    for cmd, args in surface.items():
        for name, a in args.items():
            for flag in a["flags"]:
                assert flag not in RETIRED or len(a["flags"]) > 1, f"{cmd} {flag}: use {RETIRED[flag]}"
                assert flag == flag.lower() and "_" not in flag, f"{cmd} {flag}: lower-case words joined by -"
            lone_no = a["flags"] and a["flags"][0].startswith("--no-") and len(a["flags"]) == 1
            assert not lone_no or (cmd, name) in LONE_NO_FLAGS_LEFT, (
                f"{cmd} {name}: declare a positive bool field (progress=True) to get --x/--no-x")
    # a flag shared by two commands means the same thing: same choices
    for flag in ("--tiny-style", "--split", "--env", "--engine", "--precision"):
        seen = {cmd: args[flag]["choices"] for cmd, args in surface.items() if flag in args}
        assert len({json.dumps(c) for c in seen.values()}) <= 1, f"{flag} differs between commands: {seen}"


def test_every_flag_is_documented():
    from leafe_fast.cli import cli_surface

    undocumented = [f"{cmd} {name}" for cmd, args in cli_surface().items()
                    for name, a in args.items() if not a["documented"]]
    assert not undocumented


def test_dump_surface_prints_the_stored_format(capsys):
    assert main(["--dump-surface"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert set(dumped) == {"explore", "build-data", "train", "eval", "demo", "bench", "repro"}
    assert dumped["eval"]["--tasks"]["default"] == 16 and dumped["eval"]["--split"]["choices"] == ["train", "val", "test"]


def test_flag_abbreviations_are_refused(capsys):
    """`--max-branch` must not silently mean `--max-branches`: a later flag would change its meaning."""
    from leafe_fast.cli import main

    try:
        rc = main(["explore", "--env", "sokoban", "--max-branch", "3"])
    except SystemExit as exc:  # argparse errors leave through SystemExit(2)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-branch" in err[0]
