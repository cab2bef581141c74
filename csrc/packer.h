// Packer internals shared by the planning (pack_plan.cpp) and assembly (pack_build.cpp) files.
// Plain C++17, no Python types: the bindings in packer.cpp convert numpy arrays to raw pointers and
// release the GIL around these calls. The rules below are mirrored line for line by the Python
// reference in leafe_fast/packing_reference.py; a tie-break changed here must change there too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace leafe {

enum class Strategy : int { kBestFitDecreasing = 0, kBalanced = 1 };

struct PlanOptions {
  int64_t budget = 0;                  // tokens per micro-batch
  Strategy strategy = Strategy::kBestFitDecreasing;
  int64_t ranks = 1;                   // data-parallel ranks
  int64_t micro_batches_per_rank = 0;  // balanced only; 0 = the fewest that fit
  double alpha = 0.0;                  // cost = tokens + alpha * sum(len^2)
  uint64_t seed = 0;
  bool shuffle = true;                 // permute the micro-batch order (slots for balanced) with seed
  bool keep_trees_together = false;
};

struct Plan {
  std::vector<int64_t> order;        // sample ids, micro-batch after micro-batch
  std::vector<int64_t> mb_offsets;   // [B+1] micro-batch b holds order[mb_offsets[b]:mb_offsets[b+1]]
  std::vector<int32_t> mb_rank;      // [B]
  std::vector<double> mb_cost;       // [B]
  std::vector<int64_t> split_trees;  // trees longer than the budget, packed in several chunks
  int64_t micro_batches_per_rank = 0;
};

// Plans the packing of m samples (ids[j], 1 <= lengths[j] <= budget <= 2^22, tree_ids[j]).
// Throws std::invalid_argument for bad options and std::runtime_error when a fixed
// micro_batches_per_rank cannot hold the samples.
Plan make_plan(const int64_t* ids, const int64_t* lengths, const int64_t* tree_ids, int64_t m,
               const PlanOptions& opt);

// Counts, per sample, the target tokens inside its kept window and the ones truncation removed.
// A target at window position 0 is removed (its predictor was cut away).
void count_targets(const uint8_t* mask, const int64_t* offsets, const int64_t* win_start, const int64_t* win_len,
                   int64_t n, int64_t* kept, int64_t* removed);

// Output layout of build_batches; every pointer is preallocated by the caller (sizes from the plan).
struct BuildOutputs {
  int32_t* input_ids;      // [T]
  int32_t* position_ids;   // [T]
  int32_t* cu_seqlens;     // [m + B]: micro-batch b owns [mb_offsets[b] + b, mb_offsets[b+1] + b + 1)
  int64_t* rows;           // [M] index into the micro-batch's T
  int64_t* targets;        // [M]
  float* weights;          // [M]
  int8_t* group;           // [M]
};

// The samples' columns both layouts read (flat build and trie build).
struct SampleArrays {
  const int32_t* tokens;
  const uint8_t* mask;
  const int8_t* group;       // per sample
  const float* weight;       // per sample
  const int64_t* win_abs;    // per sample: absolute offset of the kept window in tokens
  const int64_t* win_len;    // per sample
};

struct BuildInputs : SampleArrays {
  const int64_t* kept;       // per sample: targets inside the window
  const int64_t* order;      // plan order
  const int64_t* mb_offsets; // [B+1]
  int64_t num_mb;
};

// Prefix sums of tokens and targets per micro-batch and each micro-batch's longest sample.
void layout_batches(const BuildInputs& in, int64_t* mb_tok_off, int64_t* mb_tgt_off, int32_t* max_seqlen);

// Fills the outputs; threads > 1 splits the micro-batches into contiguous token-balanced ranges.
void build_batches(const BuildInputs& in, const int64_t* mb_tok_off, const int64_t* mb_tgt_off,
                   const BuildOutputs& out, int threads);

// Faults in the pages of [p, p + bytes) of a mapped output in one call before they are written.
void populate_output(void* p, size_t bytes);

