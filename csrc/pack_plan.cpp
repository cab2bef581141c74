// Planning: which samples go into which micro-batch, on which rank, in which order.
//
// Units of placement are "items": one sample, or (keep_trees_together) all samples of one tree.
// best-fit-decreasing: items by length, descending; each goes to the open bin with the least free
//   space that still holds it (ties: the bin that reached that free space first); else a new bin.
// balanced: R ranks x K micro-batches. Items by cost (tokens + alpha*len^2), descending; each goes to
//   the cheapest bin (ties: lowest bin id) with room for it (LPT with a capacity check). K starts at
//   the token lower bound and grows by one (R new bins) whenever an item fits nowhere. Bins are then
//   sorted by cost and dealt in slots of R similar bins; within a slot the dearest bin goes to the
//   rank with the lowest running total, so both each synchronous step and each rank's total balance.
// Both run in O(n log B): a counting sort on length, a bitset of free-space values (best fit) and an
// 8-ary tournament tree over bins (cheapest fit). Each places a sequential queue of items (Queued), so
// the hot loops make no random access into the per-sample arrays.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "packer.h"

namespace leafe {

uint64_t splitmix64_next(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(splitmix64_next(state) % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

namespace {

double sample_cost(int64_t len, double alpha) {
  return static_cast<double>(len) + alpha * static_cast<double>(len * len);
}

struct Items {
  std::vector<int64_t> members;  // positions j into the input arrays, item after item
  std::vector<int64_t> offsets{0};
  std::vector<int64_t> length;
  std::vector<double> cost;

  void add(const int64_t* js, size_t count, const int64_t* lengths, double alpha) {
    int64_t len = 0;
    double cost_sum = 0.0;
    for (size_t k = 0; k < count; ++k) {
      members.push_back(js[k]);
      len += lengths[js[k]];
      cost_sum += sample_cost(lengths[js[k]], alpha);
    }
    offsets.push_back(static_cast<int64_t>(members.size()));
    length.push_back(len);
    cost.push_back(cost_sum);
  }
  int64_t size() const { return static_cast<int64_t>(length.size()); }
};

// A tree longer than the budget: best fit (least room left, ties lowest chunk) of its samples taken
// longest first; each chunk lists its samples in input order.
void split_tree(const std::vector<int64_t>& group, const int64_t* lengths, int64_t budget, double alpha,
                Items& items) {
  std::vector<int64_t> by_len(group);
  std::stable_sort(by_len.begin(), by_len.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  std::vector<int64_t> room;
  std::vector<std::vector<int64_t>> chunks;
  for (int64_t j : by_len) {
    int64_t best = -1;
    for (size_t c = 0; c < room.size(); ++c)
      if (room[c] >= lengths[j] && (best < 0 || room[c] < room[best])) best = static_cast<int64_t>(c);
    if (best < 0) {
      best = static_cast<int64_t>(room.size());
      room.push_back(budget);
      chunks.emplace_back();
    }
    room[best] -= lengths[j];
    chunks[best].push_back(j);
  }
  for (auto& c : chunks) {
    std::sort(c.begin(), c.end());
    items.add(c.data(), c.size(), lengths, alpha);
  }
}

Items make_items(const int64_t* lengths, const int64_t* tree_ids, int64_t m, const PlanOptions& opt,
                 std::vector<int64_t>& split_trees) {
  Items items;
  items.members.reserve(static_cast<size_t>(m));
  items.length.reserve(static_cast<size_t>(m));
  items.cost.reserve(static_cast<size_t>(m));
  items.offsets.reserve(static_cast<size_t>(m) + 1);
  if (!opt.keep_trees_together) {
    for (int64_t j = 0; j < m; ++j) items.add(&j, 1, lengths, opt.alpha);
    return items;
  }
  // Group tree members (input order kept inside a tree); an item is emitted at its first member.
  std::vector<int64_t> in_tree;
  for (int64_t j = 0; j < m; ++j)
    if (tree_ids[j] >= 0) in_tree.push_back(j);
  std::stable_sort(in_tree.begin(), in_tree.end(),
                   [&](int64_t a, int64_t b) { return tree_ids[a] < tree_ids[b]; });
  std::vector<int64_t> group_of(static_cast<size_t>(m), -1);  // set on a tree's first member only
  std::vector<int64_t> group_start{0};
  for (size_t k = 0; k < in_tree.size(); ++k) {
    if (k > 0 && tree_ids[in_tree[k]] != tree_ids[in_tree[k - 1]]) group_start.push_back(static_cast<int64_t>(k));
    if (k == static_cast<size_t>(group_start.back())) group_of[in_tree[k]] = static_cast<int64_t>(group_start.size() - 1);
  }
  group_start.push_back(static_cast<int64_t>(in_tree.size()));
  std::vector<int64_t> group;
  for (int64_t j = 0; j < m; ++j) {
    if (tree_ids[j] < 0) {
      items.add(&j, 1, lengths, opt.alpha);
      continue;
    }
    const int64_t g = group_of[j];
    if (g < 0) continue;  // not the tree's first member: already emitted
    group.assign(in_tree.begin() + group_start[g], in_tree.begin() + group_start[g + 1]);
    int64_t total = 0;
    for (int64_t k : group) total += lengths[k];
    if (total <= opt.budget) {
      items.add(group.data(), group.size(), lengths, opt.alpha);
    } else {
      split_tree(group, lengths, opt.budget, opt.alpha, items);
      split_trees.push_back(tree_ids[j]);
    }
  }
  return items;
}

// One entry of the placement queue. Best fit and cheapest fit both place the queue front to back, so
// everything they read per item sits in one sequential array: no cache miss per item on the 1M-entry
// item arrays (those random reads were most of the planning time).
struct Queued {
  int64_t item;
  int64_t length;
  double cost;
  int64_t id;  // the sample id when the item is one sample (emission reads it without a gather)
};

// Bins and the bin of each queue entry, in placement order (= queue order).
struct Bins {
  std::vector<int64_t> tokens;
  std::vector<double> cost;
  std::vector<int64_t> bin_of;  // bin_of[k]: bin of the k-th queue entry

  explicit Bins(int64_t num_items) { bin_of.reserve(static_cast<size_t>(num_items)); }
  int64_t open() {
    tokens.push_back(0);
    cost.push_back(0.0);
    return static_cast<int64_t>(tokens.size()) - 1;
  }
  // Costs are summed per bin in placement order (the order the Python reference adds them in).
  void put(int64_t b, const Queued& q) {
    bin_of.push_back(b);
    tokens[b] += q.length;
    cost[b] += q.cost;
  }
  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
};

// Free-space index for best fit: a two-level bitset over space values 1..budget-1 finds the smallest
// free space >= len; each space keeps a FIFO of the bins that have exactly that space.
class SpaceIndex {
 public:
  explicit SpaceIndex(int64_t budget)
      : words_((budget >> 6) + 1, 0), summary_((words_.size() >> 6) + 1, 0),
        head_(static_cast<size_t>(budget) + 1, -1), tail_(static_cast<size_t>(budget) + 1, -1) {}

  // Smallest space >= len with a waiting bin, or -1.
  int64_t find(int64_t len) const {
    size_t w = static_cast<size_t>(len >> 6);
    if (w >= words_.size()) return -1;
    uint64_t bits = words_[w] & (~0ull << (len & 63));
    if (bits) return static_cast<int64_t>((w << 6) + __builtin_ctzll(bits));
    size_t s = (w + 1) >> 6;
    if (s >= summary_.size()) return -1;
    uint64_t sb = ((w + 1) & 63) ? summary_[s] & (~0ull << ((w + 1) & 63)) : summary_[s];
    while (true) {
      if (sb) {
        const size_t ww = (s << 6) + __builtin_ctzll(sb);
        return static_cast<int64_t>((ww << 6) + __builtin_ctzll(words_[ww]));
      }
      if (++s >= summary_.size()) return -1;
      sb = summary_[s];
    }
  }
  void push(int64_t space, int64_t bin, std::vector<int64_t>& next) {
    next[bin] = -1;
    if (tail_[space] < 0) {
      head_[space] = bin;
      set(space);
    } else {
      next[tail_[space]] = bin;
    }
    tail_[space] = bin;
  }
  int64_t pop(int64_t space, const std::vector<int64_t>& next) {
    const int64_t bin = head_[space];
    head_[space] = next[bin];
    if (head_[space] < 0) {
      tail_[space] = -1;
      clear(space);
    }
    return bin;
  }

 private:
  void set(int64_t s) {
    const size_t w = static_cast<size_t>(s >> 6);
    words_[w] |= 1ull << (s & 63);
    summary_[w >> 6] |= 1ull << (w & 63);
  }
  void clear(int64_t s) {
    const size_t w = static_cast<size_t>(s >> 6);
    words_[w] &= ~(1ull << (s & 63));
    if (!words_[w]) summary_[w >> 6] &= ~(1ull << (w & 63));
  }
  std::vector<uint64_t> words_, summary_;
  std::vector<int64_t> head_, tail_;
};

// Items longest first, ties by item id: a stable counting sort on length (lengths are <= budget).
std::vector<Queued> longest_first(const Items& items, const int64_t* ids, int64_t budget) {
  const int64_t n = items.size();
  std::vector<int64_t> start(static_cast<size_t>(budget) + 2, 0);
  for (int64_t i = 0; i < n; ++i) ++start[budget - items.length[i] + 1];
  for (size_t v = 1; v < start.size(); ++v) start[v] += start[v - 1];
  std::vector<Queued> queue(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = items.length[i];
    queue[start[budget - len]++] = {i, len, items.cost[i], ids[items.members[items.offsets[i]]]};
  }
  return queue;
}

Bins best_fit_decreasing(const std::vector<Queued>& queue, int64_t budget) {
  Bins bins(static_cast<int64_t>(queue.size()));
  SpaceIndex index(budget);
  std::vector<int64_t> wait_next;
  for (const Queued& q : queue) {
    const int64_t space = index.find(q.length);
    int64_t b;
    if (space >= 0) {
      b = index.pop(space, wait_next);
    } else {
      b = bins.open();
      wait_next.push_back(-1);
    }
    bins.put(b, q);
    const int64_t left = budget - bins.tokens[b];
    if (left > 0) index.push(left, b, wait_next);
  }
  return bins;
}

// Min (cost, bin) over the bins that may take the current item, as an 8-ary tournament tree over bin
// ids: a bin leaves the tournament (cost +inf) while it is too full and rejoins when items get shorter.
// 8-ary, not binary: an update replays 6 levels instead of 17 for 100k bins, and the 8 siblings of a
// level sit in two cache lines and are compared as a branch-free tree (measured 1.6x faster).
class CheapestBins {
 public:
  explicit CheapestBins(int64_t capacity) { rebuild(std::max<int64_t>(capacity, 1)); }

  int64_t best_bin() const { return static_cast<int64_t>(static_cast<uint64_t>(level_.back()[0])); }
  bool none_left() const { return static_cast<uint64_t>(level_.back()[0] >> 64) == kOutBits; }
  void set(int64_t bin, double cost) {
    if (bin >= static_cast<int64_t>(level_[0].size()))
      rebuild(std::max<int64_t>(bin + 1, 2 * static_cast<int64_t>(level_[0].size())));
    level_[0][static_cast<size_t>(bin)] = key(cost, bin);
    size_t idx = static_cast<size_t>(bin);
    for (size_t l = 0; l + 1 < level_.size(); ++l) {
      idx >>= 3;
      level_[l + 1][idx] = min8(&level_[l][idx << 3]);
    }
  }
  void remove(int64_t bin) { set(bin, std::numeric_limits<double>::infinity()); }

 private:
  // (cost, bin) as one 128-bit integer: the bits of a double >= 0 (or +inf) order like the double, so
  // one integer compare orders by cost, ties by the lower bin id, with no branch.
  using Key = unsigned __int128;
  static constexpr uint64_t kOutBits = 0x7FF0000000000000ull;  // +inf
  static Key key(double cost, int64_t bin) {
    uint64_t bits;
    std::memcpy(&bits, &cost, sizeof(bits));
    return (static_cast<Key>(bits) << 64) | static_cast<uint64_t>(bin);
  }
  static Key lesser(Key a, Key b) { return b < a ? b : a; }
  static Key min8(const Key* k) {
    return lesser(lesser(lesser(k[0], k[1]), lesser(k[2], k[3])), lesser(lesser(k[4], k[5]), lesser(k[6], k[7])));
  }
  // Levels sized in multiples of 8 (the top holds one key); leaves kept, the rest recomputed.
  void rebuild(int64_t capacity) {
    const Key none = (static_cast<Key>(kOutBits) << 64) | static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    std::vector<Key> leaves = level_.empty() ? std::vector<Key>() : std::move(level_[0]);
    leaves.resize(static_cast<size_t>((capacity + 7) / 8 * 8), none);
    level_.clear();
    level_.push_back(std::move(leaves));
    while (level_.back().size() > 1) {
      const size_t groups = level_.back().size() / 8;
      std::vector<Key> up(groups == 1 ? 1 : (groups + 7) / 8 * 8, none);
      for (size_t g = 0; g < groups; ++g) up[g] = min8(&level_.back()[g * 8]);
      level_.push_back(std::move(up));
    }
  }
  std::vector<std::vector<Key>> level_;
};

// LPT with a capacity check: each item (by cost, descending) goes to the cheapest bin (ties: lowest
// id) with room for it. When no bin has room: with grow, R new empty bins open (one more micro-batch
// per rank) and take it; without, returns false. Bins too full for the current item wait in a heap
// keyed by room and rejoin once the items get short enough, so each step is O(log B) amortised.
bool cheapest_fit(const std::vector<Queued>& by_cost, int64_t budget, int64_t ranks,
                  int64_t& per_rank, bool grow, Bins& bins) {
  using Parked = std::pair<int64_t, int64_t>;  // (room, bin): max-heap
  CheapestBins tree(ranks * per_rank);
  std::vector<Parked> parked;
  auto open_bins = [&](int64_t count) {
    for (int64_t c = 0; c < count; ++c) tree.set(bins.open(), 0.0);
  };
  open_bins(ranks * per_rank);
  for (const Queued& q : by_cost) {
    const int64_t len = q.length;
    while (!parked.empty() && parked.front().first >= len) {
      std::pop_heap(parked.begin(), parked.end());
      const int64_t b = parked.back().second;
      parked.pop_back();
      tree.set(b, bins.cost[b]);
    }
    int64_t chosen = -1;
    while (chosen < 0) {
      if (tree.none_left()) {
        if (!grow) return false;
        open_bins(ranks);
        ++per_rank;
      }
      const int64_t b = tree.best_bin();
      const int64_t room = budget - bins.tokens[b];
      if (room >= len) {
        chosen = b;
      } else {
        tree.remove(b);
        if (room > 0) {
          parked.push_back({room, b});
          std::push_heap(parked.begin(), parked.end());
        }
      }
    }
    bins.put(chosen, q);
    tree.set(chosen, bins.cost[chosen]);
  }
  return true;
}

// Writes the plan: bins in emission order (bin_seq[k] gets rank ranks_seq[k]); inside a bin, items in
// placement order, members in input order.
void emit(const Items& items, const std::vector<Queued>& queue, const Bins& bins, const std::vector<int64_t>& bin_seq,
          const std::vector<int32_t>& rank_seq, const int64_t* ids, Plan& plan) {
  const int64_t B = bins.size();
  const bool singles = items.members.size() == static_cast<size_t>(items.size());
  std::vector<int64_t> cursor(static_cast<size_t>(B), 0);  // first a member count per bin
  const size_t n = queue.size();
  if (singles) {
    for (size_t k = 0; k < n; ++k) ++cursor[bins.bin_of[k]];
  } else {
    for (size_t k = 0; k < n; ++k) {
      const int64_t i = queue[k].item;
      cursor[bins.bin_of[k]] += items.offsets[i + 1] - items.offsets[i];
    }
  }
  int64_t at = 0;
  plan.mb_offsets.reserve(bin_seq.size() + 1);
  plan.mb_rank.reserve(bin_seq.size());
  plan.mb_cost.reserve(bin_seq.size());
  for (size_t k = 0; k < bin_seq.size(); ++k) {
    const int64_t b = bin_seq[k];
    const int64_t count = cursor[b];
    cursor[b] = at;
    at += count;
    plan.mb_offsets.push_back(at);
    plan.mb_rank.push_back(rank_seq[k]);
    plan.mb_cost.push_back(bins.cost[b]);
  }
  plan.order.resize(static_cast<size_t>(at));
  int64_t* order = plan.order.data();
  if (singles) {
    for (size_t k = 0; k < n; ++k) order[cursor[bins.bin_of[k]]++] = queue[k].id;
  } else {
    for (size_t k = 0; k < n; ++k) {
      const int64_t i = queue[k].item;
      int64_t& c = cursor[bins.bin_of[k]];
      for (int64_t r = items.offsets[i]; r < items.offsets[i + 1]; ++r) order[c++] = ids[items.members[r]];
    }
  }
}

}  // namespace

Plan make_plan(const int64_t* ids, const int64_t* lengths, const int64_t* tree_ids, int64_t m,
               const PlanOptions& opt) {
  if (opt.budget < 1 || opt.budget > (int64_t{1} << 22))
    throw std::invalid_argument("budget must be in [1, 2^22] tokens, got " + std::to_string(opt.budget));
  if (opt.ranks < 1) throw std::invalid_argument("ranks must be >= 1");
  if (!(opt.alpha >= 0.0) || !std::isfinite(opt.alpha)) throw std::invalid_argument("alpha must be finite and >= 0");
  if (m >= (int64_t{1} << 40)) throw std::invalid_argument("too many samples");
  for (int64_t j = 0; j < m; ++j)
    if (lengths[j] < 1 || lengths[j] > opt.budget)
      throw std::invalid_argument("sample " + std::to_string(ids[j]) + " has length " + std::to_string(lengths[j]) +
                                  " outside [1, budget]");
  Plan plan;
  plan.mb_offsets.push_back(0);
  const Items items = make_items(lengths, tree_ids, m, opt, plan.split_trees);
  const int64_t R = opt.ranks;

  if (opt.strategy == Strategy::kBestFitDecreasing) {
    const std::vector<Queued> queue = longest_first(items, ids, opt.budget);
    const Bins bins = best_fit_decreasing(queue, opt.budget);
    const int64_t B = bins.size();
    std::vector<int64_t> seq = opt.shuffle ? permutation(B, opt.seed) : std::vector<int64_t>();
    if (!opt.shuffle) {
      seq.resize(static_cast<size_t>(B));
      std::iota(seq.begin(), seq.end(), int64_t{0});
    }
    std::vector<int32_t> rank_seq(static_cast<size_t>(B));
    for (int64_t k = 0; k < B; ++k) rank_seq[k] = static_cast<int32_t>(k % R);
    emit(items, queue, bins, seq, rank_seq, ids, plan);
    plan.micro_batches_per_rank = (B + R - 1) / R;
    return plan;
  }

  // balanced
  const int64_t n = items.size();
  std::vector<Queued> by_cost;
  if (!opt.keep_trees_together) {
    // One sample per item: cost rises strictly with length, so (cost desc, len desc, id asc) is the
    // longest-first order best_fit_decreasing already computes with a counting sort.
    by_cost = longest_first(items, ids, opt.budget);
  } else {
    struct Key {
      double cost;
      int64_t len, i;
    };
    std::vector<Key> keys(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) keys[i] = {items.cost[i], items.length[i], i};
    std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
      if (a.cost != b.cost) return a.cost > b.cost;
      if (a.len != b.len) return a.len > b.len;
      return a.i < b.i;
    });
    by_cost.resize(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = keys[k].i;
      by_cost[k] = {i, items.length[i], items.cost[i], ids[items.members[items.offsets[i]]]};
    }
  }

  // Start from the token lower bound; cheapest_fit adds micro-batches while some item fits nowhere.
  int64_t K = opt.micro_batches_per_rank;
  const bool fixed = K > 0;
  if (!fixed) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += items.length[i];
    K = std::max<int64_t>(1, ((total + opt.budget - 1) / opt.budget + R - 1) / R);
  }
  Bins bins(n);
  if (!cheapest_fit(by_cost, opt.budget, R, K, !fixed, bins))
    throw std::runtime_error("the samples do not fit in " + std::to_string(R) + " ranks x " + std::to_string(K) +
                             " micro-batches of " + std::to_string(opt.budget) +
                             " tokens; raise micro_batches_per_rank or leave it None");
  plan.micro_batches_per_rank = K;

  const int64_t B = R * K;
  std::vector<int64_t> bin_order(static_cast<size_t>(B));
  std::iota(bin_order.begin(), bin_order.end(), int64_t{0});
  std::sort(bin_order.begin(), bin_order.end(), [&](int64_t a, int64_t b) {
    if (bins.cost[a] != bins.cost[b]) return bins.cost[a] > bins.cost[b];
    return a < b;
  });
  std::vector<double> total(static_cast<size_t>(R), 0.0);
  std::vector<int64_t> slots(static_cast<size_t>(B));  // slots[s*R + r] = bin
  std::vector<char> taken(static_cast<size_t>(R));
  for (int64_t s = 0; s < K; ++s) {
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t k = 0; k < R; ++k) {
      const int64_t b = bin_order[s * R + k];
      int64_t best = -1;
      for (int64_t r = 0; r < R; ++r)
        if (!taken[r] && (best < 0 || total[r] < total[best])) best = r;
      taken[best] = 1;
      total[best] += bins.cost[b];
      slots[s * R + best] = b;
    }
  }
  std::vector<int64_t> at = opt.shuffle ? permutation(K, opt.seed) : std::vector<int64_t>();
  std::vector<int64_t> seq;
  std::vector<int32_t> rank_seq;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = opt.shuffle ? at[k] : k;
    for (int64_t r = 0; r < R; ++r) {
      seq.push_back(slots[s * R + r]);
      rank_seq.push_back(static_cast<int32_t>(r));
    }
  }
  emit(items, by_cost, bins, seq, rank_seq, ids, plan);
  return plan;
}

}  // namespace leafe
