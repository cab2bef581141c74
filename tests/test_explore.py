"""Stage-1 exploration driven by a scripted engine: exact rollbacks, token-exact branch prompts,
budgets, reflection cadence and parsing, grounded reflection, batching across tasks."""

from __future__ import annotations

import json

import pytest
from test_explore_fakes import IM_START, FakeChat, LineEnv, Policy, dec, enc, is_reflection, keep_all, line_task

from leafe_fast.data.schema import TreeFormatError, read_trees
from leafe_fast.engines.scripted import ScriptedEngine
from leafe_fast.explore import ExploreConfig, explore
from leafe_fast.trajectory import experience_message
from leafe_fast.explore.reflectors.llm import MalformedReflection, parse_reflection


def run(tmp_path, tasks, policy, *, name="trees.jsonl", env=LineEnv, **cfg):
    cfg.setdefault("progress", False)
    engine = ScriptedEngine(policy, encode=enc, decode=dec)
    out = tmp_path / name
    summary = explore(tasks, env, engine, FakeChat(), out, ExploreConfig(**cfg))
    return summary, read_trees(out), engine


def action_requests(engine):
    return [r for r in engine.requests if not is_reflection(dec(r.input_ids))]


def assert_prompts_exact(tree, engine):
    """Every action request is its node's parent path + [experience] + header, token for token."""
    chat = FakeChat()
    reqs = [r for r in action_requests(engine) if r.request_id.startswith(tree.task_id + "#")]
    assert len(reqs) == len(tree.nodes)
    for req, node in zip(reqs, tree.nodes):
        prefix = tree.path_token_ids(node.parent) if node.parent >= 0 else list(tree.prompt_ids)
        want = prefix + (node.experience_ids or []) + chat.header_ids
        assert req.input_ids == want, f"node {node.id}"


# --- rollback and branch prompts -----------------------------------------------------------------
def test_rollback_to_step_k_restores_env_and_branches_from_the_path_node(tmp_path):
    # right, right, right -> pit at 3 (failed); reflect: keep 1 step; branch walks left to the goal.
    policy = Policy(
        plan=["right"],
        after={"avoid the pit": ["left"]},
        reflections=[{"rollback_step": 1, "experience": "avoid the pit"}],
    )
    summary, trees, engine = run(tmp_path, [line_task(goal=-1, pit=3)], policy, max_branches=1)
    (tree,) = trees
    assert [n.action for n in tree.nodes] == ["right", "right", "right", "left", "left"]
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 0, 3]
    branch = tree.nodes[3]
    assert branch.experience == "avoid the pit" and branch.rollback_from == 2 and branch.branch == 1
    assert branch.step == 1
    # env restored to the state after step 1 (pos 1, t 1, log ('right',)): one left -> pos 0 at t 2,
    # with the log hash of a fresh replay of ('right', 'left')
    replay = LineEnv()
    replay.reset(line_task(goal=-1, pit=3))
    replay.step("right")
    assert branch.observation == replay.step("left").observation
    assert tree.nodes[4].success and tree.success
    assert tree.meta["reflections"][0]["trigger"] == "failed"
    assert tree.stats["branches"] == 1 and summary.branches == 1
    assert_prompts_exact(tree, engine)


def test_branch_prompt_is_parent_prefix_plus_new_tokens_and_experience_absent_from_prefix(tmp_path):
    policy = Policy(
        plan=["right"],
        after={"go left": ["left"]},
        reflections=[{"rollback_step": 2, "experience": "go left"}],
    )
    _, (tree,), engine = run(tmp_path, [line_task(goal=-7, pit=3)], policy, max_branches=1, max_depth=3)
    # right, right (pos 2), right (pit). keep 2; branch: left (pos 1), then the depth limit ends it
    branch = next(n for n in tree.nodes if n.experience)
    reqs = action_requests(engine)
    parent_prefix = tree.path_token_ids(branch.parent)
    original = reqs[branch.parent + 1].input_ids  # the first rollout's request after the parent
    branch_req = reqs[branch.id].input_ids
    assert original[: len(parent_prefix)] == parent_prefix
    assert branch_req[: len(parent_prefix)] == parent_prefix
    exp_ids = FakeChat().message_ids(experience_message("go left"))
    assert branch.experience_ids == exp_ids
    assert branch_req[len(parent_prefix) : len(parent_prefix) + len(exp_ids)] == exp_ids
    assert "go left" not in dec(parent_prefix)
    assert "go left" in dec(branch_req[len(parent_prefix):])
    # the rehearsal view of the tree drops the experience again
    assert "go left" not in dec(tree.path_token_ids(branch.id, with_experience=False))
    assert_prompts_exact(tree, engine)


