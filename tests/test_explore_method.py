"""Issue 11 on the exploration side (diagnosis vs oracle, defaults, depth cutoff, out-of-range steps,
token limits, independent rollouts, rollback without summary) and issue 15 (one task's env error never
aborts a run). Scripted engine + fakes; each test fails on the pre-fix code."""

from __future__ import annotations

import json
import warnings

import pytest
from test_explore_fakes import FakeChat, LineEnv, Policy, dec, enc, is_reflection, line_task

from leafe_fast.data.schema import read_trees
from leafe_fast.engines.scripted import ScriptedEngine
from leafe_fast.envs.base import GroundedReflection
from leafe_fast.explore import ExploreConfig, explore
from leafe_fast.explore.prompts import correction_message, reflection_request


def run(tmp_path, tasks, policy, *, env=LineEnv, name="trees.jsonl", **cfg):
    cfg.setdefault("progress", False)
    engine = ScriptedEngine(policy, encode=enc, decode=dec)
    out = tmp_path / name
    summary = explore(tasks, env, engine, FakeChat(), out, ExploreConfig(**cfg))
    return summary, read_trees(out), engine


class ModeEnv(LineEnv):
    """Records the grounding mode and the history it was asked about."""

    calls: list = []

    def ground_reflection(self, history, mode="diagnosis"):
        ModeEnv.calls.append((mode, [r.done for r in history]))
        return GroundedReflection(0, f"{mode} says go left", mode=mode)


# --- finding 3: diagnosis by default, the oracle is a labelled ablation -------------------------------
@pytest.mark.parametrize("reflector, mode", [("grounded", "diagnosis"), ("oracle", "oracle")])
def test_grounded_asks_for_a_diagnosis_and_oracle_is_an_ablation(tmp_path, reflector, mode):
    ModeEnv.calls = []
    policy = Policy(plan=["right"], after={f"{mode} says go left": ["left"]})
    summary, (tree,), _ = run(tmp_path, [line_task(goal=-1, pit=2)], policy, env=ModeEnv,
                              reflector=reflector, max_branches=1, reflect_every=0)
    assert ModeEnv.calls and {m for m, _ in ModeEnv.calls} == {mode}
    assert tree.meta["reflector"] == reflector and tree.meta["ablation"] == (mode == "oracle")
    assert summary.ablation == (mode == "oracle")
    assert ("ORACLE ABLATION" in summary.format()) == (mode == "oracle")


# --- finding 4: periodic reflection by default; the depth cutoff is answered -------------------------
def test_defaults_follow_the_method_and_the_shipped_config_agrees():
    from importlib.resources import files

    cfg = ExploreConfig()
    assert cfg.reflect_every >= 1 and cfg.invalid_step == "retry" and cfg.reflector != "oracle"
    shipped = json.loads(files("leafe_fast").joinpath("configs/explore_sokoban.json").read_text())
    from leafe_fast.envs.registry import list_tasks

    episode = list_tasks("sokoban", "train", 1, seed=0)[0].spec["max_steps"]
    assert shipped["reflect_every"] == cfg.reflect_every
    assert shipped["max_depth"] >= episode  # the env ends an episode before the depth cutoff could
    assert shipped["max_steps"] >= shipped["max_depth"] * 2  # room for branches


def test_depth_cutoff_reflects_on_a_finished_attempt(tmp_path):
    ModeEnv.calls = []
    policy = Policy(plan=["stay"], after={"diagnosis says go left": ["left"]})
    _, (tree,), _ = run(tmp_path, [line_task(goal=-1)], policy, env=ModeEnv, reflector="grounded",
                        max_depth=3, max_branches=1, reflect_every=0)
    (record,) = tree.meta["reflections"]
    assert record["trigger"] == "depth" and record["rollback_step"] == 0
    assert ModeEnv.calls[0][1] == [False, False, True]  # the cutoff ended the attempt: done=True last
    assert tree.success


