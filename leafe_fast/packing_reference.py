"""Plain Python reference of the packer: the ground truth the tests compare ``leafe_fast._C`` against.

Every rule (item grouping, best fit with first-come ties, cheapest-fit LPT, slot dealing, splitmix64
shuffle, output layout) is written here the obvious way, with plain lists, ``bisect`` and ``heapq``; the
C++ in csrc/pack_plan.cpp and csrc/pack_build.cpp must produce the same micro-batches bit for bit. Used
through ``leafe_fast.packing.pack_reference`` or ``pack(..., backend="python")``.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from typing import Any

import numpy as np

from leafe_fast.packing_types import MicroBatch


class ReferenceEngine:
    """The plain Python path: same rules, written for reading, not speed."""

    def count(self, cols, win_start, win_len):
        n = len(cols)
        kept = np.zeros(n, dtype=np.int64)
        removed = np.zeros(n, dtype=np.int64)
        for j in range(n):
            a, b = int(cols.offsets[j]), int(cols.offsets[j + 1])
            ws, wl = a + int(win_start[j]), int(win_len[j])
            kept[j] = int(np.count_nonzero(cols.target_mask[ws + 1 : ws + wl])) if wl > 1 else 0
            if wl != b - a:
                removed[j] = int(np.count_nonzero(cols.target_mask[a:b])) - kept[j]
        return kept, removed

    def plan(self, ids, lengths, tree_ids, o):
        return plan_reference(ids.tolist(), lengths.tolist(), tree_ids.tolist(), o)

    def build(self, cols, win_abs, win_len, kept, plan) -> list[MicroBatch]:
        out = []
        order = plan["order"]
        bounds = plan["mb_offsets"]
        for b in range(len(bounds) - 1):
            sids = order[bounds[b] : bounds[b + 1]]
            ids, pos, cu, rows, tgts, wts, grp = [], [], [0], [], [], [], []
            local = 0
            for s in sids.tolist():
                a, n = int(win_abs[s]), int(win_len[s])
                toks = cols.tokens[a : a + n]
                hit = np.flatnonzero(cols.target_mask[a + 1 : a + n]) + 1  # window positions of targets
                ids.append(toks)
                pos.append(np.arange(n, dtype=np.int32))
                rows.append(local + hit - 1)
                tgts.append(toks[hit])
                wts.append(np.full(len(hit), cols.weight[s], dtype=np.float32))
                grp.append(np.full(len(hit), cols.group[s], dtype=np.int8))
                local += n
                cu.append(local)
            cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
            lens = np.diff(cu)
            out.append(MicroBatch(cat(ids, np.int32), cat(pos, np.int32), np.array(cu, dtype=np.int32),
                                  int(lens.max()) if len(lens) else 0, cat(rows, np.int64), cat(tgts, np.int64),
                                  cat(wts, np.float32), cat(grp, np.int8), np.asarray(sids, dtype=np.int64),
                                  int(plan["mb_rank"][b]), local, sum(len(r) for r in rows),
                                  float(plan["mb_cost"][b])))
        return out


    # ------------------------------------------------------------------ trie layout, written the obvious way
    def trie_chunks(self, cols, win_abs, win_len, eligible, budget):
        """Trees as dict tries; samples inserted in sorted order, a new chunk when the next would not fit."""
        seq = lambda s: tuple(cols.tokens[int(win_abs[s]) : int(win_abs[s]) + int(win_len[s])].tolist())  # noqa: E731
        groups: dict[int, list[int]] = {}
        order: list[list[int]] = []
        for s in eligible.tolist():
            t = int(cols.tree_id[s])
            if t < 0:
                order.append([s])
            elif t not in groups:
                groups[t] = [s]
                order.append(groups[t])
            else:
                groups[t].append(s)
        members, lcps, offsets, sizes, split, mixed = [], [], [0], [], [], []
        for group in order:
            seqs = {s: seq(s) for s in group}
            ranked = sorted(group, key=lambda s: (seqs[s], s))
            root: dict = {}
            size, chunks_before = 0, len(sizes)
            for k, s in enumerate(ranked):
                node, shared = root, 0
                for tok in seqs[s]:
                    if tok not in node:
                        break
                    node, shared = node[tok], shared + 1
                new = len(seqs[s]) - shared
                if k > 0 and size + new > budget:  # cut here: a fresh trie for the next chunk
                    offsets.append(len(members))
                    sizes.append(size)
                    root, size, shared = {}, 0, 0
                    new = len(seqs[s])
                node = root
                for tok in seqs[s]:
                    node = node.setdefault(tok, {})
                size += new
                members.append(s)
                lcps.append(shared)
            offsets.append(len(members))
            sizes.append(size)
            tree = int(cols.tree_id[group[0]])
            if len(sizes) - chunks_before > 1:
                split.append(tree)
            if len(group) > 1:
                common = len(_common_prefix([seqs[s] for s in group]))
                first = min(int(np.flatnonzero(cols.target_mask[int(win_abs[s]) + 1 : int(win_abs[s]) + int(win_len[s])])[0]) + 1
                            for s in group)
                if common == 0 or 2 * common < first:
                    mixed.append(tree)
        i64 = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
        return {"members": i64(members), "lcp": i64(lcps), "chunk_offsets": i64(offsets), "chunk_tokens": i64(sizes),
                "split_trees": i64(split), "mixed_trees": i64(mixed)}

    def trie_build(self, cols, win_abs, win_len, kept, chunks, plan) -> list[MicroBatch]:
        out = []
        order, bounds = plan["order"], plan["mb_offsets"]
        offsets, members = chunks["chunk_offsets"], chunks["members"]
        for b in range(len(bounds) - 1):
            ids, pos, ends, cu, rows, tgts, wts, grp, sids = [], [], [], [0], [], [], [], [], []
            flat = 0
            for c in order[bounds[b] : bounds[b + 1]].tolist():
                chunk = sorted(members[offsets[c] : offsets[c + 1]].tolist())
                seqs = {s: cols.tokens[int(win_abs[s]) : int(win_abs[s]) + int(win_len[s])].tolist() for s in chunk}
                root: dict = {}
                for s in chunk:
                    node = root
                    for tok in seqs[s]:
                        node = node.setdefault(tok, {})
                # pre-order with children by token value; node id and subtree end per trie node
                node_id: dict[int, int] = {}
                stack = [(root[t], t, 0) for t in sorted(root, reverse=True)]
                opened = []
                while stack:
                    node, tok, depth = stack.pop()
                    node_id[id(node)] = len(ids)
                    ids.append(tok)
                    pos.append(depth)
                    ends.append(-1)
                    opened.append(node)
                    stack.extend((node[t], t, depth + 1) for t in sorted(node, reverse=True))
                size: dict[int, int] = {}
                for node in reversed(opened):  # children are opened after their parent
                    size[id(node)] = 1 + sum(size[id(child)] for child in node.values())
                    ends[node_id[id(node)]] = node_id[id(node)] + size[id(node)]
                cu.append(len(ids))
                for s in chunk:
                    node, path = root, []
                    for tok in seqs[s]:
                        node = node[tok]
                        path.append(node_id[id(node)])
                    mask = cols.target_mask[int(win_abs[s]) : int(win_abs[s]) + int(win_len[s])]
                    for i in range(1, len(path)):
                        if mask[i]:
                            rows.append(path[i - 1])
                            tgts.append(seqs[s][i])
                            wts.append(cols.weight[s])
                            grp.append(cols.group[s])
                    sids.append(s)
                    flat += len(path)
            cu_a = np.array(cu, dtype=np.int32)
            out.append(MicroBatch(np.array(ids, dtype=np.int32), np.array(pos, dtype=np.int32), cu_a,
                                  int(np.diff(cu_a).max()) if len(cu_a) > 1 else 0, np.array(rows, dtype=np.int64),
                                  np.array(tgts, dtype=np.int64), np.array(wts, dtype=np.float32),
                                  np.array(grp, dtype=np.int8), np.array(sids, dtype=np.int64),
                                  int(plan["mb_rank"][b]), len(ids), len(rows), float(plan["mb_cost"][b]),
                                  np.array(ends, dtype=np.int32), "trie", flat))
        return out


def _common_prefix(seqs: list[tuple]) -> tuple:
    first = min(seqs)
    last = max(seqs)
    k = 0
    while k < min(len(first), len(last)) and first[k] == last[k]:
        k += 1
    return first[:k]


_MASK64 = (1 << 64) - 1


def _permutation(n: int, seed: int) -> list[int]:
    """Fisher-Yates driven by splitmix64, bit for bit the C++ ``permutation``."""
    p = list(range(n))
    state = seed & _MASK64
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        j = z % (i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def _items_reference(lengths: list[int], trees: list[int], o: dict) -> tuple[list[list[int]], list[int]]:
    """Placement units (lists of positions j): single samples, or whole trees emitted at their first member."""
    budget = o["budget"]
    if not o["keep_trees_together"]:
        return [[j] for j in range(len(lengths))], []
    members: dict[int, list[int]] = {}
    for j, t in enumerate(trees):
        if t >= 0:
            members.setdefault(t, []).append(j)
    items, split = [], []
    for j, t in enumerate(trees):
        if t < 0:
            items.append([j])
            continue
        group = members[t]
        if group[0] != j:
            continue
        if sum(lengths[k] for k in group) <= budget:
            items.append(group)
            continue
        room: list[int] = []
        chunks: list[list[int]] = []
        for k in sorted(group, key=lambda k: (-lengths[k], k)):
            fits = [c for c in range(len(room)) if room[c] >= lengths[k]]
            if fits:
                c = min(fits, key=lambda c: (room[c], c))
            else:
                c = len(room)
                room.append(budget)
                chunks.append([])
            room[c] -= lengths[k]
            chunks[c].append(k)
        items.extend(sorted(c) for c in chunks)
        split.append(t)
    return items, split


def _bfd_reference(item_len: list[int], budget: int) -> list[list[int]]:
    """Best fit decreasing; among bins with the same free space, the first to reach it wins."""
    bins: list[list[int]] = []
    used: list[int] = []
    spaces: list[int] = []  # sorted free-space values that have waiting bins
    waiting: dict[int, deque] = {}
    for i in sorted(range(len(item_len)), key=lambda i: (-item_len[i], i)):
        n = item_len[i]
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            b = waiting[space].popleft()
            if not waiting[space]:
                del waiting[space]
                spaces.pop(k)
        else:
            b = len(bins)
            bins.append([])
            used.append(0)
        bins[b].append(i)
        used[b] += n
        left = budget - used[b]
        if left > 0:
            if left not in waiting:
                waiting[left] = deque()
                bisect.insort(spaces, left)
            waiting[left].append(b)
    return bins


def _cheapest_fit_reference(item_len, item_cost, budget, ranks, per_rank, grow):
    """LPT with a capacity check (see csrc/pack_plan.cpp); returns (bins, per_rank) or None if it cannot fit."""
    order = sorted(range(len(item_len)), key=lambda i: (-item_cost[i], -item_len[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    cost: list[float] = []
    ready: list[tuple[float, int]] = []  # (cost, bin)
    parked: list[tuple[int, int]] = []  # (-room, bin): bins too full for the current item

    def open_bins(count):
        for _ in range(count):
            bins.append([])
            used.append(0)
            cost.append(0.0)
            heapq.heappush(ready, (0.0, len(bins) - 1))

    open_bins(ranks * per_rank)
    for i in order:
        n = item_len[i]
        while parked and -parked[0][0] >= n:
            heapq.heappush(ready, (cost[parked[0][1]], heapq.heappop(parked)[1]))
        chosen = -1
        while chosen < 0:
            if not ready:
                if not grow:
                    return None
                open_bins(ranks)
                per_rank += 1
            _, b = heapq.heappop(ready)
            room = budget - used[b]
            if room >= n:
                chosen = b
            elif room > 0:
                heapq.heappush(parked, (-room, b))
        bins[chosen].append(i)
        used[chosen] += n
        cost[chosen] += item_cost[i]
        heapq.heappush(ready, (cost[chosen], chosen))
    return bins, per_rank


def plan_reference(ids: list[int], lengths: list[int], trees: list[int], o: dict) -> dict[str, Any]:
    budget, R, alpha = o["budget"], o["ranks"], o["alpha"]
    items, split = _items_reference(lengths, trees, o)
    item_len = [sum(lengths[j] for j in it) for it in items]
    item_cost = []
    for it in items:
        c = 0.0
        for j in it:
            c += lengths[j] + alpha * (lengths[j] * lengths[j])
        item_cost.append(c)

    def bin_cost(b):
        c = 0.0
        for i in b:
            c += item_cost[i]
        return c

    if o["strategy"] == "bfd":
        bins = _bfd_reference(item_len, budget)
        at = _permutation(len(bins), o["seed"]) if o["shuffle"] else range(len(bins))
        placed = [(bins[b], k % R) for k, b in enumerate(at)]
        per_rank = -(-len(bins) // R)
    else:
        fixed = o["micro_batches_per_rank"]
        per_rank = fixed or max(1, (-(-sum(item_len) // budget) + R - 1) // R)
        res = _cheapest_fit_reference(item_len, item_cost, budget, R, per_rank, grow=not fixed)
        if res is None:
            raise RuntimeError(f"the samples do not fit in {R} ranks x {fixed} micro-batches of {budget} tokens; "
                               "raise micro_batches_per_rank or leave it None")
        bins, per_rank = res
        costs = [bin_cost(b) for b in bins]
        by_cost = sorted(range(len(bins)), key=lambda b: (-costs[b], b))
        total = [0.0] * R
        slots = []
        for s in range(per_rank):
            slot = [-1] * R
            for b in by_cost[s * R : (s + 1) * R]:
                r = min((r for r in range(R) if slot[r] < 0), key=lambda r: (total[r], r))
                slot[r] = b
                total[r] += costs[b]
            slots.append(slot)
        at = _permutation(per_rank, o["seed"]) if o["shuffle"] else range(per_rank)
        placed = [(bins[slots[s][r]], r) for s in at for r in range(R)]
    order, bounds, ranks, mb_cost = [], [0], [], []
    for b, r in placed:
        for i in b:
            order.extend(ids[j] for j in items[i])
        bounds.append(len(order))
        ranks.append(r)
        mb_cost.append(bin_cost(b))
    return {"order": np.array(order, dtype=np.int64), "mb_offsets": np.array(bounds, dtype=np.int64),
            "mb_rank": np.array(ranks, dtype=np.int32), "mb_cost": np.array(mb_cost, dtype=np.float64),
            "split_trees": np.array(split, dtype=np.int64), "micro_batches_per_rank": per_rank}
