// Python bindings of the packer: numpy in and out without copies, GIL released while computing.
// The algorithms live in pack_plan.cpp (planning) and pack_build.cpp (output assembly).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "packer.h"
#include "parallel.h"

namespace py = pybind11;

namespace leafe {

namespace {

template <typename T>
using In = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Hands a vector's buffer to numpy; the capsule frees it with the array.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), owner);
}

// A numpy array over mapped output memory (map_output); the capsule hands it back with the array.
template <typename T>
py::array_t<T> mapped_array(int64_t count) {
  struct Mapping {
    void* p;
    size_t bytes;
  };
  size_t capacity = 0;
  void* p = map_output(static_cast<size_t>(count) * sizeof(T), &capacity);
  auto* owned = new Mapping{p, capacity};
  py::capsule owner(owned, [](void* m) {
    auto* mapping = static_cast<Mapping*>(m);
    unmap_output(mapping->p, mapping->bytes);
    delete mapping;
  });
  return py::array_t<T>({static_cast<py::ssize_t>(count)}, {static_cast<py::ssize_t>(sizeof(T))},
                        static_cast<T*>(owned->p), owner);
}

template <typename T>
const T* ptr(const In<T>& a, py::ssize_t expected, const char* name) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be 1-D");
  if (expected >= 0 && a.shape(0) != expected)
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.shape(0)) + " entries, expected " +
                                std::to_string(expected));
  return a.data();
}

// Exclusive prefix sum of sample lengths: the offsets of samples in a concatenated buffer.
py::array_t<int64_t> lengths_to_offsets(In<int64_t> lengths) {
  auto in = lengths.unchecked<1>();
  py::array_t<int64_t> out(in.shape(0) + 1);
  auto o = out.mutable_unchecked<1>();
  int64_t acc = 0;
  o(0) = 0;
  for (py::ssize_t i = 0; i < in.shape(0); ++i) {
    acc += in(i);
    o(i + 1) = acc;
  }
  return out;
}

py::dict plan_binding(In<int64_t> ids, In<int64_t> lengths, In<int64_t> tree_ids, int64_t budget,
                      const std::string& strategy, int64_t ranks, int64_t micro_batches_per_rank, double alpha,
                      uint64_t seed, bool shuffle, bool keep_trees_together) {
  const py::ssize_t m = ids.ndim() == 1 ? ids.shape(0) : -1;
  const int64_t* id_p = ptr(ids, -1, "ids");
  const int64_t* len_p = ptr(lengths, m, "lengths");
  const int64_t* tree_p = ptr(tree_ids, m, "tree_ids");
  PlanOptions opt;
  opt.budget = budget;
  if (strategy == "bfd") opt.strategy = Strategy::kBestFitDecreasing;
  else if (strategy == "balanced") opt.strategy = Strategy::kBalanced;
  else throw std::invalid_argument("strategy must be 'bfd' or 'balanced', got '" + strategy + "'");
  opt.ranks = ranks;
  opt.micro_batches_per_rank = micro_batches_per_rank;
  opt.alpha = alpha;
  opt.seed = seed;
  opt.shuffle = shuffle;
  opt.keep_trees_together = keep_trees_together;
  Plan plan;
  {
    py::gil_scoped_release nogil;
    plan = make_plan(id_p, len_p, tree_p, m, opt);
  }
  py::dict out;
  out["order"] = to_numpy(std::move(plan.order));
  out["mb_offsets"] = to_numpy(std::move(plan.mb_offsets));
  out["mb_rank"] = to_numpy(std::move(plan.mb_rank));
  out["mb_cost"] = to_numpy(std::move(plan.mb_cost));
  out["split_trees"] = to_numpy(std::move(plan.split_trees));
  out["micro_batches_per_rank"] = plan.micro_batches_per_rank;
  return out;
}