# --- finding 6: out-of-range rollback -> retry by default; consistent wording ------------------------
def test_out_of_range_rollback_is_retried_not_clamped(tmp_path):
    replies = [{"rollback_step": 7, "experience": "x"}, {"rollback_step": 1, "experience": "go left"}]
    policy = Policy(plan=["right"], after={"go left": ["left"]}, reflections=replies)
    _, (tree,), engine = run(tmp_path, [line_task(goal=0, pit=3)], policy, max_branches=1, reflect_every=0)
    rec = tree.meta["reflections"][0]
    assert (rec["attempts"], rec["malformed"], rec["rollback_step"], rec["clamped"]) == (2, 1, 1, False)
    retry = [r for r in engine.requests if is_reflection(dec(r.input_ids))][1]
    assert "rollback_step 7 is outside 0..2" in dec(retry.input_ids)
    _, (clamped,), _ = run(tmp_path, [line_task(goal=0, pit=3)],
                           Policy(plan=["right"], reflections=[{"rollback_step": 7, "experience": "x"}]),
                           name="c.jsonl", max_branches=1, reflect_every=0, invalid_step="clamp")
    assert clamped.meta["reflections"][0]["clamped"] and clamped.stats["clamped_reflections"] == 1


def test_reflection_prompts_state_one_range():
    periodic = reflection_request(5, "periodic")
    assert "from 0 to 5" in periodic and "at most 4" not in periodic and "keeps every step" in periodic
    failed = reflection_request(5, "failed")
    assert "from 0 to 4" in failed and "5 keeps" not in failed
    assert "from 0 to 5" in correction_message("bad", 5, may_keep_all=True)
    assert "from 0 to 4" in correction_message("bad", 5)


# --- finding 9: per-environment token limits, a warning at the limit -----------------------------------
def test_action_token_limit_comes_from_the_env_and_cuts_warn(tmp_path):
    from leafe_fast.envs.registry import action_token_limit

    assert action_token_limit("sokoban") < action_token_limit("code")
    engine = ScriptedEngine(lambda req: "x" * 200, encode=enc, decode=dec)
    from leafe_fast.envs.registry import list_tasks

    task = list_tasks("sokoban", "train", 1, seed=0, max_steps=2)[0]
    ascii_env = {"box_on_target_char": "*"}  # the fake codec is ASCII-only
    with pytest.warns(RuntimeWarning, match="token limit"):
        summary = explore([task], "sokoban", engine, FakeChat(), tmp_path / "t.jsonl",
                          ExploreConfig(progress=False, max_branches=0, env_kwargs=ascii_env))
    assert {r.sampling.max_new_tokens for r in engine.requests} == {action_token_limit("sokoban")}
    (tree,) = read_trees(tmp_path / "t.jsonl")
    assert summary.cut_actions == tree.stats["cut_actions"] == len(tree.nodes) and tree.nodes[0].truncated


# --- baseline: independent rollouts with equal budgets ----------------------------------------------
def test_independent_mode_makes_k_rollouts_without_reflection(tmp_path):
    policy = Policy(plan=["right"], default_reflection={"rollback_step": 0, "experience": "never asked"})
    _, (tree,), engine = run(tmp_path, [line_task(goal=-1, pit=2)], policy, mode="independent", rollouts=3)
    assert not [r for r in engine.requests if is_reflection(dec(r.input_ids))]
    assert [n.parent for n in tree.nodes] == [-1, 0, -1, 2, -1, 4] and [n.branch for n in tree.nodes][::2] == [0, 1, 2]
    assert all(n.experience_ids is None and n.rollback_from is None for n in tree.nodes)
    assert tree.meta["mode"] == "independent" and tree.meta["reflector"] == "none"
    assert tree.stats["rollouts"] == 3 and tree.meta["stop_reason"] == "rollouts"


