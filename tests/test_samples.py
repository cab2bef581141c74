"""build_samples: token-exact on hand-built trees, properties on random trees, dedup and edge cases."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leafe_fast.data import Node, SampleColumns, Tree, TreeWriter, build_samples
from leafe_fast.data.recipes import build_samples_with_stats

# Token ranges make every token's role readable from its value in the random-tree tests.
PROMPT, HEADER, ACTION, OBS, EXP = 1000, 2000, 3000, 4000, 5000


def _hand_tree() -> Tree:
    """root ─ n0 ─ n1 (fails)
              └─ n2 [exp 90,91] ─ n3 (success)       (rollback to step 1)
       └ n4 [exp 92] (success)                         (rollback to the start)"""
    nodes = [
        Node(0, -1, 0, [10, 11], [20]),
        Node(1, 0, 1, [12], [21], done=True),
        Node(2, 0, 1, [13, 14], [22], experience_ids=[90, 91], rollback_from=1, branch=1),
        Node(3, 2, 2, [15], [23], done=True, success=True, branch=1),
        Node(4, -1, 0, [16], [24], done=True, success=True, experience_ids=[92], rollback_from=3, branch=2),
    ]
    return Tree("t0", "toy", prompt_ids=[100, 101], header_ids=[7], nodes=nodes, success=True)


def _as_pairs(s):
    return s.input_ids.tolist(), np.flatnonzero(s.target_mask).tolist()


def test_hand_tree_token_exact():
    samples = build_samples([_hand_tree()], guided="rehearsal")
    got = {(s.group, s.meta["leaf"], s.meta.get("rollback_node")): s for s in samples}
    assert len(samples) == 4

    r3 = got[(0, 3, None)]
    assert r3.input_ids.tolist() == [100, 101, 7, 10, 11, 20, 7, 13, 14, 22, 7, 15]  # last obs cut
    assert r3.input_ids[r3.target_mask].tolist() == [10, 11, 13, 14, 15]
    r4 = got[(0, 4, None)]
    assert _as_pairs(r4) == ([100, 101, 7, 16], [3])

    c2 = got[(1, 3, 2)]  # prefix up to the rollback point, no experience, one corrected action
    assert c2.input_ids.tolist() == [100, 101, 7, 10, 11, 20, 7, 13, 14]
    assert c2.input_ids[c2.target_mask].tolist() == [13, 14]
    c4 = got[(1, 4, 4)]  # rollback to the start: the prompt alone is the prefix
    assert _as_pairs(c4) == ([100, 101, 7, 16], [3])

    assert c2.meta["rollback_step"] == 1 and c4.meta["rollback_step"] == 0  # steps kept before the branch
    assert all(s.tree_id == 0 for s in samples)
    assert r3.prefix_len == 9 and c2.prefix_len == 9  # c2 is a prefix of r3
    assert r4.prefix_len == 4 and c4.prefix_len == 4  # same tokens, different group
    assert all(s.weight == 1.0 for s in samples)


def test_counterfactual_steps_none_supervises_to_the_end():
    samples = build_samples([_hand_tree()], counterfactual_steps=None, include_rehearsal=False)
    c2 = next(s for s in samples if s.meta["rollback_node"] == 2)
    assert c2.input_ids.tolist() == [100, 101, 7, 10, 11, 20, 7, 13, 14, 22, 7, 15]
    assert c2.input_ids[c2.target_mask].tolist() == [13, 14, 15]  # n0's action stays context
    assert {s.group for s in samples} == {1}


def test_weights_flags_and_stats():
    samples, stats = build_samples_with_stats([_hand_tree()], weights={1: 0.5}, guided="rehearsal")
    assert {(s.group, s.weight) for s in samples} == {(0, 1.0), (1, 0.5)}
    assert stats.samples == {"rehearsal": 2, "counterfactual": 2}
    assert stats.target_tokens == {"rehearsal": 6, "counterfactual": 3}
    assert stats.tokens == 12 + 4 + 9 + 4
    assert stats.target_share == pytest.approx(9 / 29)
    assert stats.lengths["max"] == 12 and stats.lengths["min"] == 4
    assert "2 rehearsal" in stats.summary()
    assert build_samples([_hand_tree()], include_rehearsal=False, include_counterfactual=False) == []


def test_no_success_no_samples_and_empty_input():
    tree = _hand_tree()
    for n in tree.nodes:
        n.success = False
    samples, stats = build_samples_with_stats([tree])
    assert samples == [] and stats.trees == 1 and stats.trees_with_success == 0 and stats.tokens == 0
    assert build_samples([]) == []


def test_dedup_identical_branches():
    nodes = [
        Node(0, -1, 0, [10], [20], done=True),
        Node(1, -1, 0, [11], [21], done=True, success=True, experience_ids=[90], rollback_from=0, branch=1),
        Node(2, -1, 0, [11], [21], done=True, success=True, experience_ids=[91], rollback_from=1, branch=2),
    ]
    tree = Tree("dup", "toy", [1, 2], [7], nodes)
    opts = dict(guided="rehearsal", validate_corrections=False)  # n2 repeats n1's action: kept here
    kept, stats = build_samples_with_stats([tree], **opts)
    assert len(kept) == 2 and stats.duplicates_removed == 2  # n1 and n2 give the same tokens
    assert len(build_samples([tree], dedup=False, **opts)) == 4
    # across trees with the same prompt too
    kept2, stats2 = build_samples_with_stats([tree, tree], **opts)
    assert len(kept2) == 2 and stats2.duplicates_removed == 6
    assert [s.tree_id for s in kept2] == [0, 0]


def test_max_len_policies():
    tree = _hand_tree()
    with pytest.raises(ValueError, match="max_len=8"):
        build_samples([tree], max_len=8, guided="rehearsal")
    dropped, st_drop = build_samples_with_stats([tree], max_len=8, overflow="drop", guided="rehearsal")
    assert all(len(s) <= 8 for s in dropped) and st_drop.too_long_dropped == 2
    cut, st_cut = build_samples_with_stats([tree], max_len=8, overflow="truncate", guided="rehearsal")
    r3 = next(s for s in cut if s.group == 0 and s.meta["leaf"] == 3)
    assert r3.input_ids.tolist() == [100, 101, 7, 10, 11, 20, 7, 13]  # first 8 tokens; 14, 15 cut
    assert r3.input_ids[r3.target_mask].tolist() == [10, 11, 13]
    assert st_cut.truncated == 2 and st_cut.targets_lost_to_truncation == 2 + 1  # r3: 14, 15; c2: 14
    only_context, st_ctx = build_samples_with_stats([tree], max_len=4, overflow="truncate", guided="rehearsal")
    assert st_ctx.too_long_dropped == 1  # c2 cut to [100, 101, 7, 10] keeps no target: dropped, counted
    assert st_ctx.truncated == 1 and all(len(s) <= 4 for s in only_context)
    with pytest.raises(ValueError, match="overflow"):
        build_samples([tree], overflow="wrap")
    with pytest.raises(ValueError, match="counterfactual_steps"):
        build_samples([tree], counterfactual_steps=0)


def test_reads_trees_jsonl_and_round_trips_columns(tmp_path):
    path = tmp_path / "trees.jsonl"
    with TreeWriter(path) as w:
        w.write(_hand_tree())
    samples = build_samples(path, guided="rehearsal")
    assert len(samples) == 4
    cols = SampleColumns.from_samples(samples)
    cols.save(tmp_path / "s.npz")
    back = SampleColumns.load(tmp_path / "s.npz").to_samples()
    assert [_as_pairs(s) for s in back] == [_as_pairs(s) for s in samples]
    assert [s.prefix_len for s in back] == [s.prefix_len for s in samples]


def test_empty_prompt_and_header_is_a_clear_error():
    tree = Tree("bad", "toy", [], [], [Node(0, -1, 0, [5], [6], done=True, success=True)])
    with pytest.raises(ValueError, match="nothing to be predicted"):
        build_samples([tree])


# --- random trees ------------------------------------------------------------------------------


def _random_tree(seed: int) -> Tree:
    """Random branching tree; tokens come from disjoint ranges per role so roles are checkable."""
    rng = random.Random(seed)
    tok = lambda base, lo, hi: [base + rng.randrange(1000) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    nodes: list[Node] = []
    for i in range(rng.randint(1, 14)):
        parent = rng.choice([-1] + [n.id for n in nodes if not n.done]) if nodes else -1
        step = 0 if parent == -1 else nodes[parent].step + 1
        branch_start = bool(nodes) and rng.random() < 0.4
        done = rng.random() < 0.35
        nodes.append(
            Node(
                i, parent, step, tok(ACTION, 1, 4), tok(OBS, 0, 3),
                done=done, success=done and rng.random() < 0.6,
                experience_ids=tok(EXP, 1, 3) if branch_start else None,
                rollback_from=rng.randrange(len(nodes)) if branch_start else None,
            )
        )
    return Tree(f"r{seed}", "toy", tok(PROMPT, 1, 3), tok(HEADER, 0, 2), nodes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=4), st.sampled_from([1, 2, None]))
def test_random_trees_properties(seeds, cf_steps):
    trees = [_random_tree(s) for s in seeds]
    opts = dict(guided="rehearsal", validate_corrections=False)
    samples = build_samples(trees, counterfactual_steps=cf_steps, dedup=False, **opts)
    n_success = sum(n.success for t in trees for n in t.nodes)
    assert sum(s.group == 0 for s in samples) == n_success  # one rehearsal per successful leaf
    for s in samples:
        tree = trees[s.tree_id]
        ids = s.input_ids
        assert not np.any((ids >= EXP) & (ids < EXP + 1000)), "experience tokens in a sample"
        is_action = (ids >= ACTION) & (ids < ACTION + 1000)
        assert not s.target_mask[0] and s.target_mask[-1]  # ends on a target: nothing wasted
        assert np.all(is_action[s.target_mask]), "a non-action token is a target"
        full = tree.path_token_ids(s.meta["leaf"], with_experience=False)
        assert full[: len(ids)] == ids.tolist()  # a prefix of the experience-free trajectory
        if s.group == 0:
            assert np.array_equal(s.target_mask, is_action)  # every action token, nothing else
        else:
            # targets: exactly the actions of the supervised nodes, the branch first, nothing before it
            path = tree.path(s.meta["leaf"])
            cut = [n.id for n in path].index(s.meta["rollback_node"])
            nxt = next((i for i in range(cut + 1, len(path)) if path[i].experience_ids), len(path))
            k = nxt - cut if cf_steps is None else min(cf_steps, nxt - cut)
            want = [t for n in path[cut : cut + k] for t in n.action_ids]
            assert ids[s.target_mask].tolist() == want
            assert path[cut].experience_ids
    # prefix_len: brute force over the other samples of the same tree
    for i, s in enumerate(samples):
        best = 0
        for j, o in enumerate(samples):
            if i != j and o.tree_id == s.tree_id:
                n = min(len(s), len(o))
                eq = s.input_ids[:n] == o.input_ids[:n]
                best = max(best, n if eq.all() else int(np.argmin(eq)))
        assert s.prefix_len == best
    # dedup keeps exactly one of each distinct content
    deduped = build_samples(trees, counterfactual_steps=cf_steps, **opts)
    distinct = {(s.group, s.input_ids.tobytes(), s.target_mask.tobytes()) for s in samples}
    assert len(deduped) == len(distinct)