def test_rollback_to_zero_restarts_from_reset(tmp_path):
    policy = Policy(
        plan=["right"], after={"start over": ["left"]},
        reflections=[{"rollback_step": 0, "experience": "start over"}],
    )
    _, (tree,), engine = run(tmp_path, [line_task(goal=-1, pit=2)], policy, max_branches=1)
    branch = next(n for n in tree.nodes if n.experience)
    assert branch.parent == -1 and branch.step == 0
    assert branch.observation.startswith("pos=-1 t=1 ")
    assert engine.requests[branch.id + 1].input_ids[: len(tree.prompt_ids)] == tree.prompt_ids
    assert_prompts_exact(tree, engine)


def test_prefix_reuse_is_measured_from_engine_reports(tmp_path):
    policy = Policy(plan=["right"], after={"x": ["left"]}, default_reflection={"rollback_step": 1, "experience": "x"})
    summary, (tree,), _ = run(tmp_path, [line_task(goal=-5, pit=3)], policy, max_branches=2)
    # the scripted engine's cache model serves every branch prompt's shared prefix
    assert tree.stats["branch_prompt_tokens"] > 0
    assert tree.stats["branch_cached_tokens"] >= len(tree.path_token_ids(0))
    assert 0.5 < summary.branch_reuse <= 1.0
    assert summary.prefix_reuse > 0.5


# --- budgets ---------------------------------------------------------------------------------------
def test_max_branches_is_respected(tmp_path):
    policy = Policy(plan=["right"], default_reflection={"rollback_step": 0, "experience": "again"})
    _, (tree,), _ = run(tmp_path, [line_task(pit=1)], policy, max_branches=3)
    assert tree.stats["branches"] == 3
    assert sum(1 for n in tree.nodes if n.experience) == 3
    assert tree.meta["stop_reason"] == "max_branches" and not tree.success


def test_max_steps_is_respected(tmp_path):
    policy = Policy(plan=["stay"], default_reflection={"rollback_step": 1, "experience": "move"})
    _, (tree,), _ = run(tmp_path, [line_task()], policy, max_steps=7, max_depth=3, max_branches=100)
    assert len(tree.nodes) == tree.stats["steps"] == 7
    assert tree.meta["stop_reason"] == "max_steps"
    assert max(n.step for n in tree.nodes) < 3


def test_max_tokens_is_respected_and_counted(tmp_path):
    long_action = "stay" + " " * 40  # 44 chars + end of turn; 'stay ' strips to stay
    policy = Policy(plan=[long_action], default_reflection={"rollback_step": 0, "experience": "e"})
    _, (tree,), engine = run(tmp_path, [line_task()], policy, max_tokens=200, max_depth=2, max_branches=50)
    out = sum(r.output_tokens for r in engine.results)
    assert tree.stats["generated_tokens"] == out <= 200
    assert tree.meta["stop_reason"] == "max_tokens"
    # the last action was cut to the remaining budget
    assert any(len(n.action_ids) < 45 for n in tree.nodes)


def test_max_depth_ends_a_trajectory_and_triggers_reflection(tmp_path):
    policy = Policy(plan=["stay"], default_reflection={"rollback_step": 1, "experience": "hurry"})
    _, (tree,), _ = run(tmp_path, [line_task()], policy, max_depth=4, max_branches=2, reflect_every=0)
    assert max(n.step for n in tree.nodes) == 3
    assert [r["trigger"] for r in tree.meta["reflections"]] == ["depth", "depth"]
    assert tree.meta["stop_reason"] == "max_branches"


