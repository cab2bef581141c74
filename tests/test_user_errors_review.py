"""Issue 10, user errors found by a review run as a new user (helper R): each input below once gave a
traceback, a misleading line, or left a file behind. Every case: exit 2, one line naming the
flag/file/field, no output written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leafe_fast.checks import check_device, check_model_dir, check_out_path
from leafe_fast.cli import main
from leafe_fast.data import Node, SampleColumns, Tree, TreeWriter, read_trees
from leafe_fast.data.schema import TreeFormatError
from leafe_fast.errors import UserError


def _tree(task_id: str = "a") -> Tree:
    return Tree(task_id, "toy", [1, 2, 3], [7], [Node(0, -1, 0, [12, 13], [21], done=True, success=True)],
                success=True)


def _trees_file(tmp_path, edit=None):
    record = json.loads(_tree().to_json())
    if edit is not None:
        edit(record)
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def _one_error_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"leafe-fast {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if explore gets as far as loading a model."""
    import leafe_fast.explore.command as command

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input mistake was reported")

    monkeypatch.setattr(command, "build_engine", refuse)


def _fake_model_dir(path, *, weights=True, tokenizer=True):
    path.mkdir()
    (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


# --- trees records: types of flags and keys -----------------------------------------------------
@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["nodes"][0].update(success="yes"), "node 0 success must be true or false, got 'yes'"),
    (lambda r: r["nodes"][0].update(done=1), "node 0 done must be true or false"),
    (lambda r: r.update(success=None), "success must be true or false"),
    (lambda r: r["nodes"][0].update(rollback_from="0"), "rollback_from must be an integer or null"),
    (lambda r: r.update(task_id=5), "task_id and env must be strings"),
    (lambda r: r.update(extra=1), "tree: unknown key(s) extra"),
    (lambda r: r.pop("task_id"), "tree: missing key(s) task_id"),
    (lambda r: r["nodes"][0].update(depth=0), "node 0: unknown key(s) depth"),
    (lambda r: r["nodes"][0].pop("action_ids"), "node 0: missing key(s) action_ids"),
])
def test_a_trees_record_with_a_wrong_type_or_key_names_it(tmp_path, capsys, edit, problem):
    path = _trees_file(tmp_path, edit)
    with pytest.raises(TreeFormatError, match="trees.jsonl:1: "):
        read_trees(path)
    assert main(["build-data", str(path), "--out", str(tmp_path / "s.npz")]) == 2
    line = _one_error_line(capsys, "build-data")
    assert "trees.jsonl:1: " in line and problem in line and "__init__" not in line
    assert not (tmp_path / "s.npz").exists()


def test_trees_written_by_the_writer_still_read(tmp_path):
    with TreeWriter(tmp_path / "t.jsonl") as w:
        w.write(_tree("a"))
    assert [t.task_id for t in read_trees(tmp_path / "t.jsonl")] == ["a"]


# --- build-data outputs --------------------------------------------------------------------------
def test_build_data_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = _trees_file(tmp_path)
    before = path.read_bytes()
    assert main(["build-data", str(path), "--out", str(path), "--recipe", "rehearsal-only"]) == 2
    assert "--out: " in _one_error_line(capsys, "build-data")
    assert main(["build-data", str(path), "--out", str(tmp_path / "s.npz"), "--stats-json", str(path)]) == 2
    assert "--stats-json: " in _one_error_line(capsys, "build-data")
    assert path.read_bytes() == before and not (tmp_path / "s.npz").exists()


def test_build_data_checks_stats_json_before_writing_samples(tmp_path, capsys):
    path = _trees_file(tmp_path)
    (tmp_path / "stats").mkdir()
    argv = ["build-data", str(path), "--out", str(tmp_path / "s.npz"), "--recipe", "rehearsal-only"]
    assert main([*argv, "--stats-json", str(tmp_path / "stats")]) == 2
    assert "--stats-json: " in _one_error_line(capsys, "build-data")
    assert not (tmp_path / "s.npz").exists()
    assert main(argv) == 0 and (tmp_path / "s.npz").exists()  # the same run without the mistake works


