"""Every Python block of the README runs as written, and the shipped example config loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write under runs/
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)


def test_example_explore_config_runs_through_the_cli(tmp_path):
    from leafe_fast.cli import main
    from leafe_fast.data import read_trees

    cfg = ROOT / "leafe_fast" / "configs" / "explore_sokoban.json"
    out = tmp_path / "trees.jsonl"
    rc = main(["explore", "--config", str(cfg), "--tasks", "2", "--max-new-tokens", "8",
               "--max-branches", "1", "--task-arg", "max_steps=3", "--out", str(out), "--no-progress"])
    assert rc == 0
    trees = read_trees(out)
    from leafe_fast.envs import list_tasks

    expected = sorted(t.task_id for t in list_tasks("sokoban", "train", 2, seed=0))
    assert sorted(t.task_id for t in trees) == expected
    assert all(t.nodes for t in trees)