# --- reflection cadence and parsing ------------------------------------------------------------------
def test_reflect_every_cadence_counts_steps_since_the_branch_began(tmp_path):
    back_to_1 = {"rollback_step": 1, "experience": "retry"}
    policy = Policy(plan=["stay"], reflections=[keep_all, back_to_1], default_reflection=keep_all)
    _, (tree,), _ = run(tmp_path, [line_task()], policy, reflect_every=3, max_steps=16, max_depth=100)
    refl = tree.meta["reflections"]
    # steps 3 (on track), 6 (back to 1), then every 3 steps of the branch: path length 4, 7, 10
    # (total steps 9, 12, 15; at 16 the step budget ends the task)
    assert [r["n_steps"] for r in refl] == [3, 6, 4, 7, 10]
    assert refl[0]["rollback_step"] is None and refl[1]["rollback_step"] == 1
    assert all(r["trigger"] == "periodic" for r in refl)
    assert tree.stats["branches"] == 1


def test_no_reflection_before_failed_termination_when_reflect_every_is_zero(tmp_path):
    policy = Policy(plan=["right"], default_reflection={"rollback_step": 0, "experience": "x"})
    _, (tree,), _ = run(tmp_path, [line_task(pit=4)], policy, max_branches=1, reflect_every=0)
    assert [(r["trigger"], r["n_steps"]) for r in tree.meta["reflections"]] == [("failed", 4)]


def test_malformed_replies_are_retried_and_counted(tmp_path):
    replies = ["I think step 1", '{"rollback_step": "1", "experience": "x"}',
               '```json\n{"rollback_step": 1, "experience": "go left"}\n```']
    policy = Policy(plan=["right"], after={"go left": ["left"]}, reflections=replies)
    summary, (tree,), engine = run(tmp_path, [line_task(goal=0, pit=2)], policy, max_branches=1)
    rec = tree.meta["reflections"][0]
    assert (rec["attempts"], rec["malformed"], rec["rollback_step"]) == (3, 2, 1)
    assert tree.stats["malformed_reflections"] == summary.malformed_reflections == 2
    # each retry extends the previous reflection prompt with the bad reply and a correction
    refl_reqs = [r for r in engine.requests if is_reflection(dec(r.input_ids))]
    assert len(refl_reqs) == 3
    for a, b in zip(refl_reqs, refl_reqs[1:]):
        assert b.input_ids[: len(a.input_ids)] == a.input_ids
    assert "not a JSON object" in dec(refl_reqs[1].input_ids[len(refl_reqs[0].input_ids):])
    assert "rollback_step must be an integer" in dec(refl_reqs[2].input_ids)
    assert tree.nodes[-1].success


def test_reflection_gives_up_after_retries(tmp_path):
    policy = Policy(plan=["right"], default_reflection="no json here")
    _, (tree,), _ = run(tmp_path, [line_task(pit=1)], policy, reflect_retries=1)
    rec = tree.meta["reflections"][0]
    assert (rec["attempts"], rec["malformed"], rec["rollback_step"]) == (2, 2, None)
    assert tree.stats["failed_reflections"] == 1 and tree.stats["branches"] == 0
    assert tree.meta["stop_reason"] == "no_rollback"


@pytest.mark.parametrize("policy_name, want_step, want_malformed", [("clamp", 2, 0), ("retry", 0, 1)])
def test_out_of_range_step_clamped_or_retried(tmp_path, policy_name, want_step, want_malformed):
    policy = Policy(plan=["right"], after={"y": ["left"]},
                    reflections=[{"rollback_step": 9, "experience": "y"}, {"rollback_step": 0, "experience": "y"}])
    _, (tree,), _ = run(tmp_path, [line_task(goal=-1, pit=3)], policy, max_branches=1, invalid_step=policy_name)
    rec = tree.meta["reflections"][0]
    assert rec["rollback_step"] == want_step and rec["malformed"] == want_malformed
    assert rec["clamped"] == (policy_name == "clamp")


def test_parse_reflection_is_strict():
    assert parse_reflection(' {"rollback_step": 2, "experience": " push left "} ') == (2, "push left")
    assert parse_reflection('```\n{"rollback_step": 0, "experience": "a", "extra": 1}\n```') == (0, "a")
    bad = ['', 'step 2', '{"rollback_step": 2}', '{"experience": "a"}', '[1, "a"]',
           '{"rollback_step": true, "experience": "a"}', '{"rollback_step": 2.0, "experience": "a"}',
           '{"rollback_step": 1, "experience": "  "}', 'Sure! {"rollback_step": 1, "experience": "a"}']
    for text in bad:
        with pytest.raises(MalformedReflection):
            parse_reflection(text)


