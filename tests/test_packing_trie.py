"""Trie (prefix-shared) packing: the C++ path equals the dict-trie reference, and the trie is exact.

Exactness here means: for every target, the tokens its predictor may attend to (``i <= row < subtree_end[i]``)
are exactly the sample's tokens before it, at depths 0..p-1, so attention over the trie sees what it sees in
the flat layout. Checked on random trees with deep chains, wide fan-out, identical samples, a token supervised
by both groups, single-sample trees, separate roots and a tree id shared by different prompts.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafe_fast import _C
from leafe_fast.data.columns import Sample, SampleColumns
from leafe_fast.packing import pack, pack_reference

TRIE_FIELDS = ("input_ids", "position_ids", "cu_seqlens", "subtree_end", "rows", "targets", "weights", "group",
               "sample_ids")
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample(ids, rng, tree, group=None, rate=0.5) -> Sample:
    ids = np.asarray(ids, dtype=np.int32)
    mask = rng.random(len(ids)) < rate
    mask[0] = False
    if len(ids) > 1:
        mask[-1] = True
    g = int(rng.integers(0, 2)) if group is None else group
    return Sample(ids, mask, g, float(rng.uniform(0.25, 2.0)), tree, 0)


def random_forest(seed: int, trees: int = 4, vocab: int = 4) -> list[Sample]:
    """LEAFE-like trees: samples branch off a shared trunk at random depths; small vocab forces collisions."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(trees):
        kind = rng.integers(0, 6)
        trunk = rng.integers(0, vocab, int(rng.integers(2, 30)))
        if kind == 0:  # deep chain: every sample a prefix of the next
            for cut in sorted(rng.integers(2, len(trunk) + 1, int(rng.integers(1, 5)))):
                out.append(_sample(trunk[:cut], rng, t))
        elif kind == 1:  # wide fan-out at one point
            at = int(rng.integers(1, len(trunk)))
            for _ in range(int(rng.integers(2, 9))):
                out.append(_sample(np.concatenate([trunk[:at], rng.integers(0, vocab, int(rng.integers(1, 4)))]), rng, t))
        elif kind == 2:  # identical samples, one per group: every target supervised twice
            out.append(_sample(trunk, rng, t, group=0))
            out.append(_sample(trunk, rng, t, group=1))
        elif kind == 3:  # a single-sample tree (or no tree id at all)
            out.append(_sample(trunk, rng, t if rng.random() < 0.5 else -1))
        elif kind == 4:  # separate roots under one id (first tokens differ)
            out.append(_sample(np.concatenate([[vocab], trunk]), rng, t))
            out.append(_sample(np.concatenate([[vocab + 1], trunk]), rng, t))
        else:  # random branching, rollbacks at several depths
            for _ in range(int(rng.integers(1, 7))):
                cut = int(rng.integers(0, len(trunk) + 1))
                tail = rng.integers(0, vocab, int(rng.integers(0, 10)))
                ids = np.concatenate([trunk[:cut], tail])
                if len(ids) < 2:
                    ids = trunk[:2]
                out.append(_sample(ids, rng, t))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def assert_same_trie(a, b) -> None:
    assert len(a.micro_batches) == len(b.micro_batches)
    for k, (x, y) in enumerate(zip(a.micro_batches, b.micro_batches)):
        for f in TRIE_FIELDS:
            xa, ya = getattr(x, f), getattr(y, f)
            assert xa.dtype == ya.dtype, (k, f)
            np.testing.assert_array_equal(xa, ya, err_msg=f"micro-batch {k}, field {f}")
        assert (x.rank, x.max_seqlen, x.num_tokens, x.num_targets, x.cost, x.flat_tokens, x.layout) == (
            y.rank, y.max_seqlen, y.num_tokens, y.num_targets, y.cost, y.flat_tokens, y.layout), k
    for f in ("truncated", "skipped", "split_trees", "mixed_trees", "flat_tokens", "trie_tokens", "compression"):
        assert getattr(a.stats, f) == getattr(b.stats, f), f