py::tuple count_targets_binding(In<uint8_t> mask, In<int64_t> offsets, In<int64_t> win_start, In<int64_t> win_len) {
  const int64_t* off = ptr(offsets, -1, "offsets");
  const py::ssize_t n = offsets.shape(0) - 1;
  if (n < 0) throw std::invalid_argument("offsets must have at least one entry");
  // offsets must start at 0 and end at len(target_mask): a negative or short offset would index outside it.
  const py::ssize_t T = mask.ndim() == 1 ? mask.shape(0) : -1;
  if (off[0] != 0 || off[n] != T)
    throw std::invalid_argument("offsets must start at 0 and end at len(target_mask) = " + std::to_string(T) +
                                ", got " + std::to_string(off[0]) + " .. " + std::to_string(off[n]));
  const uint8_t* msk = ptr(mask, T, "target_mask");
  const int64_t* ws = ptr(win_start, n, "win_start");
  const int64_t* wl = ptr(win_len, n, "win_len");
  for (py::ssize_t j = 0; j < n; ++j)
    if (off[j] > off[j + 1] || ws[j] < 0 || wl[j] < 0 || ws[j] > off[j + 1] - off[j] ||
        wl[j] > off[j + 1] - off[j] - ws[j])
      throw std::invalid_argument("sample " + std::to_string(j) + ": window or offsets out of range");
  py::array_t<int64_t> kept(n), removed(n);
  int64_t* k = kept.mutable_data();
  int64_t* r = removed.mutable_data();
  {
    py::gil_scoped_release nogil;
    count_targets(msk, off, ws, wl, n, k, r);
  }
  return py::make_tuple(kept, removed);
}

// The sample columns of a build call, checked once for both layouts.
static SampleArrays sample_arrays(const In<int32_t>& tokens, const In<uint8_t>& mask, const In<int8_t>& group,
                                  const In<float>& weight, const In<int64_t>& win_abs, const In<int64_t>& win_len) {
  const py::ssize_t T_in = tokens.ndim() == 1 ? tokens.shape(0) : -1;
  const py::ssize_t n = group.ndim() == 1 ? group.shape(0) : -1;
  SampleArrays s;
  s.tokens = ptr(tokens, -1, "tokens");
  s.mask = ptr(mask, T_in, "target_mask");
  s.group = ptr(group, -1, "group");
  s.weight = ptr(weight, n, "weight");
  s.win_abs = ptr(win_abs, n, "win_abs");
  s.win_len = ptr(win_len, n, "win_len");
  return s;
}

py::dict build_binding(In<int32_t> tokens, In<uint8_t> mask, In<int8_t> group, In<float> weight,
                       In<int64_t> win_abs, In<int64_t> win_len, In<int64_t> kept, In<int64_t> order,
                       In<int64_t> mb_offsets, int threads) {
  const py::ssize_t n = group.ndim() == 1 ? group.shape(0) : -1;
  BuildInputs in;
  static_cast<SampleArrays&>(in) = sample_arrays(tokens, mask, group, weight, win_abs, win_len);
  const py::ssize_t T_in = tokens.shape(0);  // 1-D: checked by sample_arrays
  in.kept = ptr(kept, n, "kept");
  in.order = ptr(order, -1, "order");
  in.mb_offsets = ptr(mb_offsets, -1, "mb_offsets");
  in.num_mb = mb_offsets.shape(0) - 1;
  const py::ssize_t m = order.shape(0);
  if (in.num_mb < 0 || in.mb_offsets[0] != 0 || in.mb_offsets[in.num_mb] != m)
    throw std::invalid_argument("mb_offsets must start at 0 and end at len(order)");
  for (int64_t b = 0; b < in.num_mb; ++b)
    if (in.mb_offsets[b] > in.mb_offsets[b + 1]) throw std::invalid_argument("mb_offsets must be non-decreasing");
  for (py::ssize_t k = 0; k < m; ++k) {
    const int64_t s = in.order[k];
    if (s < 0 || s >= n) throw std::invalid_argument("order holds sample id " + std::to_string(s) + " out of range");
    if (in.win_abs[s] < 0 || in.win_len[s] < 0 || in.win_abs[s] > T_in || in.win_len[s] > T_in - in.win_abs[s] ||
        in.kept[s] < 0 || in.kept[s] > in.win_len[s])
      throw std::invalid_argument("sample " + std::to_string(s) + ": window out of range of tokens");
  }
  py::array_t<int64_t> tok_off(in.num_mb + 1), tgt_off(in.num_mb + 1);
  py::array_t<int32_t> max_seqlen(in.num_mb);
  {
    py::gil_scoped_release nogil;
    layout_batches(in, tok_off.mutable_data(), tgt_off.mutable_data(), max_seqlen.mutable_data());
  }
  const int64_t T = tok_off.data()[in.num_mb], M = tgt_off.data()[in.num_mb];
  // The big outputs are mapped, not malloc'd: build_batches faults them in per thread (see populate).
  py::array_t<int32_t> input_ids = mapped_array<int32_t>(T), position_ids = mapped_array<int32_t>(T);
  py::array_t<int32_t> cu_seqlens(m + in.num_mb);
  py::array_t<int64_t> rows = mapped_array<int64_t>(M), targets = mapped_array<int64_t>(M);
  py::array_t<float> weights = mapped_array<float>(M);
  py::array_t<int8_t> groups = mapped_array<int8_t>(M);
  BuildOutputs out{input_ids.mutable_data(), position_ids.mutable_data(), cu_seqlens.mutable_data(),
                   rows.mutable_data(),      targets.mutable_data(),      weights.mutable_data(),
                   groups.mutable_data()};
  {
    py::gil_scoped_release nogil;
    build_batches(in, tok_off.data(), tgt_off.data(), out, threads);
  }
  py::dict d;
  d["input_ids"] = input_ids;
  d["position_ids"] = position_ids;
  d["cu_seqlens"] = cu_seqlens;
  d["rows"] = rows;
  d["targets"] = targets;
  d["weights"] = weights;
  d["group"] = groups;
  d["tok_off"] = tok_off;
  d["tgt_off"] = tgt_off;
  d["max_seqlen"] = max_seqlen;
  return d;
}