# --- grounded reflector --------------------------------------------------------------------------------
def test_grounded_reflector_branches_without_model_calls(tmp_path):
    policy = Policy(plan=["right"], after={"go left instead": ["left"]})
    task = line_task(goal=-1, pit=2, ground=[1, "go left instead"])
    _, (tree,), engine = run(tmp_path, [task], policy, reflector="grounded", max_branches=1)
    assert not any(is_reflection(dec(r.input_ids)) for r in engine.requests)
    branch = next(n for n in tree.nodes if n.experience)
    assert (branch.parent, branch.experience) == (0, "go left instead")
    assert tree.meta["reflections"][0]["source"] == "grounded" and tree.success
    assert tree.stats["reflection_tokens"] == 0
    assert_prompts_exact(tree, engine)


def test_grounded_reflector_without_diagnosis_ends_the_task(tmp_path):
    _, (tree,), _ = run(tmp_path, [line_task(pit=1)], Policy(plan=["right"]), reflector="grounded")
    assert tree.meta["stop_reason"] == "no_rollback" and tree.stats["branches"] == 0


# --- scheduling --------------------------------------------------------------------------------------------
def test_requests_of_many_tasks_are_batched_and_results_do_not_depend_on_concurrency(tmp_path):
    tasks = [line_task(i, goal=-1 - i % 2, pit=2 + i % 3) for i in range(6)]
    policy = lambda: Policy(plan=["right"], after={"left!": ["left"]},  # noqa: E731
                            default_reflection={"rollback_step": 1, "experience": "left!"})
    s4, trees4, eng4 = run(tmp_path, tasks, policy(), name="c4.jsonl", concurrency=4, max_branches=2)
    s1, trees1, eng1 = run(tmp_path, tasks, policy(), name="c1.jsonl", concurrency=1, max_branches=2)
    assert max(len(b) for b in eng4.batches) == 4 and s4.max_batch == 4
    assert max(len(b) for b in eng1.batches) == 1
    assert s4.engine_calls < s1.engine_calls
    by_id = {t.task_id: t for t in trees1}
    assert sorted(by_id) == sorted(t.task_id for t in trees4)
    for t in trees4:
        assert t.nodes == by_id[t.task_id].nodes
    assert s4.finished == 6 and s4.successes == s1.successes > 0


def test_env_workers_step_envs_in_threads_with_the_same_result(tmp_path):
    tasks = [line_task(i, goal=2, pit=-1) for i in range(4)]
    _, a, _ = run(tmp_path, tasks, Policy(plan=["right"]), name="a.jsonl", concurrency=4, env_workers=3)
    _, b, _ = run(tmp_path, tasks, Policy(plan=["right"]), name="b.jsonl", concurrency=4)
    assert [t.nodes for t in a] == [t.nodes for t in b] and all(t.success for t in a)


def test_rerun_skips_finished_tasks(tmp_path):
    tasks = [line_task(i, goal=1) for i in range(3)]
    run(tmp_path, tasks[:2], Policy(plan=["right"]))
    summary, trees, engine = run(tmp_path, tasks, Policy(plan=["right"]))
    assert summary.skipped == 2 and summary.finished == 1
    assert [t.task_id for t in trees] == ["line-0", "line-1", "line-2"]
    assert {r.request_id.split("#")[0] for r in engine.requests} == {"line-2"}


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        run(tmp_path, [line_task(0), line_task(0)], Policy(plan=["right"]))
    with pytest.raises(TypeError, match="factory"):
        explore([line_task()], LineEnv(), ScriptedEngine(), FakeChat(), tmp_path / "x.jsonl",
                ExploreConfig(concurrency=2, progress=False))
    with pytest.raises(ValueError, match="reflector"):
        ExploreConfig(reflector="magic").validate()