def check_trie_exact(samples: list[Sample], packing, budget: int, truncation: str = "left") -> None:
    """Independent of both implementations: every target's visible context is its sample's prefix."""
    expected = {}
    for j, s in enumerate(samples):
        keep = min(len(s), budget)
        start = len(s) - keep if truncation == "left" else 0
        w = s.input_ids[start : start + keep]
        for i in range(1, keep):
            if s.target_mask[start + i]:
                expected.setdefault((j, tuple(w[:i].tolist()), int(w[i])), []).append(
                    (np.float32(s.weight), s.group))
    seen: dict = {}
    packed = []
    for mb in packing.micro_batches:
        T = mb.num_tokens
        assert mb.layout == "trie" and T <= budget and len(mb.input_ids) == T
        end = mb.subtree_end.astype(np.int64)
        idx = np.arange(T)
        assert ((end > idx) & (end <= T)).all()
        # pre-order nesting: a token's subtree lies inside its parent's; depth = number of strict ancestors
        cu = mb.cu_seqlens
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert (end[a:b] <= b).all(), "a subtree leaves its tree chunk"
        for j in range(T):
            anc = np.flatnonzero((idx <= j) & (j < end))
            assert len(anc) == mb.position_ids[j] + 1, "position_ids must be the depth in the trie"
            assert (mb.position_ids[anc] == np.arange(len(anc))).all()
        assert len(mb.rows) == len(mb.targets) == len(mb.weights) == len(mb.group) == mb.num_targets
        packed.extend(mb.sample_ids.tolist())
        for row, tgt, w, g in zip(mb.rows.tolist(), mb.targets.tolist(), mb.weights.tolist(), mb.group.tolist()):
            ctx = np.flatnonzero((idx <= row) & (row < end))
            key = tuple(mb.input_ids[ctx].tolist()), int(tgt)
            seen.setdefault(key, []).append((np.float32(w), g))
        assert mb.flat_tokens == sum(min(len(samples[s]), budget) for s in mb.sample_ids.tolist())
    kept = sorted({j for (j, _, _) in expected})
    assert sorted(packed) == kept, "every sample with a target is packed exactly once"
    want: dict = {}
    for (j, ctx, tgt), rows in expected.items():
        want.setdefault((ctx, tgt), []).extend(rows)
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in want.items()}
    st_ = packing.stats
    assert st_.trie_tokens == st_.real_tokens == sum(mb.num_tokens for mb in packing.micro_batches)
    assert st_.flat_tokens == sum(min(len(samples[j]), budget) for j in kept)
    assert st_.trie_tokens <= st_.flat_tokens and st_.compression == pytest.approx(st_.flat_tokens / st_.trie_tokens)


@FAST
@given(seed=st.integers(0, 100_000), trees=st.integers(1, 8), budget=st.integers(6, 80),
       strategy=st.sampled_from(["bfd", "balanced"]), ranks=st.integers(1, 3), shuffle=st.booleans(),
       threads=st.integers(1, 3))
def test_trie_cpp_equals_reference_and_is_exact(seed, trees, budget, strategy, ranks, shuffle, threads):
    samples = random_forest(seed, trees)
    opts = dict(layout="trie", truncation="left", strategy=strategy, ranks=ranks, shuffle=shuffle, seed=seed)
    fast = pack(samples, budget, threads=threads, **opts)
    ref = pack_reference(samples, budget, **opts)
    assert_same_trie(fast, ref)
    check_trie_exact(samples, fast, budget)


def test_shared_prefix_is_computed_once_and_both_groups_keep_their_rows():
    rng = np.random.default_rng(0)
    trunk = np.arange(10, 30, dtype=np.int32)
    a = Sample(trunk, np.r_[np.zeros(10, bool), np.ones(10, bool)], 0, 1.0, 7, 0)
    b = Sample(trunk.copy(), np.r_[np.zeros(15, bool), np.ones(5, bool)], 1, 0.5, 7, 0)  # same tokens, other group
    c = Sample(np.r_[trunk[:12], [99, 98, 97]].astype(np.int32), np.r_[np.zeros(12, bool), np.ones(3, bool)], 1, 2.0, 7, 0)
    p = pack([a, b, c], 64, layout="trie")
    (mb,) = p.micro_batches
    assert mb.num_tokens == 20 + 3 and p.stats.flat_tokens == 55
    assert p.stats.compression == pytest.approx(55 / 23)
    # token 19 (the last of the trunk) is a target of a (group 0) and of b (group 1): two rows, same position
    last = int(np.flatnonzero(mb.input_ids == 29)[0])
    rows = np.flatnonzero(mb.rows == last - 1)
    assert sorted(zip(mb.group[rows].tolist(), mb.weights[rows].tolist())) == [(0, 1.0), (1, 0.5)]
    check_trie_exact([a, b, c], p, 64)
    del rng


