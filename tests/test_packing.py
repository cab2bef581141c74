"""Packer: the C++ path equals the Python reference batch for batch, and the packing invariants hold.

Invariants (torchtitan style): every target of every kept sample appears exactly once, predicted from the
previous position of the same sample; positions restart per sample; cu_seqlens match; no micro-batch
exceeds the budget; balanced packings give every rank the same number of micro-batches.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafe_fast import _C
from leafe_fast.data.columns import Sample, SampleColumns
from leafe_fast.packing import columns_from_labels, pack, pack_reference, target_norms

FIELDS = ("input_ids", "position_ids", "cu_seqlens", "rows", "targets", "weights", "group", "sample_ids")
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_samples(seed: int, n: int, max_len: int, target_rate: float = 0.4, trees: int = 6) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        ids = rng.integers(1, 50_000, length).astype(np.int32)
        mask = rng.random(length) < target_rate
        if length:
            mask[0] = False
        out.append(Sample(ids, mask, int(rng.integers(0, 2)), float(rng.uniform(0.1, 2.0)),
                          int(rng.integers(-1, trees)), 0))
    return out


def assert_same(a, b) -> None:
    assert len(a.micro_batches) == len(b.micro_batches)
    for k, (x, y) in enumerate(zip(a.micro_batches, b.micro_batches)):
        for f in FIELDS:
            xa, ya = getattr(x, f), getattr(y, f)
            assert xa.dtype == ya.dtype, (k, f)
            np.testing.assert_array_equal(xa, ya, err_msg=f"micro-batch {k}, field {f}")
        assert (x.rank, x.max_seqlen, x.num_tokens, x.num_targets, x.cost) == (
            y.rank, y.max_seqlen, y.num_tokens, y.num_targets, y.cost), k
    sa, sb = a.stats, b.stats
    assert (sa.truncated, sa.skipped, sa.split_trees, sa.micro_batches_per_rank) == (
        sb.truncated, sb.skipped, sb.split_trees, sb.micro_batches_per_rank)


def check_invariants(samples: list[Sample], packing, budget: int, truncation: str) -> None:
    """Rebuild every (sample, position) target from the micro-batches and compare with the input."""
    expected = {}
    kept_ids = set()
    for j, s in enumerate(samples):
        length = len(s)
        keep = min(length, budget)
        start = length - keep if truncation == "left" else 0
        window = s.input_ids[start : start + keep]
        hits = [i for i in range(1, keep) if s.target_mask[start + i]]
        for i in hits:
            expected[(j, i)] = (int(window[i]), s.weight, s.group)
        if hits:
            kept_ids.add(j)
    seen = {}
    packed_ids = []
    for mb in packing.micro_batches:
        assert mb.num_tokens <= budget
        assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.num_tokens == len(mb.input_ids)
        lens = np.diff(mb.cu_seqlens)
        assert len(lens) == len(mb.sample_ids)
        assert mb.max_seqlen == (int(lens.max()) if len(lens) else 0)
        assert len(mb.rows) == len(mb.targets) == len(mb.weights) == len(mb.group) == mb.num_targets
        owner = np.repeat(np.arange(len(lens)), lens)  # sample slot of each token
        for k, sid in enumerate(mb.sample_ids.tolist()):
            a, b = int(mb.cu_seqlens[k]), int(mb.cu_seqlens[k + 1])
            np.testing.assert_array_equal(mb.position_ids[a:b], np.arange(b - a))
            packed_ids.append(sid)
            s = samples[sid]
            start = len(s) - (b - a) if truncation == "left" else 0
            np.testing.assert_array_equal(mb.input_ids[a:b], s.input_ids[start : start + b - a])
        for row, tgt, w, g in zip(mb.rows.tolist(), mb.targets.tolist(), mb.weights.tolist(), mb.group.tolist()):
            k = owner[row]
            assert row + 1 < mb.cu_seqlens[k + 1], "the shift crossed a sample boundary"
            assert mb.input_ids[row + 1] == tgt
            key = (int(mb.sample_ids[k]), row + 1 - int(mb.cu_seqlens[k]))
            assert key not in seen, f"target {key} appears twice"
            seen[key] = (tgt, np.float32(w), g)
    assert sorted(packed_ids) == sorted(kept_ids), "every sample with a target is packed exactly once"
    assert seen.keys() == expected.keys()
    for key, (tgt, w, g) in expected.items():
        assert seen[key] == (tgt, np.float32(w), g), key
    assert packing.stats.skipped == sorted(set(range(len(samples))) - kept_ids)
    assert packing.stats.real_tokens == sum(mb.num_tokens for mb in packing.micro_batches)


options = st.fixed_dictionaries({
    "strategy": st.sampled_from(["bfd", "balanced"]),
    "ranks": st.integers(1, 4),
    "alpha": st.sampled_from([0.0, 1e-3, 0.05]),
    "seed": st.integers(0, 2**63),
    "shuffle": st.booleans(),
    "keep_trees_together": st.booleans(),
    "truncation": st.sampled_from(["left", "right"]),
})


@FAST
@given(data_seed=st.integers(0, 10_000), n=st.integers(1, 60), max_len=st.integers(1, 80),
       budget=st.integers(4, 120), opts=options)
def test_cpp_equals_reference_and_invariants_hold(data_seed, n, max_len, budget, opts):
    samples = random_samples(data_seed, n, max_len)
    if not any(s.target_mask[max(0, len(s) - budget) if opts["truncation"] == "left" else 0:][1:budget].any()
               for s in samples):
        with pytest.raises(ValueError, match="target"):
            pack(samples, budget, **opts)
        return
    fast = pack(samples, budget, **opts)
    ref = pack_reference(samples, budget, **opts)
    assert_same(fast, ref)
    check_invariants(samples, fast, budget, opts["truncation"])
    if opts["strategy"] == "balanced":
        counts = {r: len(fast.for_rank(r)) for r in range(opts["ranks"])}
        assert len(set(counts.values())) == 1, counts


@FAST
@given(data_seed=st.integers(0, 10_000), threads=st.integers(1, 4))
def test_threaded_build_equals_single_thread(data_seed, threads):
    samples = random_samples(data_seed, 80, 70)
    one = pack(samples, 96, truncation="left", threads=1)
    many = pack(samples, 96, truncation="left", threads=threads)
    assert_same(one, many)


def test_column_input_equals_sample_list_and_is_not_copied():
    samples = random_samples(3, 50, 40)
    cols = SampleColumns.from_samples(samples)
    assert_same(pack(cols, 64), pack(samples, 64))
    mb = pack(cols, 64).micro_batches[0]
    tensors = mb.to_torch()
    assert tensors["input_ids"].data_ptr() == mb.input_ids.__array_interface__["data"][0]
    assert tensors["rows"].dtype.is_floating_point is False and tensors["max_seqlen"] == mb.max_seqlen


def test_balanced_meets_the_imbalance_target_on_long_tailed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.0, 3000), 20, 4096).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = (rng.random(int(offsets[-1])) < 0.3).astype(np.uint8)
    mask[offsets[:-1]] = 0
    n = len(lengths)
    cols = SampleColumns(rng.integers(0, 1000, int(offsets[-1])).astype(np.int32), offsets, mask,
                         np.zeros(n, np.int8), np.ones(n, np.float32), -np.ones(n, np.int64), np.zeros(n, np.int32))
    p = pack(cols, 4096, strategy="balanced", ranks=4, alpha=2e-4)
    assert p.stats.rank_imbalance < 0.01
    assert p.stats.sync_imbalance < 0.05
    assert p.stats.token_efficiency > 0.95
    assert len({len(p.for_rank(r)) for r in range(4)}) == 1
    bfd = pack(cols, 4096)
    assert bfd.stats.token_efficiency >= p.stats.token_efficiency
    assert bfd.stats.num_micro_batches == -(-int(lengths.sum()) // 4096)  # BFD reaches the lower bound here


def test_same_seed_same_packing_and_seed_changes_the_order():
    samples = random_samples(5, 200, 30)
    a = pack(samples, 40, seed=1)
    assert_same(a, pack(samples, 40, seed=1))
    b = pack(samples, 40, seed=2)
    assert [mb.sample_ids.tolist() for mb in a.micro_batches] != [mb.sample_ids.tolist() for mb in b.micro_batches]
    assert sorted(map(tuple, (mb.sample_ids.tolist() for mb in a.micro_batches))) == sorted(
        map(tuple, (mb.sample_ids.tolist() for mb in b.micro_batches)))


def test_trees_stay_together_and_oversized_trees_are_split_and_reported():
    tok = lambda n: np.arange(1, n + 1, dtype=np.int32)  # noqa: E731
    mask = lambda n: np.r_[False, np.ones(n - 1, bool)]  # noqa: E731
    samples = [Sample(tok(10), mask(10), tree_id=7), Sample(tok(5), mask(5)), Sample(tok(12), mask(12), tree_id=7),
               Sample(tok(30), mask(30), tree_id=9), Sample(tok(25), mask(25), tree_id=9)]
    p = pack(samples, 40, keep_trees_together=True, shuffle=False)
    where = {int(s): k for k, mb in enumerate(p.micro_batches) for s in mb.sample_ids}
    assert where[0] == where[2]
    assert where[3] != where[4]
    assert p.stats.split_trees == [9]
    mb = p.micro_batches[where[0]]
    assert mb.sample_ids.tolist().index(0) < mb.sample_ids.tolist().index(2)  # input order inside a tree
    assert_same(p, pack_reference(samples, 40, keep_trees_together=True, shuffle=False))


def test_truncation_error_names_the_samples_and_left_right_are_reported():
    samples = random_samples(7, 10, 10) + [Sample(np.arange(50, dtype=np.int32), np.r_[False, np.ones(49, bool)])]
    with pytest.raises(ValueError, match=r"10 \(50 tokens\).*truncation='left'"):
        pack(samples, 20)
    left = pack(samples, 20, truncation="left")
    right = pack(samples, 20, truncation="right")
    # 49 targets (tokens 1..49). Left keeps tokens 30..49: targets 1..29 are cut and 30 lost its predictor.
    assert left.stats.truncated == [(10, 30, 30)]
    assert right.stats.truncated == [(10, 30, 30)]  # keeps 0..19: targets 20..49 cut
    assert left.stats.num_targets == right.stats.num_targets
    mb = next(mb for mb in left.micro_batches if 10 in mb.sample_ids.tolist())
    k = mb.sample_ids.tolist().index(10)
    assert mb.input_ids[mb.cu_seqlens[k] : mb.cu_seqlens[k + 1]].tolist() == list(range(30, 50))


def test_samples_without_targets_are_skipped_and_listed():
    samples = [Sample(np.arange(4, dtype=np.int32), np.array([0, 1, 1, 0], bool)),
               Sample(np.zeros(0, np.int32), np.zeros(0, bool)),
               Sample(np.arange(3, dtype=np.int32), np.zeros(3, bool)),
               Sample(np.arange(2, dtype=np.int32), np.array([0, 1], bool))]
    p = pack(samples, 8)
    assert p.stats.skipped == [1, 2]
    assert sorted(s for mb in p.micro_batches for s in mb.sample_ids.tolist()) == [0, 3]
    with pytest.raises(ValueError, match="none of the 2 samples has a target"):
        pack(samples[1:3], 8)


def _cols(n=3, length=4):
    offsets = np.arange(n + 1, dtype=np.int64) * length
    mask = np.tile(np.r_[0, np.ones(length - 1)].astype(np.uint8), n)
    return SampleColumns(np.arange(n * length, dtype=np.int32), offsets, mask, np.zeros(n, np.int8),
                         np.ones(n, np.float32), -np.ones(n, np.int64), np.zeros(n, np.int32))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "target_mask", c.target_mask[:-1]), "target_mask has"),
        (lambda c: setattr(c, "weight", c.weight[:-1]), "weight has"),
        (lambda c: setattr(c, "offsets", c.offsets[::-1].copy()), "offsets must"),
        (lambda c: c.target_mask.__setitem__(4, 1), r"samples \[1\] mark their first token"),
        (lambda c: c.weight.__setitem__(2, np.nan), r"samples \[2\]"),
        (lambda c: setattr(c, "offsets", np.zeros(1, np.int64)) or setattr(c, "tokens", c.tokens[:0])
         or setattr(c, "target_mask", c.target_mask[:0]), "no samples"),
    ],
)
def test_bad_columns_get_errors_that_name_the_problem(mutate, message):
    cols = _cols()
    mutate(cols)
    with pytest.raises(ValueError, match=message):
        pack(cols, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 2**22 + 1}, "budget"),
        ({"strategy": "ffd"}, "strategy"),
        ({"ranks": 0}, "ranks"),
        ({"micro_batches_per_rank": 2}, "applies to strategy=.balanced. only"),
        ({"alpha": -1.0}, "alpha"),
        ({"truncation": "middle"}, "truncation"),
        ({"backend": "rust"}, "backend"),
        ({"strategy": "balanced", "ranks": 2, "micro_batches_per_rank": 1, "budget": 4}, "do not fit"),
    ],
)
def test_bad_options_get_clear_errors(kwargs, message):
    kwargs = {"budget": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        pack(_cols(), **kwargs)


def test_fewer_items_than_ranks_gives_empty_micro_batches_not_missing_ranks():
    p = pack(_cols(n=3), 16, strategy="balanced", ranks=4)
    assert [len(p.for_rank(r)) for r in range(4)] == [1, 1, 1, 1]
    assert sorted(mb.num_tokens for mb in p.micro_batches) == [0, 4, 4, 4]
    empty = next(mb for mb in p.micro_batches if mb.num_tokens == 0)
    assert empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0 and len(empty.rows) == 0


def test_labels_form_matches_target_mask_form():
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    labels = [[-100, -100, 7, 8], [9, -100, 11]]  # labels[0] has no predictor: ignored as in HF
    p = pack({"input_ids": ids, "labels": labels, "group": [0, 1]}, 8, shuffle=False)
    got = sorted(zip(np.concatenate([mb.targets for mb in p.micro_batches]).tolist(),
                     np.concatenate([mb.group for mb in p.micro_batches]).tolist()))
    assert got == [(7, 0), (8, 0), (11, 1)]
    with pytest.raises(ValueError, match="differs from input_ids"):
        columns_from_labels([[1, 2, 3]], [[-100, 3, 3]])
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        columns_from_labels(ids, labels[:1])


def test_steps_and_target_norms_cover_each_micro_batch_once():
    samples = random_samples(11, 120, 30)
    p = pack(samples, 40, strategy="balanced", ranks=3)
    steps = p.steps(2)
    flat = [mb for step in steps for per_rank in step for mb in per_rank]
    assert len(flat) == len(p.micro_batches) and {id(m) for m in flat} == {id(m) for m in p.micro_batches}
    assert all(len(step) == 3 for step in steps)
    norms = target_norms(flat)
    assert norms.sum() == p.stats.num_targets
    assert [[id(m) for m in step] for step in p.steps(2, rank=1)] == [[id(m) for m in s[1]] for s in steps]


def test_target_norms_refuses_groups_outside_num_groups():
    """A group id >= num_groups used to be dropped silently (its targets never normalised)."""
    from leafe_fast.errors import UserError

    samples = random_samples(6, 120, 30)
    flat = list(pack(samples, 40).micro_batches)
    assert max(int(mb.group.max()) for mb in flat if len(mb.group)) >= 1
    with pytest.raises(UserError, match="outside \\[0, 1\\)"):
        target_norms(flat, num_groups=1)


def test_native_build_rejects_out_of_range_plans():
    cols = _cols()
    n = len(cols)
    args = (cols.tokens, cols.target_mask, cols.group, cols.weight, cols.offsets[:-1].copy(),
            np.full(n, 4, np.int64), np.full(n, 3, np.int64))
    with pytest.raises(ValueError, match="out of range"):
        _C.pack_build(*args, np.array([0, 5], np.int64), np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match="mb_offsets"):
        _C.pack_build(*args, np.array([0, 1], np.int64), np.array([0, 3], np.int64))
    assert _C.lengths_to_offsets(np.array([2, 3], np.int64)).tolist() == [0, 2, 5]


@FAST
@given(data_seed=st.integers(0, 10_000), ranks=st.integers(1, 3), per_rank=st.integers(1, 12),
       keep=st.booleans(), alpha=st.sampled_from([0.0, 0.02]))
def test_fixed_micro_batch_count_fits_or_fails_the_same_way_in_both(data_seed, ranks, per_rank, keep, alpha):
    samples = random_samples(data_seed, 30, 40)
    kwargs = dict(strategy="balanced", ranks=ranks, micro_batches_per_rank=per_rank, keep_trees_together=keep,
                  alpha=alpha, truncation="right")
    try:
        fast = pack(samples, 48, **kwargs)
    except ValueError as exc:
        assert "do not fit" in str(exc)
        with pytest.raises(ValueError, match="do not fit"):
            pack_reference(samples, 48, **kwargs)
        return
    assert_same(fast, pack_reference(samples, 48, **kwargs))
    assert all(len(fast.for_rank(r)) == per_rank for r in range(ranks))
    check_invariants(samples, fast, 48, "right")


def _big_columns(seed: int, lengths: np.ndarray, mask: np.ndarray) -> SampleColumns:
    """Columns whose outputs exceed 1 MiB (the mapped, pooled path); tokens differ per seed."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(1, 150_000, int(offsets[-1])).astype(np.int32)
    return SampleColumns(tokens, offsets, mask, rng.integers(0, 2, n).astype(np.int8),
                         rng.uniform(0.1, 2.0, n).astype(np.float32), -np.ones(n, np.int64), np.zeros(n, np.int32))