def test_a_malformed_line_in_the_output_file_is_named(tmp_path):
    out = tmp_path / "trees.jsonl"
    run(tmp_path, [line_task(0, goal=1)], Policy(plan=["right"]))
    with out.open("ab") as f:
        f.write(b'{"schema": "leafe.tree/1", "task_id": "broken"\n')
    with pytest.raises(TreeFormatError, match=r"trees.jsonl:2: not valid JSON"):
        run(tmp_path, [line_task(1, goal=1)], Policy(plan=["right"]))


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    # a file written by another tool may lack the final newline: that tree is read, not dropped
    out = tmp_path / "trees.jsonl"
    run(tmp_path, [line_task(0, goal=1)], Policy(plan=["right"]))
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    assert [t.task_id for t in read_trees(out)] == ["line-0"]
    summary, trees, _ = run(tmp_path, [line_task(0, goal=1), line_task(1, goal=1)], Policy(plan=["right"]))
    assert summary.skipped == 1 and [t.task_id for t in trees] == ["line-0", "line-1"]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    out = tmp_path / "trees.jsonl"
    run(tmp_path, [line_task(0, goal=1)], Policy(plan=["right"]))
    with out.open("ab") as f:
        f.write(b'{"schema": "leafe.tree/1", "task_id": "torn", "nod')
    with pytest.warns(RuntimeWarning, match=r"trees.jsonl:2: skipping an unterminated"):
        assert [t.task_id for t in read_trees(out)] == ["line-0"]


def test_config_json_and_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"reflector": "grounded", "max_branches": 2, "env_kwargs": {"max_steps": 9}}))
    cfg = ExploreConfig.from_json(path).with_overrides({"max_branches": 5, "reflect_every": None})
    assert (cfg.reflector, cfg.max_branches, cfg.reflect_every, cfg.env_kwargs) == ("grounded", 5, 3, {"max_steps": 9})
    path.write_text(json.dumps({"max_branch": 2}))
    with pytest.raises(ValueError, match="unknown key"):
        ExploreConfig.from_json(path)
    path.write_text("{bad json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExploreConfig.from_json(path)


def test_chat_header_marks_every_action(tmp_path):
    _, (tree,), _ = run(tmp_path, [line_task(goal=2)], Policy(plan=["right"]))
    ids = tree.path_token_ids(tree.nodes[-1].id)
    assert ids.count(IM_START) == 2 + 2 * len(tree.nodes)  # system, user, then (assistant, user) per step


def test_max_context_tokens_caps_every_request(tmp_path):
    policy = Policy(plan=["stay"], default_reflection={"rollback_step": 0, "experience": "e"})
    limit = 400
    _, (tree,), engine = run(tmp_path, [line_task()], policy, max_context_tokens=limit, max_depth=50)
    assert all(len(r.input_ids) + r.sampling.max_new_tokens <= limit for r in engine.requests)
    assert tree.meta["stop_reason"] == "max_context_tokens" and len(tree.nodes) > 2


def test_without_stop_on_success_a_success_is_reflected_on_and_branched(tmp_path):
    policy = Policy(plan=["right"], after={"shorter": ["left"]},
                    default_reflection={"rollback_step": 0, "experience": "shorter"})
    _, (tree,), _ = run(tmp_path, [line_task(goal=2, pit=-3)], policy, stop_on_success=False, max_branches=1)
    assert tree.meta["reflections"][0]["trigger"] == "success"
    assert tree.stats["branches"] == 1 and tree.stats["successful_leaves"] == 1
    assert tree.nodes[2].experience == "shorter" and tree.nodes[2].parent == -1


def test_progress_bar_and_summary_are_shown(tmp_path, capsys, monkeypatch):
    import sys

    tasks = [line_task(i, goal=1) for i in range(2)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    summary, _, _ = run(tmp_path, tasks, Policy(plan=["right"]), progress=True)
    err = capsys.readouterr().err
    assert "explore" in err and "reuse=" in err and "ok=100%" in err
    assert summary.format().splitlines()[0] in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    run(tmp_path, [line_task(5, goal=1)], Policy(plan=["right"]), progress=True, name="quiet.jsonl")
    assert "reuse=" not in capsys.readouterr().err  # no bar when stderr is not a terminal
    assert summary.success_rate == 1.0 and summary.to_dict()["finished"] == 2
