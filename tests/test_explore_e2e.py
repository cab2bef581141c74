"""End to end: a tiny random transformers model on the HF engine explores real Sokoban levels.

The model's actions are noise, so the env-grounded reflector drives the branching; what is checked
is the plumbing: valid trees, rollbacks that branch, token-exact branch prompts with the real chat
template, the HF engine's own prefix-reuse counts, and the CLI with a config file and a rerun.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from leafe_fast.data.schema import read_trees

import leafe_fast.engines.hf as hf  # the project's own modules: a missing one is a failure, not a skip
import leafe_fast.envs.sokoban  # noqa: F401


class RecordingEngine:
    """Wraps an engine and keeps every request, to check prompts token by token."""

    def __init__(self, inner):
        self.inner, self.requests, self.batch_sizes = inner, [], []

    def generate(self, requests):
        self.requests += list(requests)
        self.batch_sizes.append(len(requests))
        return self.inner.generate(requests)

    def update_weights(self, source):
        self.inner.update_weights(source)

    def close(self):
        self.inner.close()


def test_tiny_hf_model_explores_sokoban_and_writes_valid_trees(tmp_path):
    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.envs.registry import list_tasks
    from leafe_fast.explore import ExploreConfig, explore
    from leafe_fast.trajectory import experience_message
    from leafe_fast.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer("qwen2")
    engine = RecordingEngine(hf.HFEngine(tiny_model(tok), tok))
    # the env's episode fails after 3 steps; the grounded reflector then rolls back with a plan
    tasks = list_tasks("sokoban", "train", 3, seed=0, max_steps=3)
    cfg = ExploreConfig(reflector="grounded", max_branches=2, max_steps=12, max_depth=6,
                        max_new_tokens=6, concurrency=3, progress=False)
    out = tmp_path / "trees.jsonl"
    summary = explore(tasks, "sokoban", engine, tok, out, cfg)

    trees = read_trees(out)
    assert sorted(t.task_id for t in trees) == sorted(t.task_id for t in tasks)
    assert summary.finished == 3 and summary.branches > 0 and max(engine.batch_sizes) == 3
    chat = ChatFormat.from_tokenizer(tok)
    for tree in trees:
        assert tree.tokenizer == tok.name_or_path and tree.header_ids == chat.header_ids
        reqs = [r for r in engine.requests if r.request_id.startswith(tree.task_id + "#")]
        assert len(reqs) == len(tree.nodes)  # grounded: every request is an action
        for req, node in zip(reqs, tree.nodes):
            prefix = tree.path_token_ids(node.parent) if node.parent >= 0 else tree.prompt_ids
            assert req.input_ids == prefix + (node.experience_ids or []) + chat.header_ids
            assert len(node.action_ids) <= 6
            if node.experience:
                assert node.experience_ids == chat.message_ids(experience_message(node.experience))
                assert node.experience not in tok.decode(prefix)
    # the HF engine reuses the KV of shared prefixes and says so
    assert summary.cached_tokens > 0 and 0.0 < summary.branch_reuse <= 1.0

    # the LLM reflector on the same random model: its replies are noise, each one counted malformed
    engine.requests.clear()
    llm_cfg = ExploreConfig(reflector="llm", reflect_retries=1, reflect_max_new_tokens=8, max_branches=2,
                            max_steps=6, max_depth=6, max_new_tokens=4, concurrency=2, progress=False)
    s2 = explore(tasks[:2], "sokoban", engine, chat, tmp_path / "llm.jsonl", llm_cfg)
    assert s2.finished == 2 and s2.reflections == 2 and s2.malformed_reflections == 4 and s2.branches == 0
    refl = [r for r in engine.requests if r.sampling.max_new_tokens == 8]
    assert len(refl) == 4  # first try + one retry per task, each extending the trajectory's tokens
    for tree in read_trees(tmp_path / "llm.jsonl"):
        path = tree.path_token_ids(tree.nodes[-1].id)
        mine = [r.input_ids for r in refl if r.request_id.startswith(tree.task_id + "#")]
        assert len(mine) == 2 and mine[0][: len(path)] == path and mine[1][: len(mine[0])] == mine[0]
        assert tree.meta["stop_reason"] == "no_rollback"


def test_cli_explore_with_config_file_and_rerun(tmp_path, capsys):
    from leafe_fast.cli import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"env": "sokoban", "tasks": 2, "reflector": "grounded", "max_branches": 1,
                               "max_depth": 4, "max_new_tokens": 4, "concurrency": 2}))
    out = tmp_path / "run" / "trees.jsonl"
    argv = ["explore", "--config", str(cfg), "--model", "tiny", "--out", str(out), "--task-arg", "max_steps=2",
            "--max-steps", "5", "--no-progress", "--summary-json", str(tmp_path / "summary.json")]
    assert main(argv) == 0
    trees = read_trees(out)
    assert len(trees) == 2 and all(len(t.nodes) <= 5 for t in trees)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] == 2 and summary["branches"] == sum(t.stats["branches"] for t in trees)
    assert "2 trees written" in capsys.readouterr().out

    assert main(argv) == 0  # rerun: everything is already there
    assert len(read_trees(out)) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == 2

    # clear errors, nothing written
    assert main(["explore", "--env", "sokoban", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "is not a local model directory" in capsys.readouterr().err
    cfg.write_text(json.dumps({"max_branch": 1}))
    assert main(["explore", "--config", str(cfg), "--env", "sokoban", "--model", "tiny", "--out", str(out)]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert len(read_trees(out)) == 2


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_cli_sglang_without_the_package_names_the_install(tmp_path, capsys):
    from leafe_fast.cli import main

    argv = ["explore", "--env", "sokoban", "--engine", "sglang", "--model", str(tmp_path), "--out",
            str(tmp_path / "t.jsonl")]
    assert main(argv) == 2
    assert "pip install 'leafe-fast[sglang]'" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists() or not (tmp_path / "t.jsonl").read_bytes()


def test_code_env_grounded_reflection_branches_to_a_fixed_program(tmp_path):
    """The sandboxed code env with the env-grounded reflector: a wrong program fails a test, the
    branch (with the failing test as experience) submits a right one; envs step on two threads."""
    import leafe_fast.envs.code as code
    from importlib.resources import files

    from leafe_fast.data.chat import ChatFormat
    from leafe_fast.engines.scripted import ScriptedEngine
    from leafe_fast.envs.base import Task
    from leafe_fast.explore import ExploreConfig, explore
    from leafe_fast.trajectory import experience_message
    from leafe_fast.tiny import tiny_tokenizer

    record = json.loads(files("leafe_fast.envs").joinpath("problems/basic.jsonl").read_text().splitlines()[0])
    assert record["name"] == "reverse-words"
    tasks = [Task(task_id=f"rw-{i}", env="code", spec=record) for i in range(2)]
    tok = tiny_tokenizer("qwen2")
    wrong = "```python\nprint(input())\n```"
    right = "```python\nprint(' '.join(input().split()[::-1]))\n```"

    def respond(request):
        text = tok.decode(request.input_ids)
        return right if "earlier attempt that went wrong" in text else wrong

    engine = ScriptedEngine(respond, encode=lambda s: tok.encode(s, add_special_tokens=False), decode=tok.decode)
    cfg = ExploreConfig(reflector="grounded", max_branches=2, concurrency=2, env_workers=2, progress=False)
    summary = explore(tasks, lambda: code.CodeEnv(max_attempts=1), engine, tok, tmp_path / "t.jsonl", cfg)
    assert summary.finished == 2 and summary.successes == 2 and summary.branches == 2
    chat = ChatFormat.from_tokenizer(tok)
    for tree in read_trees(tmp_path / "t.jsonl"):
        first, fixed = tree.nodes
        assert not first.success and "hello world" in first.feedback  # names the failing test
        assert fixed.parent == -1 and fixed.success and fixed.experience
        assert "hello world" in fixed.experience
        assert fixed.experience_ids == chat.message_ids(experience_message(fixed.experience))


def test_cli_runs_the_four_arms_data(tmp_path, capsys):
    """base, RS-SFT, LEAFE rehearsal-only and full LEAFE differ only in their data: every arm's data
    comes out of the CLI (explore in both modes with equal budgets, build-data per recipe)."""
    from leafe_fast.cli import main
    from leafe_fast.data import SampleColumns

    common = ["--env", "sokoban", "--model", "tiny", "--tasks", "2", "--max-new-tokens", "4",
              "--task-arg", "max_steps=3", "--no-progress"]
    leafe, rs = tmp_path / "leafe.jsonl", tmp_path / "rs.jsonl"
    assert main(["explore", *common, "--out", str(leafe), "--reflector", "grounded", "--max-branches", "1"]) == 0
    assert main(["explore", *common, "--out", str(rs), "--mode", "independent", "--budget-from", str(leafe)]) == 0
    spent = {t.task_id: t.stats["steps"] for t in read_trees(leafe)}
    for tree in read_trees(rs):
        assert tree.meta["mode"] == "independent" and tree.stats["steps"] <= spent[tree.task_id]
    capsys.readouterr()
    for trees, recipe in [(rs, "rejection-sampling"), (leafe, "rehearsal-only"), (leafe, "leafe")]:
        out = tmp_path / f"{recipe}.npz"
        rc = main(["build-data", str(trees), "--out", str(out), "--recipe", recipe, "--allow-empty"])
        assert rc == 0, capsys.readouterr().err
        assert f"recipe {recipe}" in capsys.readouterr().out
        SampleColumns.load(out)
    assert main(["build-data", str(leafe), "--out", str(tmp_path / "x.npz"), "--recipe", "rejection-sampling"]) == 2
    assert "--mode independent" in capsys.readouterr().err
    assert main(["explore", *common, "--out", str(rs), "--budget-from", str(leafe)]) == 2  # leafe mode
    assert "--budget-from" in capsys.readouterr().err
