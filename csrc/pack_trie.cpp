// Trie layout: the samples of one tree are merged into a token trie, emitted in depth-first pre-order.
//
// Ordering: a tree's samples are sorted lexicographically (token values as signed ints, a sample that is a
// prefix of another first, identical samples by id) with a multikey string sort that also yields the
// neighbour LCPs. The sort skips, for a group of samples, their whole common extension in one scan, so
// each (sample, token) is read about once: O(tokens + n log n), not O(n log n * prefix).
// Pre-order emission of the sorted samples: sample k adds its tokens from depth lcp[k] on; the nodes of
// the previous path at depth >= lcp[k] are closed there (their subtree_end is the next emitted index).
// This is exactly the pre-order of the trie with children ordered by token value.
// Chunks (budget): consecutive sorted samples while the trie tokens fit; a new chunk re-emits the
// shared prefix (a split at a branch point). The Python reference (leafe_fast/packing_reference.py)
// builds an explicit dict trie instead and must agree bit for bit.
#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "packer.h"
#include "parallel.h"

namespace leafe {

namespace {

// Common prefix of x and y from position d, up to limit tokens (x, y hold at least d + limit tokens).
inline int64_t common_from(const int32_t* x, const int32_t* y, int64_t d, int64_t limit) {
  int64_t i = 0;
  for (; i + 2 <= limit; i += 2) {
    uint64_t a, b;
    std::memcpy(&a, x + d + i, 8);
    std::memcpy(&b, y + d + i, 8);
    if (a != b) break;
  }
  for (; i < limit; ++i)
    if (x[d + i] != y[d + i]) break;
  return i;
}

struct Sorter {
  const int32_t* tokens;
  const int64_t* win_abs;
  const int64_t* win_len;
  std::vector<std::pair<int64_t, int64_t>> keyed;  // scratch (key, sample)