// Windows [win_abs, win_abs + win_len) of the samples in `ids` must lie inside tokens (and the mask).
void check_windows(const int64_t* ids, py::ssize_t count, py::ssize_t n, const int64_t* win_abs,
                   const int64_t* win_len, py::ssize_t T) {
  for (py::ssize_t k = 0; k < count; ++k) {
    const int64_t s = ids[k];
    if (s < 0 || s >= n) throw std::invalid_argument("sample id " + std::to_string(s) + " out of range");
    if (win_abs[s] < 0 || win_len[s] < 1 || win_abs[s] > T || win_len[s] > T - win_abs[s])
      throw std::invalid_argument("sample " + std::to_string(s) + ": window out of range of tokens");
  }
}

py::dict trie_chunks_binding(In<int32_t> tokens, In<uint8_t> mask, In<int64_t> win_abs, In<int64_t> win_len,
                             In<int64_t> tree_ids, In<int64_t> eligible, int64_t budget, int threads) {
  const py::ssize_t T = tokens.ndim() == 1 ? tokens.shape(0) : -1;
  const py::ssize_t n = win_abs.ndim() == 1 ? win_abs.shape(0) : -1;
  const int32_t* tok = ptr(tokens, -1, "tokens");
  const uint8_t* msk = ptr(mask, T, "target_mask");
  const int64_t* wa = ptr(win_abs, -1, "win_abs");
  const int64_t* wl = ptr(win_len, n, "win_len");
  const int64_t* tr = ptr(tree_ids, n, "tree_ids");
  const int64_t* el = ptr(eligible, -1, "eligible");
  const py::ssize_t m = eligible.shape(0);
  if (budget < 1 || budget > (int64_t{1} << 22)) throw std::invalid_argument("budget must be in [1, 2^22]");
  check_windows(el, m, n, wa, wl, T);
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (py::ssize_t k = 0; k < m; ++k) {
    if (wl[el[k]] > budget) throw std::invalid_argument("sample " + std::to_string(el[k]) + " is longer than budget");
    if (seen[el[k]]++) throw std::invalid_argument("eligible lists sample " + std::to_string(el[k]) + " twice");
  }
  TrieChunks c;
  {
    py::gil_scoped_release nogil;
    c = trie_chunks(tok, msk, wa, wl, tr, el, m, budget, std::max(1, threads));
  }
  py::dict out;
  out["members"] = to_numpy(std::move(c.members));
  out["lcp"] = to_numpy(std::move(c.lcp));
  out["chunk_offsets"] = to_numpy(std::move(c.chunk_offsets));
  out["chunk_tokens"] = to_numpy(std::move(c.chunk_tokens));
  out["split_trees"] = to_numpy(std::move(c.split_trees));
  out["mixed_trees"] = to_numpy(std::move(c.mixed_trees));
  return out;
}