# --- outputs under a file, for every command --------------------------------------------------------
def test_an_output_path_under_a_file_is_one_line(tmp_path, capsys, no_model):
    path = _trees_file(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = _fake_model_dir(tmp_path / "model")
    cases = [
        ("build-data", [str(path), "--out", str(blocker / "s.npz")]),
        ("build-data", [str(path), "--out", str(tmp_path / "s.npz"), "--stats-json", str(blocker / "st.json")]),
        ("explore", ["--env", "sokoban", "--model", "tiny", "--tasks", "1", "--out", str(blocker / "t.jsonl")]),
        ("explore", ["--env", "sokoban", "--model", "tiny", "--tasks", "1", "--out", str(tmp_path / "t.jsonl"),
                     "--summary-json", str(tmp_path)]),
        ("eval", ["--model", str(model), "--tasks", "1", "--out", str(blocker / "e.json")]),
        ("demo", ["--out", str(blocker)]),
        ("demo", ["--out", str(blocker / "sub")]),
    ]
    for cmd, argv in cases:
        assert main([cmd, *argv]) == 2, (cmd, argv)
        line = _one_error_line(capsys, cmd)
        assert "--out" in line or "--summary-json" in line or "--stats-json" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model", "trees.jsonl"]


def test_check_out_path():
    with pytest.raises(UserError, match="is a directory"):
        check_out_path("/")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_out_path(__file__, folder=True)
    assert check_out_path("/nonexistent/dir/x.json").name == "x.json"


# --- samples files ---------------------------------------------------------------------------------
def test_a_text_file_as_samples_is_not_blamed_on_pickling(tmp_path):
    path = tmp_path / "s.npz"
    path.write_text("hello\n")
    with pytest.raises(UserError, match="not a zip archive") as info:
        SampleColumns.load(path)
    assert "pickle" not in str(info.value)


# --- model folders and devices (explore and eval), before any model loads ----------------------------
@pytest.mark.parametrize("make, problem", [
    (lambda p: _fake_model_dir(p, weights=False), "has no weights"),
    (lambda p: _fake_model_dir(p, tokenizer=False), "has no tokenizer"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: None, "is not a local model directory"),
    (lambda p: (_fake_model_dir(p), (p / "config.json").write_text("not json")), "config.json is not readable JSON"),
    (lambda p: (_fake_model_dir(p), (p / "config.json").write_text("[1]")), "config.json is not a JSON object"),
    (lambda p: (_fake_model_dir(p), (p / "config.json").write_text('{"model_type": "nonsense"}')),
     "model_type 'nonsense' is unknown"),
])
def test_incomplete_model_folders(tmp_path, capsys, no_model, make, problem):
    model = tmp_path / "model"
    make(model)
    with pytest.raises(UserError, match=problem):
        check_model_dir(model)
    assert main(["explore", "--env", "sokoban", "--model", str(model), "--tasks", "1",
                 "--out", str(tmp_path / "t.jsonl")]) == 2
    assert problem in _one_error_line(capsys, "explore")
    assert main(["eval", "--model", str(model), "--tasks", "1"]) == 2
    assert problem in _one_error_line(capsys, "eval")
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("device, problem", [("tpu", "is not a torch device"), ("cuda:7", "CUDA")])
def test_a_bad_device_is_one_line(tmp_path, capsys, no_model, device, problem):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(UserError, match=problem):
        check_device(device)
    check_device(None)
    check_device("cpu")
    model = _fake_model_dir(tmp_path / "model")
    assert main(["explore", "--env", "sokoban", "--model", "tiny", "--tasks", "1", "--device", device,
                 "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "--device: " in _one_error_line(capsys, "explore")
    assert main(["eval", "--model", str(model), "--tasks", "1", "--device", device]) == 2
    assert "--device: " in _one_error_line(capsys, "eval")
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("flag, value", [("--env-arg", "max_steps=abc"), ("--task-arg", "num_boxes=abc")])
def test_eval_bad_env_and_task_values_are_one_line(tmp_path, capsys, flag, value):
    model = _fake_model_dir(tmp_path / "model")
    assert main(["eval", "--model", str(model), "--tasks", "1", flag, value]) == 2
    assert f"{flag}: sokoban" in _one_error_line(capsys, "eval")


# --- no empty trees file after a failed run ------------------------------------------------------
def test_a_writer_that_wrote_nothing_leaves_no_file(tmp_path):
    path = tmp_path / "t.jsonl"
    TreeWriter(path).close()
    assert not path.exists()
    with pytest.raises(RuntimeError):
        with TreeWriter(path):
            raise RuntimeError("the model failed to load")
    assert not path.exists()
    with TreeWriter(path) as w:
        w.write(_tree("a"))
    with TreeWriter(path):  # an existing file is never removed, even when this run adds nothing
        pass
    assert [t.task_id for t in read_trees(path)] == ["a"]
    path.write_text("")
    TreeWriter(path).close()
    assert path.exists()  # not created by this writer: left alone


# --- the context bound of exploration ------------------------------------------------------------
def test_explore_bounds_the_context_by_the_model(tmp_path, monkeypatch):
    """Without --max-context-tokens a long episode ended the run with a ValueError from the engine
    (prompt longer than the model's positions); the bound now defaults to the model's."""
    import leafe_fast.explore.loop as loop

    seen = {}

    def fake_explore(tasks, env, engine, tokenizer, out, config):
        seen["max_context_tokens"] = config.max_context_tokens
        seen["positions"] = engine.max_positions
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "explore", fake_explore)
    assert main(["explore", "--env", "sokoban", "--model", "tiny", "--tasks", "1", "--no-progress",
                 "--out", str(tmp_path / "t.jsonl")]) == 130
    assert seen["positions"] and seen["max_context_tokens"] == seen["positions"]
    assert not (tmp_path / "t.jsonl").exists()


# --- outputs that are devices or pipes; a full disk ---------------------------------------------------
def test_a_pipe_as_output_or_input_is_refused_not_replaced(tmp_path, capsys):
    """--out /dev/null once replaced the device node with a regular file (tmp + rename, as root)."""
    import os

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    trees = _trees_file(tmp_path)
    assert main(["build-data", str(trees), "--out", str(pipe), "--recipe", "rehearsal-only"]) == 2
    assert "not a regular file" in _one_error_line(capsys, "build-data")
    assert main(["build-data", str(pipe), "--out", str(tmp_path / "s.npz")]) == 2  # reading it would block
    assert "not a regular file" in _one_error_line(capsys, "build-data")
    model = _fake_model_dir(tmp_path / "model")
    assert main(["eval", "--model", str(model), "--tasks", "1", "--out", str(pipe)]) == 2
    assert "not a regular file" in _one_error_line(capsys, "eval")
    with pytest.raises(UserError, match="not a regular file"):
        SampleColumns.from_samples([]).save(pipe)
    assert pipe.is_fifo()


def test_a_full_disk_while_writing_trees_keeps_the_finished_ones(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "t.jsonl"
    with TreeWriter(path) as w:
        w.write(_tree("a"))
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with TreeWriter(path) as w:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(UserError, match="t.jsonl: cannot be written \\(No space left on device\\)"):
            w.write(_tree("b"))
        monkeypatch.undo()
    assert path.read_bytes() == before  # cut back to the last complete tree
    assert [t.task_id for t in read_trees(path)] == ["a"]


def test_a_full_disk_while_saving_samples_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from leafe_fast.data import Sample

    cols = SampleColumns.from_samples([Sample(np.array([1, 2, 3]), np.array([0, 0, 1], bool))])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(UserError, match="s.npz: cannot be written"):
        cols.save(tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


# --- an explore rerun with other settings ------------------------------------------------------------
def test_an_explore_rerun_with_other_settings_is_refused(tmp_path, capsys, no_model):
    from leafe_fast.explore.config import ExploreConfig

    out = tmp_path / "t.jsonl"
    tree = _tree("sokoban-train-0")
    tree.env = "sokoban"
    tree.meta = {"config": json.loads(json.dumps(ExploreConfig(max_steps=6).to_dict()))}
    with TreeWriter(out) as w:
        w.write(tree)
    before = out.read_bytes()
    base = ["explore", "--env", "sokoban", "--model", "tiny", "--tasks", "2", "--out", str(out)]
    for extra, words in [(["--max-steps", "2"], "max_steps=6, this run has 2; pass --max-steps as before"),
                         (["--max-steps", "6", "--env-arg", "max_steps=9"], "pass --env-arg as before"),
                         (["--max-steps", "6", "--mode", "independent"], "mode='leafe'")]:
        assert main([*base, *extra]) == 2
        assert words in _one_error_line(capsys, "explore")
    assert main(["explore", "--env", "code", "--model", "tiny", "--tasks", "1", "--out", str(out)]) == 2
    assert "holds trees of env 'sokoban'" in _one_error_line(capsys, "explore")
    assert out.read_bytes() == before
    # the same settings (batching aside) pass the check and reach the model
    with pytest.raises(AssertionError, match="the model was loaded"):
        main([*base, "--max-steps", "6", "--concurrency", "3"])


# --- samples arrays the packer refused with a traceback ------------------------------------------------
@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.update(target_mask=np.zeros_like(d["target_mask"])), "has a target token"),
    (lambda d: d.update(target_mask=np.full_like(d["target_mask"], 2)), "target_mask must hold only 0 and 1"),
    (lambda d: d.update(weight=np.full_like(d["weight"], -1.0)), "negative weight"),
    (lambda d: d.update(prefix_len=np.full_like(d["prefix_len"], 100)), "prefix_len outside"),
    (lambda d: d["target_mask"].__setitem__(0, 1), "mark their first token as a target"),
])
def test_samples_arrays_the_packer_would_refuse_are_named_at_load(tmp_path, capsys, edit, problem):
    from leafe_fast.data import Sample

    cols = SampleColumns.from_samples([Sample(np.array([1, 2, 3]), np.array([0, 0, 1], bool)),
                                       Sample(np.array([1, 2, 4, 5]), np.array([0, 0, 1, 1], bool))])
    data = {k: np.array(getattr(cols, k)) for k in cols.__dataclass_fields__}
    edit(data)
    path = tmp_path / "s.npz"
    np.savez(path, **data)
    with pytest.raises(UserError, match=problem):
        SampleColumns.load(path)
    assert main(["train", "--samples", str(path), "--model", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert problem in _one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_a_binary_file_as_trees_gets_one_error_and_no_partial_line_warning(tmp_path, recwarn):
    path = tmp_path / "s.npz"
    path.write_bytes(b"PK\x03\x04\xff\xfe binary\nmore \xff bytes")
    with pytest.raises(TreeFormatError, match="s.npz:1: not valid JSON"):
        read_trees(path)
    assert not [w for w in recwarn if "incomplete last line" in str(w.message)]
    good = tmp_path / "t.jsonl"
    good.write_text(_tree().to_json() + "\n" + _tree("b").to_json()[:20])  # a killed append: still warned
    with pytest.warns(RuntimeWarning, match="t.jsonl:2: skipping an unterminated"):
        assert [t.task_id for t in read_trees(good)] == ["a"]


# --- an env whose optional package or data is missing -----------------------------------------------
def test_an_env_without_its_package_or_data_is_one_line(tmp_path, capsys, monkeypatch, no_model):
    import leafe_fast.envs.registry as registry

    def no_data(**kwargs):
        raise FileNotFoundError("no games under data/train; run the-download-script")

    def no_package(**kwargs):
        raise ImportError("the fake env needs the package 'fakepkg'", name="fakepkg")

    def our_bug(**kwargs):
        raise ImportError("cannot import name 'x' from 'leafe_fast.envs.base'", name="leafe_fast.envs.base")

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    registry.register_env("nodata", lambda **k: object(), no_data)
    registry.register_env("nopkg", no_package, lambda **k: [])
    registry.register_env("buggy", our_bug, lambda **k: [])
    argv = ["--model", "tiny", "--tasks", "1", "--out", str(tmp_path / "t.jsonl")]
    assert main(["explore", "--env", "nodata", *argv]) == 2
    assert "--env nodata: no games under data/train" in _one_error_line(capsys, "explore")
    model = _fake_model_dir(tmp_path / "model")
    assert main(["eval", "--model", str(model), "--env", "nopkg", "--tasks", "1"]) == 2
    assert "--env nopkg: the fake env needs the package 'fakepkg'" in _one_error_line(capsys, "eval")
    with pytest.raises(ImportError):  # a broken import of our own stays a traceback
        main(["eval", "--model", str(model), "--env", "buggy", "--tasks", "1"])
    assert not (tmp_path / "t.jsonl").exists()


# --- train: compute options and paths checked before the model loads (after 16:35, owners done) --------
def _samples(tmp_path):
    from leafe_fast.data import Sample

    path = tmp_path / "s.npz"
    SampleColumns.from_samples([Sample(np.array([1, 2, 3]), np.array([0, 0, 1], bool))]).save(path)
    return path


@pytest.mark.parametrize("extra, words", [
    (["--device", "tpu"], "--device: 'tpu' is not a torch device"),
    (["--fsdp", "true"], "--fsdp true: needs a process group"),
    (["--lambdas", "-1", "1"], "must be finite and >= 0"),
])
def test_train_mistakes_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    assert main(["train", "--samples", str(_samples(tmp_path)), "--model", "tiny", "--out", str(out), *extra]) == 2
    assert words in _one_error_line(capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--impl", "triton_gemm"], "--impl triton_gemm: the Triton kernels need CUDA"),
    (["--impl", "chunked"], "--impl chunked: the Triton kernels need CUDA"),
    (["--liger", "on"], "--liger on: Liger's Triton kernels need CUDA"),
])
def test_train_cuda_only_options_on_the_cpu(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    argv = ["train", "--samples", str(_samples(tmp_path)), "--model", "tiny", "--device", "cpu", "--out", str(out)]
    assert main([*argv, *extra]) == 2
    assert words in _one_error_line(capsys, "train")
    assert not out.exists()


def test_train_out_and_model_paths(tmp_path, capsys):
    samples = _samples(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        assert main(["train", "--samples", str(samples), "--model", "tiny", "--out", str(out)]) == 2
        assert "--out" in _one_error_line(capsys, "train")
    model = _fake_model_dir(tmp_path / "model", weights=False)
    assert main(["train", "--samples", str(samples), "--model", str(model), "--out", str(tmp_path / "run")]) == 2
    assert "has no weights" in _one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_cli_warnings_are_one_line(tmp_path, capsys):
    import warnings

    path = tmp_path / "t.jsonl"
    path.write_text(_tree().to_json() + "\n" + '{"cut off')
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, l, file=None, line=None: print(
            warnings.formatwarning(m, c, f, l), end="", file=__import__("sys").stderr)
        assert main(["build-data", str(path), "--out", str(tmp_path / "s.npz"), "--recipe", "rehearsal-only"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("leafe-fast build-data: warning: ") and "skipping an unterminated" in err
    assert err.count("\n") == 1 and "schema.py" not in err
    assert warnings.formatwarning is before


def test_resume_with_another_model_is_one_line(tmp_path, capsys):
    samples = _samples(tmp_path)
    out = tmp_path / "run"
    base = ["train", "--samples", str(samples), "--out", str(out), "--token-budget", "64", "--no-progress",
            "--no-export"]
    assert main([*base, "--model", "tiny", "--max-steps", "1", "--save-every", "1"]) == 0
    capsys.readouterr()
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    before = (ckpt / "state.pt").read_bytes()
    assert main([*base, "--model", "tiny", "--tiny-style", "llama3", "--max-steps", "2", "--resume"]) == 2
    line = _one_error_line(capsys, "train")
    assert "was trained with another model" in line and "--tiny-style" in line
    assert (ckpt / "state.pt").read_bytes() == before


# --- a model without a usable chat template; repro paths --------------------------------------------
def test_a_tokenizer_without_a_chat_template_is_a_user_error():
    from types import SimpleNamespace

    from leafe_fast.data.chat import ChatFormat, ChatTemplateError

    with pytest.raises(UserError, match="--model: tokenizer 'plain' has no chat_template") as info:
        ChatFormat.from_tokenizer(SimpleNamespace(chat_template=None, name_or_path="plain"))
    assert isinstance(info.value, ChatTemplateError) and isinstance(info.value, ValueError)


def test_repro_paths_and_an_empty_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["--out", str(blocker)], "--out: "), (["--results-dir", str(blocker)], "--results-dir: "),
             (["--model", str(tmp_path / "none")], "--model: "),
             (["--report-only", "--out", str(tmp_path / "empty")], "--report-only: no finished stage")]
    for argv, words in cases:
        assert main(["repro", "--preset", "tiny", *argv]) == 2
        assert words in _one_error_line(capsys, "repro")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no results written for nothing


# --- two train runs on one --out ------------------------------------------------------------------
def test_a_second_run_on_a_locked_run_folder_is_refused(tmp_path, capsys):
    """A concurrent `train --resume` on a running run's --out cut its metrics.jsonl and mixed checkpoints."""
    from leafe_fast.checks import run_folder_lock

    out = tmp_path / "run"
    with run_folder_lock(out):
        with pytest.raises(UserError, match="is in use by another run"):
            with run_folder_lock(out):
                pass
        assert main(["train", "--samples", str(_samples(tmp_path)), "--model", "tiny", "--out", str(out),
                     "--max-steps", "1"]) == 2
        line = _one_error_line(capsys, "train")
        assert f"--out {out}: is in use by another run" in line
    assert not out.exists()  # created by the lock, left empty: removed
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with run_folder_lock(out):
        pass
    assert (out / "keep.txt").exists()  # a folder that existed is never removed