  // Sorts ids[0:n) (given in ascending id order) lexicographically; lcp[k] = LCP(ids[k-1], ids[k]), lcp[0] = 0.
  void sort(int64_t* ids, int64_t* lcp, int64_t n) {
    if (n == 0) return;
    lcp[0] = 0;
    struct Range {
      int64_t lo, hi, d;
    };
    std::vector<Range> stack{{0, n, 0}};
    while (!stack.empty()) {
      Range r = stack.back();
      stack.pop_back();
      if (r.hi - r.lo < 2) continue;
      // Extend the depth over the tokens every sample of the range shares.
      const int64_t ref = ids[r.lo];
      const int32_t* x = tokens + win_abs[ref];
      int64_t ext = win_len[ref] - r.d;
      for (int64_t k = r.lo + 1; k < r.hi && ext > 0; ++k) {
        const int64_t s = ids[k];
        ext = common_from(x, tokens + win_abs[s], r.d, std::min(ext, win_len[s] - r.d));
      }
      const int64_t d = r.d + ext;
      // Partition by the token at depth d (end of sample first), stable: equal keys keep id order.
      keyed.clear();
      for (int64_t k = r.lo; k < r.hi; ++k) {
        const int64_t s = ids[k];
        const int64_t key = d < win_len[s] ? static_cast<int64_t>(tokens[win_abs[s] + d])
                                           : std::numeric_limits<int64_t>::min();
        keyed.push_back({key, s});
      }
      std::stable_sort(keyed.begin(), keyed.end(),
                       [](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
                         return a.first < b.first;
                       });
      int64_t run = r.lo;
      for (int64_t k = r.lo; k < r.hi; ++k) {
        ids[k] = keyed[k - r.lo].second;
        if (k > r.lo) lcp[k] = d;  // inside a run the recursion refines it; across runs it is d
        const bool run_ends = k + 1 == r.hi || keyed[k + 1 - r.lo].first != keyed[k - r.lo].first;
        if (run_ends) {
          if (keyed[k - r.lo].first != std::numeric_limits<int64_t>::min() && k + 1 - run > 1)
            stack.push_back({run, k + 1, d + 1});
          run = k + 1;
        }
      }
    }
  }
};

// Index of the first target inside the window (the window has at least one target).
int64_t first_target(const uint8_t* mask, int64_t a, int64_t n) {
  for (int64_t i = 1; i < n; ++i)
    if (mask[a + i]) return i;
  return n;
}

}  // namespace

TrieChunks trie_chunks(const int32_t* tokens, const uint8_t* mask, const int64_t* win_abs, const int64_t* win_len,
                       const int64_t* tree_ids, const int64_t* eligible, int64_t m, int64_t budget, int threads) {
  // Trees in the order of their first eligible member; members in id order; a negative id stands alone.
  std::vector<int64_t> in_tree;
  for (int64_t k = 0; k < m; ++k)
    if (tree_ids[eligible[k]] >= 0) in_tree.push_back(eligible[k]);
  std::stable_sort(in_tree.begin(), in_tree.end(),
                   [&](int64_t a, int64_t b) { return tree_ids[a] < tree_ids[b]; });
  std::vector<int64_t> grouped;
  grouped.reserve(static_cast<size_t>(m));
  std::vector<int64_t> group_off{0};
  {
    size_t t = 0;
    std::vector<std::pair<int64_t, int64_t>> tree_range;  // per distinct tree: [start, end) in in_tree
    while (t < in_tree.size()) {
      size_t e = t + 1;
      while (e < in_tree.size() && tree_ids[in_tree[e]] == tree_ids[in_tree[t]]) ++e;
      tree_range.push_back({static_cast<int64_t>(t), static_cast<int64_t>(e)});
      t = e;
    }
    std::vector<char> done(tree_range.size(), 0);
    for (int64_t k = 0; k < m; ++k) {
      const int64_t s = eligible[k];
      if (tree_ids[s] < 0) {
        grouped.push_back(s);
        group_off.push_back(static_cast<int64_t>(grouped.size()));
        continue;
      }
      // the tree of s: binary search on the sorted in_tree by tree id
      auto it = std::lower_bound(tree_range.begin(), tree_range.end(), tree_ids[s],
                                 [&](const std::pair<int64_t, int64_t>& r, int64_t id) {
                                   return tree_ids[in_tree[r.first]] < id;
                                 });
      const size_t g = static_cast<size_t>(it - tree_range.begin());
      if (done[g]) continue;
      done[g] = 1;
      for (int64_t q = it->first; q < it->second; ++q) grouped.push_back(in_tree[q]);
      group_off.push_back(static_cast<int64_t>(grouped.size()));
    }
  }
  const int64_t G = static_cast<int64_t>(group_off.size()) - 1;
  std::vector<int64_t> lcp(grouped.size(), 0);
  // Sort each tree; trees are independent, so threads take contiguous ranges of about equal members.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, G)));
  const std::vector<int64_t> cut = balanced_cuts(group_off.data(), G, threads);
  run_parallel(threads, [&](int t) {
    Sorter sorter{tokens, win_abs, win_len, {}};
    for (int64_t g = cut[t]; g < cut[t + 1]; ++g)
      sorter.sort(grouped.data() + group_off[g], lcp.data() + group_off[g], group_off[g + 1] - group_off[g]);
  });
  // Chunks, split and mixed trees: one sequential pass.
  TrieChunks out;
  out.members = std::move(grouped);
  out.lcp = std::move(lcp);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t a = group_off[g], b = group_off[g + 1];
    int64_t size = 0, common = std::numeric_limits<int64_t>::max(), first = std::numeric_limits<int64_t>::max();
    bool split = false;
    for (int64_t k = a; k < b; ++k) {
      const int64_t s = out.members[k];
      if (k > a) common = std::min(common, out.lcp[k]);
      if (b - a > 1) first = std::min(first, first_target(mask, win_abs[s], win_len[s]));
      const int64_t add = win_len[s] - (k > a ? out.lcp[k] : 0);
      if (k > a && size + add > budget) {
        out.chunk_offsets.push_back(k);
        out.chunk_tokens.push_back(size);
        out.lcp[k] = 0;
        size = win_len[s];
        split = true;
      } else {
        size += add;
      }
    }
    out.chunk_offsets.push_back(b);
    out.chunk_tokens.push_back(size);
    const int64_t tree = tree_ids[out.members[a]];
    if (split) out.split_trees.push_back(tree);
    // Samples of one exploration tree share their prompt: every token before the earliest first target is
    // context in every sample. A tree whose samples share less than half of it (or not even a first
    // token) most likely mixes tasks under one tree id: reported, still packed exactly.
    if (b - a > 1 && (common == 0 || 2 * common < first)) out.mixed_trees.push_back(tree);
  }
  return out;
}

void trie_layout(const TrieInputs& in, int64_t* tok_off, int64_t* tgt_off, int64_t* smp_off, int32_t* max_seqlen) {
  tok_off[0] = tgt_off[0] = smp_off[0] = 0;
  for (int64_t b = 0; b < in.num_mb; ++b) {
    int64_t tok = 0, tgt = 0, smp = 0, longest = 0;
    for (int64_t k = in.mb_offsets[b]; k < in.mb_offsets[b + 1]; ++k) {
      const int64_t c = in.order[k];
      int64_t chunk = 0;  // recomputed from lengths and LCPs, not trusted from the caller
      for (int64_t q = in.chunk_offsets[c]; q < in.chunk_offsets[c + 1]; ++q) {
        const int64_t s = in.members[q];
        chunk += in.win_len[s] - (q == in.chunk_offsets[c] ? 0 : in.lcp[q]);
        const uint8_t* msk = in.mask + in.win_abs[s];
        for (int64_t i = 1; i < in.win_len[s]; ++i) tgt += msk[i] != 0;
      }
      tok += chunk;
      longest = std::max(longest, chunk);
      smp += in.chunk_offsets[c + 1] - in.chunk_offsets[c];
    }
    tok_off[b + 1] = tok_off[b] + tok;
    tgt_off[b + 1] = tgt_off[b] + tgt;
    smp_off[b + 1] = smp_off[b] + smp;
    max_seqlen[b] = static_cast<int32_t>(longest);
  }
}