def test_independent_budgets_equal_a_leafe_run(tmp_path):
    policy = Policy(plan=["right"], after={"go left": ["left"]},
                    default_reflection={"rollback_step": 0, "experience": "go left"})
    tasks = [line_task(0, goal=-2, pit=3), line_task(1, goal=5)]
    _, leafe, _ = run(tmp_path, tasks, policy, name="leafe.jsonl", max_branches=2, max_steps=12, reflect_every=0)
    _, indep, _ = run(tmp_path, tasks, Policy(plan=["right"]), name="rs.jsonl", mode="independent", rollouts=50,
                      budget_from=str(tmp_path / "leafe.jsonl"))
    spent = {t.task_id: (t.stats["steps"], t.stats["generated_tokens"]) for t in leafe}
    for t in indep:
        assert t.meta["budget"]["max_steps"] == spent[t.task_id][0]
        assert t.meta["budget"]["max_tokens"] == spent[t.task_id][1]
        assert t.stats["steps"] <= spent[t.task_id][0] and t.stats["generated_tokens"] <= spent[t.task_id][1]
    from leafe_fast.errors import UserError

    with pytest.raises(UserError, match="no tree"):
        run(tmp_path, [line_task(9)], Policy(plan=["right"]), name="x.jsonl", mode="independent",
            budget_from=str(tmp_path / "leafe.jsonl"))


def test_rollback_without_summary_branches_with_no_experience(tmp_path):
    policy = Policy(plan=["right", "right", "left"], default_reflection={"rollback_step": 1, "experience": "ignored"})
    _, (tree,), engine = run(tmp_path, [line_task(goal=0, pit=2)], policy, summary=False, max_branches=1,
                             reflect_every=0)
    starts = [n for n in tree.nodes if n.rollback_from is not None]
    assert len(starts) == 1 and starts[0].experience_ids == [] and starts[0].experience == ""
    assert tree.meta["summary"] is False
    assert not any("earlier attempt" in dec(r.input_ids) for r in engine.requests if not is_reflection(dec(r.input_ids)))


# --- issue 15: one task's env error never aborts the run ------------------------------------------------
class BrokenEnv(LineEnv):
    """Raises in ``step`` for tasks with ``explode`` (the task spec travels in the snapshot)."""

    def snapshot(self):
        return (self.state, dict(self.spec))

    def restore(self, snapshot) -> None:
        self.state, self.spec = snapshot[0], dict(snapshot[1])

    def step(self, action):
        if self.spec.get("explode"):
            raise RuntimeError("judge crashed")
        return super().step(action)


def test_an_env_exception_fails_one_task_and_the_run_goes_on(tmp_path):
    tasks = [line_task(0, goal=1), line_task(1, goal=1, explode=True), line_task(2, goal=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, trees, _ = run(tmp_path, tasks, Policy(plan=["right"]), env=BrokenEnv, concurrency=2)
    by_id = {t.task_id: t for t in trees}
    assert set(by_id) == {"line-0", "line-1", "line-2"}
    assert by_id["line-0"].success and by_id["line-2"].success
    broken = by_id["line-1"]
    assert not broken.success and broken.meta["stop_reason"] == "env_error"
    assert "judge crashed" in broken.meta["error"] and broken.stats["env_errors"] == 1
    assert summary.env_errors == 1 and "environment error" in summary.format()
    assert any("environment error" in str(w.message) for w in caught)


def test_an_eval_env_exception_fails_one_episode(tmp_path):
    from leafe_fast.eval import evaluate

    env = BrokenEnv()
    engine = ScriptedEngine(lambda req: "right", encode=enc, decode=dec)
    with pytest.warns(RuntimeWarning, match="environment error"):
        res = evaluate(engine, FakeChat(), env, [line_task(0, goal=1), line_task(1, goal=1, explode=True)],
                       n=2, ks=(1,), progress=False)
    per = {t["task_id"]: t for t in res["tasks"]}
    assert per["line-0"]["successes"] == 2 and per["line-1"]["successes"] == 0
    assert res["env_errors"] == 2 and "judge crashed" in per["line-1"]["errors"][0]
