// Memory for the packer's outputs (GBs of int32/int64 arrays per packing).
//
// Fresh anonymous memory costs the kernel a page zeroing on first touch, and on a VM whose freed
// memory goes back to the host, a host-side fault too: measured here, that was half of the end-to-end
// time and made runs swing from 1 s to 2.7 s. So a released output is not unmapped at once: it is
// marked MADV_FREE (the kernel may still take its pages under memory pressure; then they simply
// fault back in as zeros) and kept for the next packing, up to pool_limit() bytes in all.
// release_output_pool() gives everything back.
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "packer.h"

namespace leafe {

namespace {

struct Pooled {
  void* p;
  size_t capacity;
};

constexpr size_t kMapMin = size_t{1} << 20;  // smaller outputs: plain malloc, never pooled
constexpr size_t kMaxPooled = 32;             // buffers; a packing has six big ones

std::mutex pool_mutex;
std::vector<Pooled> pool;  // oldest first
size_t pooled_bytes = 0;

// LEAFE_PACK_POOL_BYTES, else a quarter of physical memory (at most 16 GiB).
size_t pool_limit() {
  static const size_t limit = [] {
    if (const char* env = std::getenv("LEAFE_PACK_POOL_BYTES")) return static_cast<size_t>(std::strtoull(env, nullptr, 10));
#if defined(__linux__)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return std::min<size_t>(static_cast<size_t>(pages) * page / 4, size_t{16} << 30);
#endif
    return size_t{1} << 30;
  }();
  return limit;
}

void* fresh(size_t bytes) {
#if defined(__linux__)
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 kB, still correct
#endif
  return p;
#else
  void* p = std::malloc(bytes);
  if (!p) throw std::bad_alloc();
  return p;
#endif
}

void unmap(void* p, size_t capacity) {
#if defined(__linux__)
  munmap(p, capacity);
#else
  std::free(p);
#endif
}

}  // namespace

void* map_output(size_t bytes, size_t* capacity) {
  bytes = std::max<size_t>(bytes, 1);
  if (bytes < kMapMin) {
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    *capacity = bytes;
    return p;
  }
  bytes = (bytes + 4095) & ~size_t{4095};  // whole pages
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    // The smallest pooled buffer that holds `bytes` without wasting more than half of itself.
    size_t best = pool.size();
    for (size_t k = 0; k < pool.size(); ++k)
      if (pool[k].capacity >= bytes && pool[k].capacity / 2 <= bytes &&
          (best == pool.size() || pool[k].capacity < pool[best].capacity))
        best = k;
    if (best < pool.size()) {
      const Pooled hit = pool[best];
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(best));
      pooled_bytes -= hit.capacity;
      *capacity = hit.capacity;
      return hit.p;
    }
  }
  *capacity = bytes;
  return fresh(bytes);
}

void unmap_output(void* p, size_t capacity) {
  if (capacity < kMapMin) {
    std::free(p);
    return;
  }
  std::vector<Pooled> evicted;
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    if (capacity > pool_limit()) {
      evicted.push_back({p, capacity});
    } else {
#if defined(__linux__) && defined(MADV_FREE)
      madvise(p, capacity, MADV_FREE);
#endif
      pool.push_back({p, capacity});
      pooled_bytes += capacity;
      while (pooled_bytes > pool_limit() || pool.size() > kMaxPooled) {  // drop the oldest
        evicted.push_back(pool.front());
        pooled_bytes -= pool.front().capacity;
        pool.erase(pool.begin());
      }
    }
  }
  for (const Pooled& e : evicted) unmap(e.p, e.capacity);
}

size_t release_output_pool() {
  std::vector<Pooled> all;
  size_t bytes;
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    all.swap(pool);
    bytes = pooled_bytes;
    pooled_bytes = 0;
  }
  for (const Pooled& e : all) unmap(e.p, e.capacity);
  return bytes;
}

size_t pooled_output_bytes() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return pooled_bytes;
}

}  // namespace leafe