namespace {

struct TrieScratch {
  std::vector<int32_t> path;     // node (micro-batch local index) at each depth of the current path
  std::vector<int32_t> node_at;  // per member of the chunk: its nodes, member after member
  std::vector<int64_t> node_off;
  std::vector<int64_t> by_id;    // member positions in id order
};

void trie_range(const TrieInputs& in, const int64_t* tok_off, const int64_t* tgt_off, const int64_t* smp_off,
                const TrieOutputs& out, int64_t b0, int64_t b1) {
  if (b0 >= b1) return;
  populate_output(out.input_ids + tok_off[b0], static_cast<size_t>(tok_off[b1] - tok_off[b0]) * 4);
  populate_output(out.position_ids + tok_off[b0], static_cast<size_t>(tok_off[b1] - tok_off[b0]) * 4);
  populate_output(out.subtree_end + tok_off[b0], static_cast<size_t>(tok_off[b1] - tok_off[b0]) * 4);
  TrieScratch sc;
  for (int64_t b = b0; b < b1; ++b) {
    int32_t* ids = out.input_ids + tok_off[b];
    int32_t* pos = out.position_ids + tok_off[b];
    int32_t* end = out.subtree_end + tok_off[b];
    int32_t* cu = out.cu_seqlens + in.mb_offsets[b] + b;
    int64_t* smp = out.sample_ids + smp_off[b];
    int64_t m = tgt_off[b];
    int32_t at = 0;  // next node index in the micro-batch
    *cu++ = 0;
    for (int64_t k = in.mb_offsets[b]; k < in.mb_offsets[b + 1]; ++k) {
      const int64_t c = in.order[k];
      const int64_t q0 = in.chunk_offsets[c], q1 = in.chunk_offsets[c + 1];
      sc.node_off.assign(1, 0);
      for (int64_t q = q0; q < q1; ++q) sc.node_off.push_back(sc.node_off.back() + in.win_len[in.members[q]]);
      sc.node_at.resize(static_cast<size_t>(sc.node_off.back()));
      int64_t depth = 0;  // length of the current path
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t s = in.members[q];
        const int64_t len = in.win_len[s], l = q == q0 ? 0 : in.lcp[q];
        const int32_t* src = in.tokens + in.win_abs[s];
        for (int64_t d = l; d < depth; ++d) end[sc.path[d]] = at;  // the old branch ends here
        if (static_cast<int64_t>(sc.path.size()) < len) sc.path.resize(static_cast<size_t>(len));
        for (int64_t d = l; d < len; ++d) {
          ids[at] = src[d];
          pos[at] = static_cast<int32_t>(d);
          sc.path[d] = at++;
        }
        depth = len;
        std::copy(sc.path.begin(), sc.path.begin() + len, sc.node_at.begin() + sc.node_off[q - q0]);
      }
      for (int64_t d = 0; d < depth; ++d) end[sc.path[d]] = at;
      *cu++ = at;
      // Loss rows: members in id order, targets in position order, each on the node of its predictor.
      sc.by_id.resize(static_cast<size_t>(q1 - q0));
      std::iota(sc.by_id.begin(), sc.by_id.end(), int64_t{0});
      std::sort(sc.by_id.begin(), sc.by_id.end(),
                [&](int64_t x, int64_t y) { return in.members[q0 + x] < in.members[q0 + y]; });
      for (int64_t x : sc.by_id) {
        const int64_t s = in.members[q0 + x];
        *smp++ = s;
        const int64_t len = in.win_len[s];
        const uint8_t* msk = in.mask + in.win_abs[s];
        const int32_t* src = in.tokens + in.win_abs[s];
        const int32_t* nodes = sc.node_at.data() + sc.node_off[x];
        const float w = in.weight[s];
        const int8_t g = in.group[s];
        for_each_target(msk, len, [&](int64_t i) {
          out.rows[m] = nodes[i - 1];
          out.targets[m] = src[i];
          out.weights[m] = w;
          out.group[m] = g;
          ++m;
          return true;
        });
      }
    }
  }
}

}  // namespace

void trie_build(const TrieInputs& in, const int64_t* tok_off, const int64_t* tgt_off, const int64_t* smp_off,
                const TrieOutputs& out, int threads) {
  const int64_t B = in.num_mb;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, B)));
  const std::vector<int64_t> cut = balanced_cuts(tok_off, B, threads);
  run_parallel(threads, [&](int t) { trie_range(in, tok_off, tgt_off, smp_off, out, cut[t], cut[t + 1]); });
}

}  // namespace leafe