// ---- trie layout (pack_trie.cpp) ----
// The samples of one tree (same tree id >= 0; a negative id is a tree of its own) become one token trie,
// emitted in depth-first pre-order (children by token value). Trees longer than the budget are cut into
// chunks of consecutive samples in lexicographic order, i.e. at branch points.
struct TrieChunks {
  std::vector<int64_t> members;           // sample ids, chunk after chunk, lexicographic order inside
  std::vector<int64_t> lcp;               // [members] common prefix with the previous member of the chunk
  std::vector<int64_t> chunk_offsets{0};  // [C+1] into members
  std::vector<int64_t> chunk_tokens;      // [C] trie tokens of each chunk (<= budget)
  std::vector<int64_t> split_trees;       // tree ids cut into several chunks
  std::vector<int64_t> mixed_trees;       // tree ids whose samples do not share their prompt (see .cpp)
};

// eligible: the sample ids to pack (input order), each with win_len in [1, budget] and >= 1 target.
TrieChunks trie_chunks(const int32_t* tokens, const uint8_t* mask, const int64_t* win_abs, const int64_t* win_len,
                       const int64_t* tree_ids, const int64_t* eligible, int64_t m, int64_t budget, int threads);

struct TrieOutputs {
  int32_t* input_ids;     // [T]
  int32_t* position_ids;  // [T] depth
  int32_t* subtree_end;   // [T] micro-batch local
  int32_t* cu_seqlens;    // [C + B] chunk boundaries; micro-batch b owns [mb_offsets[b] + b, mb_offsets[b+1] + b + 1)
  int64_t* rows;          // [M]
  int64_t* targets;       // [M]
  float* weights;         // [M]
  int8_t* group;          // [M]
  int64_t* sample_ids;    // [members] chunk members in id order, chunk after chunk
};

struct TrieInputs : SampleArrays {
  const int64_t* members;
  const int64_t* lcp;            // lcp[q] <= both lengths; the first member of a chunk is read as 0
  const int64_t* chunk_offsets;
  const int64_t* order;       // chunk ids, micro-batch after micro-batch
  const int64_t* mb_offsets;  // [B+1] into order
  int64_t num_mb;
};

// Per micro-batch prefix sums: tokens, targets, samples; and the longest chunk (from lengths, LCPs, masks).
void trie_layout(const TrieInputs& in, int64_t* tok_off, int64_t* tgt_off, int64_t* smp_off, int32_t* max_seqlen);
void trie_build(const TrieInputs& in, const int64_t* tok_off, const int64_t* tgt_off, const int64_t* smp_off,
                const TrieOutputs& out, int threads);

// Output memory (output_pool.cpp). map_output returns at least `bytes`, recycled from a released
// output when one fits, else a fresh anonymous mapping with transparent huge pages; *capacity gets
// the real size, which unmap_output needs back. Released outputs are kept (lazily freeable, see
// MADV_FREE) up to pool_limit() bytes so the next packing skips the kernel's page zeroing.
void* map_output(size_t bytes, size_t* capacity);
void unmap_output(void* p, size_t capacity);
size_t release_output_pool();  // unmaps every pooled buffer; returns the bytes given back
size_t pooled_output_bytes();

// Calls visit(i) for every position i in [1, len) whose mask byte is set, in order, until visit returns
// false (position 0 has no predictor, so it is never a target). Context spans are long and target spans
// short, so eight zero mask bytes are skipped at a time. The flat and trie builds share it.
template <class Visit>
inline void for_each_target(const uint8_t* mask, int64_t len, Visit&& visit) {
  for (int64_t i = 1; i < len; ++i) {
    if (i + 8 <= len) {
      uint64_t word;
      std::memcpy(&word, mask + i, sizeof(word));
      if (word == 0) {
        i += 7;
        continue;
      }
    }
    if (mask[i] && !visit(i)) return;
  }
}

// splitmix64: the one RNG both the C++ and the Python reference use for shuffles.
uint64_t splitmix64_next(uint64_t& state);
std::vector<int64_t> permutation(int64_t n, uint64_t seed);

}  // namespace leafe
