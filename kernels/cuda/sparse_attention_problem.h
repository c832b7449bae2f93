// What both CUDA sparse-attention kernels read (the exact one in sparse_attention.cu, HIP-portable,
// and the tensor-core one in sparse_attention_tc.cu): the op's pointers and MODEL1 geometry as kernel
// parameters, built once from the checked arguments. Included only by those two files, after port.h.
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"
#include "kernels/sparse_attention.h"

namespace dsv4::kernels::cuda {

// One MODEL1 cache and its per-token index rows, as a kernel reads them.
struct AttentionCacheView {
  const uint8_t* bytes = nullptr;
  const int32_t* indices = nullptr;  // [T, topk]
  const int32_t* lens = nullptr;     // [T]
  long long page_size = 1;
  long long page_bytes = 0;
  long long entries = 0;  // pages * page_size: valid indices are [0, entries)
  int topk = 0;           // 0: no such cache
};

struct AttentionProblem {
  const uint16_t* q = nullptr;  // [T, H, D] bf16
  uint16_t* out = nullptr;      // [T, H, D] bf16
  const float* sink = nullptr;  // [H]
  AttentionCacheView swa, extra;  // extra.topk == 0 when absent
  int heads = 0, dim = 0, nope = 0, scale_block = 1, value_bytes = 0, scale_bytes = 0;
  float scale = 0.0f;
};

inline AttentionCacheView attention_cache_view(const Model1Layout& layout, const Tensor& cache, int64_t page_size,
                                               const Tensor& indices, const Tensor& lens) {
  AttentionCacheView v;
  if (!cache.defined()) return v;
  v.bytes = cache.data<const uint8_t>();
  v.indices = indices.data<const int32_t>();
  v.lens = lens.data<const int32_t>();
  v.page_size = page_size;
  v.page_bytes = layout.page_bytes(page_size);
  v.entries = cache.size(0) * page_size;
  v.topk = static_cast<int>(indices.size(1));
  return v;
}

// Fills the shared fields of a kernel's parameters (a struct deriving from AttentionProblem).
inline void fill_attention_problem(AttentionProblem& p, const SparseAttentionArgs& a, const Model1Layout& layout) {
  p.q = a.q.data<const uint16_t>();
  p.out = a.out.data<uint16_t>();
  p.sink = a.attn_sink.data<const float>();
  p.swa = attention_cache_view(layout, a.swa_cache, a.swa_page_size, a.swa_indices, a.swa_lens);
  p.extra = attention_cache_view(layout, a.extra_cache, a.extra_page_size, a.extra_indices, a.extra_lens);
  p.heads = static_cast<int>(a.q.size(1));
  p.dim = static_cast<int>(a.q.size(2));
  p.nope = static_cast<int>(layout.nope_dim());
  p.scale_block = static_cast<int>(layout.scale_block);
  p.value_bytes = static_cast<int>(layout.value_bytes());
  p.scale_bytes = static_cast<int>(layout.scale_bytes());
  p.scale = a.scale;
}

// Token t's length in `c`, clamped to [0, topk] (0 for an absent cache): a bad value reads nothing
// out of bounds.
__device__ inline int attention_clamp_len(const AttentionCacheView& c, int t) {
  if (c.lens == nullptr || c.topk <= 0) return 0;
  const int len = c.lens[t];
  return len < 0 ? 0 : (len > c.topk ? c.topk : len);
}

// The candidate at position c of token t (the window's first swa_len columns, then the compressed
// ones): its entry index, or -1 for padding or an index outside its cache; *from_swa says which cache.
__device__ inline int attention_candidate(const AttentionProblem& p, int t, int c, int swa_len, bool* from_swa) {
  *from_swa = c < swa_len;
  const AttentionCacheView& cache = *from_swa ? p.swa : p.extra;
  const int column = *from_swa ? c : c - swa_len;
  const int32_t idx = cache.indices[static_cast<long long>(t) * cache.topk + column];
  return idx >= 0 && static_cast<long long>(idx) < cache.entries ? idx : -1;
}

// The value bytes and the scale bytes of entry `loc` of `cache`.
__device__ inline const uint8_t* attention_entry_values(const AttentionProblem& p, const AttentionCacheView& cache,
                                                         long long loc, const uint8_t** scales) {
  const long long page = loc / cache.page_size;
  const long long slot = loc - page * cache.page_size;
  const uint8_t* base = cache.bytes + page * cache.page_bytes;
  *scales = base + cache.page_size * p.value_bytes + slot * p.scale_bytes;
  return base + slot * p.value_bytes;
}

}  // namespace dsv4::kernels::cuda