def test_output_buffers_are_reused_only_after_release_and_fully_rewritten():
    from leafe_fast.packing import release_buffers

    rng = np.random.default_rng(7)
    lengths = rng.integers(500, 2500, 300)
    mask = rng.random(int(lengths.sum())) < 0.5
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False
    release_buffers()
    a_cols, b_cols = _big_columns(1, lengths, mask), _big_columns(2, lengths, mask)
    a = pack(a_cols, 4096, threads=2)
    a_copy = {f: [getattr(mb, f).copy() for mb in a.micro_batches] for f in FIELDS}
    assert _C.pack_pooled_bytes() == 0
    b = pack(b_cols, 4096, threads=2)  # a is alive: its buffers must not be handed out
    for f in FIELDS:
        for k, kept in enumerate(a_copy[f]):
            np.testing.assert_array_equal(getattr(a.micro_batches[k], f), kept)
    assert_same(b, pack_reference(b_cols, 4096))
    del a
    gc.collect()
    pooled = _C.pack_pooled_bytes()
    assert pooled >= 4 * int(lengths.sum())  # at least input_ids came back to the pool
    c = pack(b_cols, 4096, threads=1, seed=3)  # same sizes: recycles a's buffers, holding a's data
    assert _C.pack_pooled_bytes() < pooled
    assert_same(c, pack_reference(b_cols, 4096, seed=3))
    del b, c
    gc.collect()
    assert release_buffers() > 0
    assert _C.pack_pooled_bytes() == 0


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint32, np.uint64])
def test_token_range_check_covers_every_integer_dtype(dtype):
    """The range check skips the side a dtype cannot reach (one pass per array on every pack() call): every
    reachable bad value is still refused, and so is a mask value outside {0, 1} in any mask dtype."""
    def cols(tokens, mask):
        return SampleColumns(tokens=np.asarray(tokens, dtype), offsets=np.array([0, 3]), target_mask=mask,
                             group=np.zeros(1, np.int64), weight=np.ones(1, np.float32), tree_id=np.full(1, -1),
                             prefix_len=np.zeros(1, np.int64))

    ok_mask = np.array([0, 1, 1], np.uint8)
    cols([1, 2, 3], ok_mask).validate()
    info = np.iinfo(dtype)
    for bad in ([-1] if info.min < 0 else []) + ([2**31] if info.max >= 2**31 else []):
        with pytest.raises(ValueError, match="outside"):
            cols([1, bad, 3], ok_mask).validate()
    for mask_dtype, bad in ((np.int8, -1), (np.int8, 2), (np.uint8, 2), (np.int64, -1), (np.int64, 3)):
        with pytest.raises(ValueError, match="only 0 and 1"):
            cols([1, 2, 3], np.array([0, 1, bad], mask_dtype)).validate()
