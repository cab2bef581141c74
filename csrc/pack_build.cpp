// Assembly: copies the planned samples into flat micro-batch arrays (tokens, restarting positions,
// cu_seqlens) and writes the loss rows. The next-token shift happens inside a sample: the target at
// window position i (i >= 1) is predicted by the hidden state at position i - 1 of the same sample.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "packer.h"
#include "parallel.h"

namespace leafe {

void count_targets(const uint8_t* mask, const int64_t* offsets, const int64_t* win_start, const int64_t* win_len,
                   int64_t n, int64_t* kept, int64_t* removed) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = offsets[j], b = offsets[j + 1];
    const int64_t ws = a + win_start[j], we = ws + win_len[j];
    int64_t in_window = 0;
    for (int64_t t = ws + 1; t < we; ++t) in_window += mask[t] != 0;
    int64_t outside = 0;
    if (ws != a || we != b) {  // truncated: count what was cut away (window position 0 included)
      for (int64_t t = a; t < b; ++t) outside += mask[t] != 0;
      outside -= in_window;
    }
    kept[j] = in_window;
    removed[j] = outside;
  }
}

void layout_batches(const BuildInputs& in, int64_t* mb_tok_off, int64_t* mb_tgt_off, int32_t* max_seqlen) {
  mb_tok_off[0] = 0;
  mb_tgt_off[0] = 0;
  for (int64_t b = 0; b < in.num_mb; ++b) {
    int64_t tok = 0, tgt = 0, longest = 0;
    for (int64_t k = in.mb_offsets[b]; k < in.mb_offsets[b + 1]; ++k) {
      const int64_t s = in.order[k];
      tok += in.win_len[s];
      tgt += in.kept[s];
      longest = std::max(longest, in.win_len[s]);
    }
    mb_tok_off[b + 1] = mb_tok_off[b] + tok;
    mb_tgt_off[b + 1] = mb_tgt_off[b] + tgt;
    max_seqlen[b] = static_cast<int32_t>(longest);
  }
}

namespace {

// The outputs are written once and read much later (by the trainer), so on x86 the two big int32
// streams bypass the cache: no read-for-ownership of fresh lines, about a third less memory traffic.
void copy_tokens(int32_t* dst, const int32_t* src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15); ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(int32_t));
#endif
}

void write_positions(int32_t* dst, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15); ++i) dst[i] = static_cast<int32_t>(i);
  __m128i v = _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(i)), _mm_setr_epi32(0, 1, 2, 3));
  const __m128i four = _mm_set1_epi32(4);
  for (; i + 4 <= n; i += 4) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
    v = _mm_add_epi32(v, four);
  }
  for (; i < n; ++i) dst[i] = static_cast<int32_t>(i);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int32_t>(i);
#endif
}

// One loss row. Plain stores: targets come in short runs, where streaming stores measured slower.
inline void put_target(const BuildOutputs& out, int64_t m, int64_t row, int32_t target, float w, int8_t g) {
  out.rows[m] = row;
  out.targets[m] = target;
  out.weights[m] = w;
  out.group[m] = g;
}

#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux >= 5.14
#endif
std::atomic<bool> populate_works{true};
#endif

// Faults in (and lets the kernel zero) the pages of [p, p + bytes) in one call, before they are written:
// one madvise per range instead of one fault per page, and with several threads each populates its own
// range in parallel. Pages at the range edges may be shared with a neighbour thread; populating a page
// that is already there does nothing. Older kernels (EINVAL): plain first touch, silently.
void populate(void* p, size_t bytes) {
#if defined(__linux__)
  if (bytes == 0 || !populate_works.load(std::memory_order_relaxed)) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(p) + bytes;
  if (madvise(reinterpret_cast<void*>(a), e - a, MADV_POPULATE_WRITE) != 0 && errno == EINVAL)
    populate_works.store(false, std::memory_order_relaxed);
#else
  (void)p;
  (void)bytes;
#endif
}

template <typename T>
void populate_slice(T* base, int64_t from, int64_t to) {
  populate(base + from, static_cast<size_t>(to - from) * sizeof(T));
}

void build_range(const BuildInputs& in, const int64_t* mb_tok_off, const int64_t* mb_tgt_off,
                 const BuildOutputs& out, int64_t b0, int64_t b1) {
  if (b0 >= b1) return;
  {
    const int64_t t0 = mb_tok_off[b0], t1 = mb_tok_off[b1], m0 = mb_tgt_off[b0], m1 = mb_tgt_off[b1];
    populate_slice(out.input_ids, t0, t1);
    populate_slice(out.position_ids, t0, t1);
    populate_slice(out.rows, m0, m1);
    populate_slice(out.targets, m0, m1);
    populate_slice(out.weights, m0, m1);
    populate_slice(out.group, m0, m1);
  }
  for (int64_t b = b0; b < b1; ++b) {
    int32_t* ids = out.input_ids + mb_tok_off[b];
    int32_t* pos = out.position_ids + mb_tok_off[b];
    int32_t* cu = out.cu_seqlens + in.mb_offsets[b] + b;
    const int64_t m0 = mb_tgt_off[b];
    int64_t local = 0, m = m0;
    *cu++ = 0;
    for (int64_t k = in.mb_offsets[b]; k < in.mb_offsets[b + 1]; ++k) {
      const int64_t s = in.order[k];
      const int64_t len = in.win_len[s];
      const int32_t* src = in.tokens + in.win_abs[s];
      const uint8_t* msk = in.mask + in.win_abs[s];
      copy_tokens(ids + local, src, len);
      write_positions(pos + local, len);
      const float w = in.weight[s];
      const int8_t g = in.group[s];
      const int64_t m_end = m + in.kept[s];
      if (m < m_end) {
        for_each_target(msk, len, [&](int64_t i) {
          put_target(out, m, local + i - 1, src[i], w, g);
          return ++m < m_end;
        });
      }
      local += len;
      *cu++ = static_cast<int32_t>(local);
    }
  }
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores visible before the thread is joined
#endif
}

}  // namespace

void populate_output(void* p, size_t bytes) { populate(p, bytes); }

void build_batches(const BuildInputs& in, const int64_t* mb_tok_off, const int64_t* mb_tgt_off,
                   const BuildOutputs& out, int threads) {
  const int64_t B = in.num_mb;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, B)));
  if (threads == 1) {
    build_range(in, mb_tok_off, mb_tgt_off, out, 0, B);
    return;
  }
  // Contiguous micro-batch ranges holding about the same number of tokens.
  const std::vector<int64_t> cut = balanced_cuts(mb_tok_off, B, threads);
  run_parallel(threads, [&](int t) { build_range(in, mb_tok_off, mb_tgt_off, out, cut[t], cut[t + 1]); });
}

}  // namespace leafe