py::dict trie_build_binding(In<int32_t> tokens, In<uint8_t> mask, In<int8_t> group, In<float> weight,
                            In<int64_t> win_abs, In<int64_t> win_len, In<int64_t> members, In<int64_t> lcp,
                            In<int64_t> chunk_offsets, In<int64_t> order, In<int64_t> mb_offsets, int threads) {
  const py::ssize_t n = group.ndim() == 1 ? group.shape(0) : -1;
  TrieInputs in;
  static_cast<SampleArrays&>(in) = sample_arrays(tokens, mask, group, weight, win_abs, win_len);
  const py::ssize_t T_in = tokens.shape(0);  // 1-D: checked by sample_arrays
  in.members = ptr(members, -1, "members");
  const py::ssize_t nm = members.shape(0);
  in.lcp = ptr(lcp, nm, "lcp");
  in.chunk_offsets = ptr(chunk_offsets, -1, "chunk_offsets");
  const py::ssize_t C = chunk_offsets.shape(0) - 1;
  in.order = ptr(order, -1, "order");
  in.mb_offsets = ptr(mb_offsets, -1, "mb_offsets");
  in.num_mb = mb_offsets.shape(0) - 1;
  check_windows(in.members, nm, n, in.win_abs, in.win_len, T_in);
  if (C < 0 || in.chunk_offsets[0] != 0 || in.chunk_offsets[C] != nm)
    throw std::invalid_argument("chunk_offsets must start at 0 and end at len(members)");
  for (py::ssize_t c = 0; c < C; ++c) {
    if (in.chunk_offsets[c] >= in.chunk_offsets[c + 1])
      throw std::invalid_argument("chunk_offsets must be increasing (no empty chunk)");
    for (int64_t q = in.chunk_offsets[c] + 1; q < in.chunk_offsets[c + 1]; ++q)
      if (in.lcp[q] < 0 || in.lcp[q] > std::min(in.win_len[in.members[q]], in.win_len[in.members[q - 1]]))
        throw std::invalid_argument("lcp[" + std::to_string(q) + "] exceeds its samples' lengths");
  }
  const py::ssize_t m = order.shape(0);
  if (in.num_mb < 0 || in.mb_offsets[0] != 0 || in.mb_offsets[in.num_mb] != m)
    throw std::invalid_argument("mb_offsets must start at 0 and end at len(order)");
  for (int64_t b = 0; b < in.num_mb; ++b)
    if (in.mb_offsets[b] > in.mb_offsets[b + 1]) throw std::invalid_argument("mb_offsets must be non-decreasing");
  for (py::ssize_t k = 0; k < m; ++k)
    if (in.order[k] < 0 || in.order[k] >= C)
      throw std::invalid_argument("order holds chunk id " + std::to_string(in.order[k]) + " out of range");
  py::array_t<int64_t> tok_off(in.num_mb + 1), tgt_off(in.num_mb + 1), smp_off(in.num_mb + 1);
  py::array_t<int32_t> max_seqlen(in.num_mb);
  {
    py::gil_scoped_release nogil;
    trie_layout(in, tok_off.mutable_data(), tgt_off.mutable_data(), smp_off.mutable_data(),
                max_seqlen.mutable_data());
  }
  for (int64_t b = 0; b < in.num_mb; ++b)
    if (tok_off.data()[b + 1] - tok_off.data()[b] > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("a micro-batch holds more than 2^31 tokens");
  const int64_t T = tok_off.data()[in.num_mb], M = tgt_off.data()[in.num_mb], S = smp_off.data()[in.num_mb];
  py::array_t<int32_t> input_ids = mapped_array<int32_t>(T), position_ids = mapped_array<int32_t>(T);
  py::array_t<int32_t> subtree_end = mapped_array<int32_t>(T);
  py::array_t<int32_t> cu_seqlens(m + in.num_mb);
  py::array_t<int64_t> rows = mapped_array<int64_t>(M), targets = mapped_array<int64_t>(M);
  py::array_t<float> weights = mapped_array<float>(M);
  py::array_t<int8_t> groups = mapped_array<int8_t>(M);
  py::array_t<int64_t> sample_ids(S);
  TrieOutputs out{input_ids.mutable_data(), position_ids.mutable_data(), subtree_end.mutable_data(),
                  cu_seqlens.mutable_data(), rows.mutable_data(), targets.mutable_data(),
                  weights.mutable_data(), groups.mutable_data(), sample_ids.mutable_data()};
  {
    py::gil_scoped_release nogil;
    trie_build(in, tok_off.data(), tgt_off.data(), smp_off.data(), out, std::max(1, threads));
  }
  py::dict d;
  d["input_ids"] = input_ids;
  d["position_ids"] = position_ids;
  d["subtree_end"] = subtree_end;
  d["cu_seqlens"] = cu_seqlens;
  d["rows"] = rows;
  d["targets"] = targets;
  d["weights"] = weights;
  d["group"] = groups;
  d["sample_ids"] = sample_ids;
  d["tok_off"] = tok_off;
  d["tgt_off"] = tgt_off;
  d["smp_off"] = smp_off;
  d["max_seqlen"] = max_seqlen;
  return d;
}

// Test hook for run_parallel: worker `fail_at` throws, or (spawn=true) starting thread `fail_at` fails.
// Returns how many workers ran; every started thread is joined before the error reaches Python.
int parallel_selftest(int threads, int fail_at, bool spawn) {
  std::atomic<int> ran{0};
  struct Reset {
    ~Reset() { parallel_fail_spawn_at() = -1; }
  } reset;
  if (spawn) parallel_fail_spawn_at() = fail_at;
  py::gil_scoped_release nogil;
  run_parallel(threads, [&](int t) {
    ran.fetch_add(1);
    if (!spawn && t == fail_at) throw std::runtime_error("worker " + std::to_string(t) + " failed");
  });
  return ran.load();
}

}  // namespace

