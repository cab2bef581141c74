// run_parallel: runs fn(t) for t in [0, threads) on worker threads and the calling thread, and joins every
// started thread on every path. A worker's exception (or a failure to start a thread) is rethrown after
// all threads are joined, so an error never leaves a joinable std::thread behind (std::terminate).
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace leafe {

// Test hook: when >= 0, starting thread number fail_spawn_at throws as if the OS refused a thread.
inline int& parallel_fail_spawn_at() {
  static int at = -1;
  return at;
}

// Cuts [0, count) into `threads` contiguous ranges of about equal weight; offsets[count + 1] are the
// exclusive prefix sums of the weights. Range t is [cut[t], cut[t + 1]).
inline std::vector<int64_t> balanced_cuts(const int64_t* offsets, int64_t count, int threads) {
  const int64_t total = offsets[count];
  std::vector<int64_t> cut{0};
  for (int t = 1; t < threads; ++t) {
    const int64_t goal = total / threads * t;
    const int64_t b = std::upper_bound(offsets, offsets + count + 1, goal) - offsets - 1;
    cut.push_back(std::max(cut.back(), std::min(b, count)));
  }
  cut.push_back(count);
  return cut;
}

template <typename Fn>
void run_parallel(int threads, Fn&& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  try {
    for (int t = 1; t < threads; ++t) {
      if (parallel_fail_spawn_at() == t) throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
      pool.emplace_back(guarded, t);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!error) error = std::current_exception();
  }
  if (!error) guarded(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace leafe
