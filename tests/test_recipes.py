"""Issue 11 on the data side: separable groups, validated corrections, masking, failed-branch counts,
recipes. Each test names the finding it guards; each fails on the pre-fix builder."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leafe_fast.data.columns import COUNTERFACTUAL, GUIDED, REHEARSAL
from leafe_fast.data.recipes import BuildConfig, build_recipe, build_samples, build_samples_with_stats
from leafe_fast.data.schema import Node, Tree
from leafe_fast.errors import UserError


def _failed_then_fixed(env: str = "toy", **branch) -> Tree:
    """n0 up, n1 left (fails); reflection keeps 1 step; n2 (corrected) then n3 succeed.

    The abandoned action at the rollback point is n1 (same parent n0 as the branch start n2)."""
    b = dict(action="right", parsed_action="right", experience_ids=[90], experience="go right")
    b.update(branch)
    nodes = [
        Node(0, -1, 0, [10], [20], action="up", parsed_action="up"),
        Node(1, 0, 1, [11], [21], done=True, action="left", parsed_action="left"),
        Node(2, 0, 1, [12], [22], rollback_from=1, branch=1, **b),
        Node(3, 2, 2, [13], [23], done=True, success=True, branch=1, action="down", parsed_action="down"),
    ]
    return Tree("t", env, [1, 2], [7], nodes, success=True)


def _solved_first_try() -> Tree:
    nodes = [Node(0, -1, 0, [30], [40]), Node(1, 0, 1, [31], [41], done=True, success=True)]
    return Tree("u", "toy", [1, 3], [7], nodes, success=True)


# --- finding 1: rehearsal must not contain the counterfactual targets -------------------------------
def test_guided_success_is_not_rehearsal_by_default():
    samples, stats = build_samples_with_stats([_failed_then_fixed(), _solved_first_try()])
    rehearsal = [s for s in samples if s.group == REHEARSAL]
    counterfactual = [s for s in samples if s.group == COUNTERFACTUAL]
    assert [s.meta["task_id"] for s in rehearsal] == ["u"]  # only the unguided success
    assert len(counterfactual) == 1 and counterfactual[0].input_ids[counterfactual[0].target_mask].tolist() == [12]
    assert stats.guided_paths == 1 and stats.guided_excluded == 1 and stats.overlap_target_tokens == 0
    # a zero counterfactual weight now really removes the correction from training
    zero = build_samples([_failed_then_fixed()], weights={COUNTERFACTUAL: 0.0})
    weighted_targets = [t for s in zero if s.weight > 0 for t in s.input_ids[s.target_mask].tolist()]
    assert 12 not in weighted_targets


def test_guided_as_own_group_or_as_rehearsal_when_asked():
    grouped, st_g = build_samples_with_stats([_failed_then_fixed()], guided="group", weights={GUIDED: 0.25})
    guided = [s for s in grouped if s.group == GUIDED]
    assert len(guided) == 1 and guided[0].weight == 0.25 and st_g.samples["guided"] == 1
    _, st_r = build_samples_with_stats([_failed_then_fixed()], guided="rehearsal")
    assert st_r.overlap_target_tokens == 1  # n2's action is a target in both groups: asked for, reported


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([1, 2, None]))
def test_no_target_node_in_two_groups_on_random_trees(seed, steps):
    rng = random.Random(seed)
    nodes: list[Node] = []
    for i in range(rng.randint(1, 12)):
        parent = rng.choice([-1] + [n.id for n in nodes if not n.done]) if nodes else -1
        done = rng.random() < 0.35
        start = bool(nodes) and rng.random() < 0.4
        nodes.append(Node(i, parent, 0 if parent < 0 else nodes[parent].step + 1, [100 + i], [200 + i],
                          done=done, success=done and rng.random() < 0.6, experience_ids=[300] if start else None,
                          rollback_from=rng.randrange(len(nodes)) if start else None))
    tree = Tree("r", "toy", [1], [2], nodes)
    samples, stats = build_samples_with_stats([tree], counterfactual_steps=steps, dedup=False,
                                              validate_corrections=False)
    by_group: dict[int, set[int]] = {}
    for s in samples:
        by_group.setdefault(s.group, set()).update(s.meta["target_nodes"])
        if s.group == REHEARSAL:
            assert not any(n.is_branch_start for n in tree.path(s.meta["leaf"]))
    assert not (by_group.get(REHEARSAL, set()) & by_group.get(COUNTERFACTUAL, set()))
    assert stats.overlap_target_tokens == 0


# --- finding 2: corrections are validated -------------------------------------------------------
@pytest.mark.parametrize("branch, reason", [
    (dict(invalid=True, parsed_action=None, action="jump"), "invalid"),
    (dict(noop=True), "noop"),
    (dict(action="Move left.", parsed_action="left"), "same_as_abandoned"),  # other text, same move
])
def test_bad_corrections_are_dropped_and_counted(branch, reason):
    samples, stats = build_samples_with_stats([_failed_then_fixed(**branch)])
    assert not [s for s in samples if s.group == COUNTERFACTUAL]
    assert stats.counterfactual_dropped[reason] == 1 and stats.dropped_samples >= 1
    assert reason.replace("_", " ") in stats.summary()
    kept = build_samples([_failed_then_fixed(**branch)], validate_corrections=False, mask_invalid=False)
    assert [s for s in kept if s.group == COUNTERFACTUAL]  # the check is what dropped it


def test_same_text_without_parsed_actions_is_unchanged():
    tree = _failed_then_fixed(action="left", parsed_action=None)
    tree.nodes[1].parsed_action = None
    _, stats = build_samples_with_stats([tree])
    assert stats.counterfactual_dropped["same_as_abandoned"] == 1


# --- finding 7: invalid / no-op moves masked, on by default for Sokoban -----------------------------
def test_invalid_and_noop_actions_are_masked_by_env_default():
    def tree(env):
        nodes = [Node(0, -1, 0, [10], [20], invalid=True), Node(1, 0, 1, [11], [21], noop=True),
                 Node(2, 1, 2, [12], [22], done=True, success=True)]
        return Tree("m", env, [1], [7], nodes, success=True)

    (sok,), st_sok = build_samples_with_stats([tree("sokoban")])
    assert sok.input_ids[sok.target_mask].tolist() == [12] and st_sok.masked_actions == 2
    assert sok.input_ids.tolist()[:4] == [1, 7, 10, 20]  # masked actions stay as context
    (toy,) = build_samples([tree("toy")])
    assert toy.input_ids[toy.target_mask].tolist() == [10, 11, 12]
    (forced,) = build_samples([tree("toy")], mask_invalid=True)
    assert forced.input_ids[forced.target_mask].tolist() == [12]


# --- finding 8: failed branches are counted ------------------------------------------------------
def test_failed_branches_are_counted():
    tree = _failed_then_fixed()
    tree.nodes.append(Node(4, -1, 0, [14], [24], done=True, experience_ids=[91], rollback_from=3, branch=2))
    _, stats = build_samples_with_stats([tree])
    assert stats.branches == 2 and stats.failed_branches == 1
    assert stats.as_dict()["failed_branches"] == 1 and "never reached a success" in stats.summary()


# --- recipes ------------------------------------------------------------------------------------
def _independent(success: bool = True) -> Tree:
    nodes = [Node(0, -1, 0, [10], [20], done=True), Node(1, -1, 0, [11], [21], done=True, success=success, branch=1)]
    return Tree("i", "toy", [1], [7], nodes, success=success, meta={"mode": "independent"})


def test_recipes_select_the_arm_data():
    leafe = [_failed_then_fixed(), _solved_first_try()]
    both, st_both = build_recipe(leafe, BuildConfig(recipe="leafe"))
    assert {s.group for s in both} == {REHEARSAL, COUNTERFACTUAL} and st_both.recipe == "leafe"
    only_r, _ = build_recipe(leafe, BuildConfig(recipe="rehearsal-only"))
    assert {s.group for s in only_r} == {REHEARSAL}
    only_c, _ = build_recipe(leafe, BuildConfig(recipe="counterfactual-only"))
    assert {s.group for s in only_c} == {COUNTERFACTUAL}
    rs, _ = build_recipe([_independent()], BuildConfig(recipe="rejection-sampling"))
    assert len(rs) == 1 and rs[0].group == REHEARSAL and rs[0].input_ids[rs[0].target_mask].tolist() == [11]
    with pytest.raises(UserError, match="--mode independent"):
        build_recipe(leafe, BuildConfig(recipe="rejection-sampling"))
    with pytest.raises(UserError, match="rejection-sampling"):
        build_recipe([_independent()], BuildConfig(recipe="leafe"))


def test_rollback_without_summary_recipe():
    tree = _failed_then_fixed(experience_ids=[], experience="")
    tree.meta = {"mode": "leafe", "summary": False}
    samples, _ = build_recipe([tree], BuildConfig(recipe="rollback-no-summary"))
    (c,) = [s for s in samples if s.group == COUNTERFACTUAL]  # the branch start is found without experience
    assert c.input_ids[c.target_mask].tolist() == [12]
    with pytest.raises(UserError, match="no-summary"):
        build_recipe([tree], BuildConfig(recipe="leafe"))
    with pytest.raises(UserError, match="--no-summary"):
        build_recipe([_failed_then_fixed()], BuildConfig(recipe="rollback-no-summary"))


def test_oracle_trees_are_labelled_an_ablation():
    tree = _failed_then_fixed()
    tree.meta = {"mode": "leafe", "reflector": "oracle", "ablation": True}
    _, stats = build_recipe([tree], BuildConfig())
    assert stats.ablation and "ORACLE ABLATION" in stats.summary() and stats.as_dict()["ablation"]


def test_counterfactual_steps_config_parses_k_and_all():
    assert BuildConfig(counterfactual_steps="all").steps() is None
    assert BuildConfig(counterfactual_steps="3").steps() == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(UserError):
            BuildConfig(counterfactual_steps=bad).steps()


def test_a_bad_correction_is_counted_once_however_many_successes_follow():
    tree = _failed_then_fixed(noop=True)
    tree.nodes.append(Node(4, 2, 2, [14], [24], done=True, success=True, branch=1))  # a second success under n2
    _, stats = build_samples_with_stats([tree])
    assert stats.counterfactual_dropped["noop"] == 1