void register_packer(py::module_& m) {
  m.def("lengths_to_offsets", &lengths_to_offsets, py::arg("lengths"),
        "Offsets [n+1] of n samples with the given lengths in one concatenated buffer.");
  m.def("pack_release_buffers", []() { return release_output_pool(); },
        "Unmap the released output buffers kept for reuse; returns the bytes given back to the OS.");
  m.def("pack_pooled_bytes", []() { return pooled_output_bytes(); },
        "Bytes of released output buffers kept for reuse by the next pack_build.");
  m.def("pack_plan", &plan_binding, py::arg("ids"), py::arg("lengths"), py::arg("tree_ids"), py::arg("budget"),
        py::arg("strategy"), py::arg("ranks"), py::arg("micro_batches_per_rank"), py::arg("alpha"), py::arg("seed"),
        py::arg("shuffle"), py::arg("keep_trees_together"),
        "Plan micro-batches: dict(order, mb_offsets, mb_rank, mb_cost, split_trees, micro_batches_per_rank). "
        "Lengths must lie in [1, budget]. Use leafe_fast.packing.pack, which validates inputs.");
  m.def("pack_count_targets", &count_targets_binding, py::arg("target_mask"), py::arg("offsets"),
        py::arg("win_start"), py::arg("win_len"),
        "(kept, removed) target counts per sample for kept windows [win_start, win_start + win_len).");
  m.def("pack_trie_chunks", &trie_chunks_binding, py::arg("tokens"), py::arg("target_mask"), py::arg("win_abs"),
        py::arg("win_len"), py::arg("tree_ids"), py::arg("eligible"), py::arg("budget"), py::arg("threads") = 1,
        "Trees of the eligible samples as trie chunks of at most budget tokens: dict(members, lcp, chunk_offsets, "
        "chunk_tokens, split_trees, mixed_trees). Inputs are validated; use leafe_fast.packing.pack.");
  m.def("pack_trie_build", &trie_build_binding, py::arg("tokens"), py::arg("target_mask"), py::arg("group"),
        py::arg("weight"), py::arg("win_abs"), py::arg("win_len"), py::arg("members"), py::arg("lcp"),
        py::arg("chunk_offsets"), py::arg("order"), py::arg("mb_offsets"), py::arg("threads") = 1,
        "Trie micro-batch arrays for a plan over chunks: input_ids, position_ids (depth), subtree_end, cu_seqlens "
        "(chunk bounds), rows, targets, weights, group, sample_ids, tok_off, tgt_off, smp_off, max_seqlen.");
  m.def("_parallel_selftest", &parallel_selftest, py::arg("threads"), py::arg("fail_at"), py::arg("spawn"),
        "Test hook: run_parallel with a failing worker (or thread start); the error arrives after every join.");
  m.def("pack_build", &build_binding, py::arg("tokens"), py::arg("target_mask"), py::arg("group"), py::arg("weight"),
        py::arg("win_abs"), py::arg("win_len"), py::arg("kept"), py::arg("order"), py::arg("mb_offsets"),
        py::arg("threads") = 1,
        "Flat micro-batch arrays for a plan: input_ids, position_ids, cu_seqlens, rows, targets, weights, group, "
        "tok_off, tgt_off, max_seqlen.");
}

}  // namespace leafe