def test_separate_roots_and_mixed_prompts_are_reported_not_errors():
    rng = np.random.default_rng(1)
    s1 = _sample([1, 2, 3, 4, 5, 6], rng, 0)
    s2 = _sample([9, 2, 3, 4, 5, 6], rng, 0)  # same tree id, different first token: a second root
    same = [_sample([1, 2, 3, 4, 5, 6, 7], rng, 1), _sample([1, 2, 3, 4, 8], rng, 1)]
    for s in same:
        s.target_mask[:] = False
        s.target_mask[-1] = True  # the shared prompt (4 tokens) is context in both
    p = pack([s1, s2, *same], 64, layout="trie")
    assert p.stats.mixed_trees == [0]
    (mb,) = p.micro_batches
    roots = np.flatnonzero(mb.position_ids == 0)
    assert len(roots) == 3  # two roots for tree 0, one for tree 1
    check_trie_exact([s1, s2, *same], p, 64)


def test_tree_over_budget_is_split_at_branch_points_and_reported():
    rng = np.random.default_rng(2)
    trunk = list(range(100, 120))
    samples = [_sample(trunk + [k, k + 1, k + 2], rng, 5) for k in range(0, 30, 3)]  # 10 branches of 3 tokens
    p = pack(samples, 32, layout="trie")
    assert p.stats.split_trees == [5]
    assert all(mb.num_tokens <= 32 for mb in p.micro_batches)
    assert len(p.micro_batches) > 1
    check_trie_exact(samples, p, 32)
    assert_same_trie(p, pack_reference(samples, 32, layout="trie"))


def test_single_path_over_budget_follows_the_flat_truncation_policy():
    rng = np.random.default_rng(3)
    long = _sample(list(range(1, 50)), rng, 0)
    short = _sample(list(range(1, 10)), rng, 0)
    with pytest.raises(ValueError, match="exceed the budget"):
        pack([long, short], 20, layout="trie")
    for side in ("left", "right"):
        p = pack([long, short], 20, layout="trie", truncation=side)
        flat = pack([long, short], 20, layout="flat", truncation=side)
        assert p.stats.truncated == flat.stats.truncated and p.stats.truncated[0][0] == 0
        check_trie_exact([long, short], p, 20, side)


def test_auto_layout_is_trie_for_tree_data_and_flat_otherwise():
    rng = np.random.default_rng(4)
    trees = [_sample([1, 2, 3, 4], rng, 0), _sample([1, 2, 3, 5], rng, 0)]
    assert pack(trees, 16, layout="auto").stats.layout == "trie"
    loose = [_sample([1, 2, 3, 4], rng, -1), _sample([1, 2, 3, 5], rng, -1)]
    assert pack(loose, 16, layout="auto").stats.layout == "flat"
    with pytest.raises(ValueError, match="layout"):
        pack(trees, 16, layout="tree")


def test_flat_batches_derive_the_same_attention_contract():
    rng = np.random.default_rng(5)
    samples = [_sample([1, 2, 3], rng, -1), _sample([4, 5], rng, -1)]
    (mb,) = pack(samples, 16, layout="flat", shuffle=False).micro_batches
    assert mb.subtree_end is None and "subtree_end" not in mb.to_torch()
    ends = mb.attention_ends()
    cu = mb.cu_seqlens
    assert ends.tolist() == [int(cu[k + 1]) for k in range(len(cu) - 1) for _ in range(int(cu[k + 1] - cu[k]))]
    (tmb,) = pack(samples, 16, layout="trie", shuffle=False).micro_batches
    assert "subtree_end" in tmb.to_torch()


def test_trie_packs_100_samples_of_one_tree_linearly():
    """Many samples sharing a long trunk: the trie holds the trunk once."""
    rng = np.random.default_rng(6)
    trunk = rng.integers(0, 1000, 300).tolist()
    samples = [_sample(trunk + rng.integers(0, 1000, 20).tolist(), rng, 0) for _ in range(100)]
    p = pack(samples, 4096, layout="trie")
    assert p.stats.trie_tokens <= 300 + 100 * 20 and p.stats.flat_tokens == 100 * 320
    assert_same_trie(p, pack_reference(samples, 4096, layout="trie"))


