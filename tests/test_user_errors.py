"""Issue 10, user errors at the explore / build-data / samples / eval boundaries: one ``UserError`` line
naming the file, line, field or flag (exit 2 from the CLI), nothing half-written, checked before the
model loads. One test per category."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leafe_fast.cli import main
from leafe_fast.data import Node, SampleColumns, Tree, TreeWriter, read_trees
from leafe_fast.data.schema import TreeFormatError
from leafe_fast.errors import UserError


def _tree(task_id="a", action=(12,)) -> Tree:
    nodes = [Node(0, -1, 0, list(action), [21], done=True, success=True)]
    return Tree(task_id, "toy", [1, 2, 3], [7], nodes, success=True)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if explore gets as far as loading a model."""
    import leafe_fast.explore.command as command

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input mistake was reported")

    monkeypatch.setattr(command, "build_engine", refuse)


def _explore(tmp_path, *extra):
    return main(["explore", "--env", "sokoban", "--model", "tiny", "--tasks", "1", "--no-progress",
                 "--out", str(tmp_path / "t.jsonl"), *extra])


# --- trees files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line, problem", [
    ("[1, 2, 3]", "expected a JSON object"),
    ('"a tree"', "expected a JSON object"),
    ('{"schema": "leafe.tree/1", "task_id": "x", "env": "e", "prompt_ids": [1], "header_ids": [], "nodes": 5}',
     "'nodes' must be a list"),
    ('{"schema": "leafe.tree/1", "task_id": "x", "env": "e", "prompt_ids": ["a"], "header_ids": [], "nodes": []}',
     "prompt_ids must be a list of integers"),
])
def test_a_trees_line_that_is_json_but_not_a_tree_names_the_line(tmp_path, capsys, line, problem):
    path = tmp_path / "trees.jsonl"
    path.write_text(_tree().to_json() + "\n" + line + "\n")
    with pytest.raises(TreeFormatError, match=f"trees.jsonl:2: .*{problem}"):
        read_trees(path)
    assert main(["build-data", str(path), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "trees.jsonl:2" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s.npz").exists()


# --- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, where", [
    ({"max_branches": "four"}, "max_branches"),
    ({"reflect_every": 1.5}, "reflect_every"),
    ({"summary": "yes"}, "summary"),
    ({"tasks": "many"}, "tasks"),
    ({"reflector": "magic"}, "reflector"),
])
def test_a_config_with_a_wrong_type_names_the_field(tmp_path, capsys, no_model, data, where):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(data))
    assert _explore(tmp_path, "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and where in err and "Traceback" not in err


def test_a_config_that_is_not_a_json_object_or_a_directory(tmp_path, capsys, no_model):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("[1]")
    assert _explore(tmp_path, "--config", str(cfg)) == 2
    assert "JSON object" in capsys.readouterr().err
    assert _explore(tmp_path, "--config", str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err


# --- task and env arguments, before the model loads -------------------------------------------------
@pytest.mark.parametrize("flag, key", [("--task-arg", "num_boxs"), ("--env-arg", "max_stepz")])
def test_unknown_task_and_env_args_are_reported_before_the_model_loads(tmp_path, capsys, no_model, flag, key):
    assert _explore(tmp_path, flag, f"{key}=2") == 2
    err = capsys.readouterr().err
    assert flag in err and key in err
    assert not (tmp_path / "t.jsonl").exists() or (tmp_path / "t.jsonl").read_bytes() == b""


@pytest.mark.parametrize("flag, value", [("--task-arg", "difficulty=impossible"), ("--env-arg", "max_steps=-3")])
def test_bad_task_and_env_arg_values_are_reported_before_the_model_loads(tmp_path, capsys, no_model, flag, value):
    assert _explore(tmp_path, flag, value) == 2
    err = capsys.readouterr().err
    assert value.split("=")[0] in err and len(err.strip().splitlines()) == 1


# --- samples files ----------------------------------------------------------------------------------
def _good_columns() -> SampleColumns:
    from leafe_fast.data import Sample

    return SampleColumns.from_samples([Sample(np.array([1, 2, 3]), np.array([0, 0, 1], bool))])


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("not a zip"), "not a readable .npz"),
    (lambda p: np.savez(open(p, "wb"), tokens=np.arange(3)), "lacks the arrays"),
    (lambda p: np.savez(open(p, "wb"), **{**vars(_good_columns()), "group": np.zeros(5, np.int8)}), "group has 5"),
    (lambda p: np.savez(open(p, "wb"), **{**vars(_good_columns()), "tokens": np.array([1, -2, 3], np.int32)}),
     "token id -2"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_bad_samples_files_are_user_errors(tmp_path, make, problem):
    path = tmp_path / "s.npz"
    make(path)
    with pytest.raises(UserError, match=problem):
        SampleColumns.load(path)


# --- token ids in build-data -----------------------------------------------------------------------
def test_negative_and_out_of_vocab_token_ids_are_refused(tmp_path, capsys):
    path = tmp_path / "trees.jsonl"
    record = json.loads(_tree().to_json())
    record["nodes"][0]["action_ids"] = [-5]
    path.write_text(json.dumps(record) + "\n")
    assert main(["build-data", str(path), "--out", str(tmp_path / "s.npz")]) == 2
    assert "token id -5" in capsys.readouterr().err
    with TreeWriter(tmp_path / "big.jsonl") as w:
        w.write(_tree(action=(900,)))
    assert main(["build-data", str(tmp_path / "big.jsonl"), "--out", str(tmp_path / "s.npz"),
                 "--vocab-size", "512"]) == 2
    assert "token id 900 is outside the vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


# --- empty input must not become valid-looking output -------------------------------------------------
def test_an_empty_trees_file_writes_no_samples_file(tmp_path, capsys):
    empty = tmp_path / "trees.jsonl"
    empty.write_text("")
    out = tmp_path / "s.npz"
    assert main(["build-data", str(empty), "--out", str(out)]) == 2
    assert "holds no trees" in capsys.readouterr().err and not out.exists()
    failed = tmp_path / "failed.jsonl"
    with TreeWriter(failed) as w:
        t = _tree()
        t.nodes[0].success, t.success = False, False
        w.write(t)
    assert main(["build-data", str(failed), "--out", str(out)]) == 2
    assert "no tree reached a success" in capsys.readouterr().err and not out.exists()
    assert main(["build-data", str(failed), "--out", str(out), "--allow-empty"]) == 0 and out.exists()


# --- directories passed as files ------------------------------------------------------------------
def test_directories_passed_as_files(tmp_path, capsys, no_model):
    with TreeWriter(tmp_path / "trees.jsonl") as w:
        w.write(_tree())
    assert main(["build-data", str(tmp_path / "trees.jsonl"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["build-data", str(tmp_path), "--out", str(tmp_path / "s.npz")]) == 2
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a directory"):
        _good_columns().save(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(["explore", "--env", "sokoban", "--model", "tiny", "--out", str(outdir)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_failed_save_leaves_no_tmp_behind(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(UserError, match="s.npz: cannot be written \\(disk full\\)"):  # one line, not a traceback
        _good_columns().save(tmp_path / "s.npz")
    assert not list(tmp_path.iterdir())


# --- a lock on an explore --out in use ---------------------------------------------------------------
def test_two_explore_runs_on_one_out_file(tmp_path, capsys, no_model):
    out = tmp_path / "t.jsonl"
    with TreeWriter(out):  # another run holds it
        with pytest.raises(UserError, match="in use by another run"):
            TreeWriter(out)
        assert _explore(tmp_path) == 2
        assert "in use by another run" in capsys.readouterr().err
    with TreeWriter(out):  # released when that run ends
        pass


# --- eval with no tasks -------------------------------------------------------------------------------
def test_eval_with_no_tasks_is_a_user_error():
    from leafe_fast.eval import evaluate

    with pytest.raises(UserError, match="--tasks"):
        evaluate(object(), object(), object(), [], n=1)
    with pytest.raises(UserError, match="--n"):
        evaluate(object(), object(), object(), [object()], n=0)