# ------------------------------------------------------------------------------------- _C robustness
def test_count_targets_rejects_negative_offsets_instead_of_reading_out_of_bounds():
    mask = np.zeros(2, np.uint8)
    one, two = np.zeros(1, np.int64), np.full(1, 2, np.int64)
    with pytest.raises(ValueError, match="offsets"):
        _C.pack_count_targets(mask, np.array([-2**40, -2**40 + 2], np.int64), one, two)
    with pytest.raises(ValueError, match="offsets"):
        _C.pack_count_targets(mask, np.array([0, 5], np.int64), one, two)  # past the end of the mask
    with pytest.raises(ValueError, match="out of range"):
        _C.pack_count_targets(mask, np.array([0, 2], np.int64), np.array([2**62], np.int64), np.array([2**62], np.int64))
    kept, removed = _C.pack_count_targets(np.array([0, 1], np.uint8), np.array([0, 2], np.int64), one, two)
    assert kept.tolist() == [1] and removed.tolist() == [0]


def test_trie_bindings_validate_their_inputs():
    tokens = np.arange(6, dtype=np.int32)
    mask = np.array([0, 1, 1, 0, 1, 1], np.uint8)
    wa, wl, tree = np.array([0, 3], np.int64), np.array([3, 3], np.int64), np.zeros(2, np.int64)
    ok = _C.pack_trie_chunks(tokens, mask, wa, wl, tree, np.array([0, 1], np.int64), 16)
    assert ok["chunk_tokens"].tolist() == [6]
    with pytest.raises(ValueError, match="window"):
        _C.pack_trie_chunks(tokens, mask, np.array([0, 5], np.int64), wl, tree, np.array([0, 1], np.int64), 16)
    with pytest.raises(ValueError, match="out of range"):
        _C.pack_trie_chunks(tokens, mask, wa, wl, tree, np.array([0, 7], np.int64), 16)
    with pytest.raises(ValueError, match="twice"):
        _C.pack_trie_chunks(tokens, mask, wa, wl, tree, np.array([0, 0], np.int64), 16)
    grp, wt = np.zeros(2, np.int8), np.ones(2, np.float32)
    args = dict(members=ok["members"], lcp=ok["lcp"], chunk_offsets=ok["chunk_offsets"],
                order=np.array([0], np.int64), mb_offsets=np.array([0, 1], np.int64))
    _C.pack_trie_build(tokens, mask, grp, wt, wa, wl, **args)
    with pytest.raises(ValueError, match="lcp"):
        _C.pack_trie_build(tokens, mask, grp, wt, wa, wl, **{**args, "lcp": np.array([0, 9], np.int64)})
    with pytest.raises(ValueError, match="chunk id"):
        _C.pack_trie_build(tokens, mask, grp, wt, wa, wl, **{**args, "order": np.array([3], np.int64)})
    with pytest.raises(ValueError, match="chunk_offsets"):
        _C.pack_trie_build(tokens, mask, grp, wt, wa, wl, **{**args, "chunk_offsets": np.array([0, 5], np.int64)})


@pytest.mark.parametrize("spawn", [False, True])
def test_build_threads_are_joined_when_a_worker_or_a_thread_start_fails(spawn):
    """A failing worker (or a thread that cannot start) becomes a Python error after every join, not a crash."""
    with pytest.raises(RuntimeError):
        _C._parallel_selftest(4, 2, spawn)
    assert _C._parallel_selftest(4, -1, False) == 4  # and the pool still works afterwards


def test_reference_does_not_import_the_production_module():
    code = ("import sys, leafe_fast.packing_reference as r; "
            "assert 'leafe_fast.packing' not in sys.modules, 'reference imported packing'; "
            "from leafe_fast.packing_types import MicroBatch; assert r.MicroBatch is MicroBatch")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_columns_input_packs_the_same_trie():
    samples = random_forest(11, 5)
    a = pack(samples, 48, layout="trie", truncation="left")
    b = pack(SampleColumns.from_samples(samples), 48, layout="trie", truncation="left")
    assert_same_trie(a, b)
