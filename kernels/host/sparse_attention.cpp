// Host implementation of the sparse attention with the sink over MODEL1 caches, and the entry point
// that sends GPU tensors to kernels/cuda/sparse_attention.cu. Per token it dequantizes the
// referenced entries once (the GPU kernel stages each tile of keys in shared memory for a group of
// heads of the token), then runs every head over the same keys.
#include "kernels/sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/norm_rope.h"

namespace dsv4::kernels {
namespace {

const Contract& structural_contract() {
  static const Contract contract =
      Contract(kSparseAttentionOp)
          .arg("q").dtype(DType::bf16).rank(3).contiguous()
          .arg("out").dtype(DType::bf16).rank(3).contiguous().same_size(0, "q", 0).same_size(1, "q", 1)
          .same_size(2, "q", 2)
          .arg("attn_sink").dtype(DType::f32).rank(1).contiguous().same_size(0, "q", 1)
          .arg("swa_cache").dtype(DType::u8).rank(2).contiguous()
          .arg("swa_indices").dtype(DType::i32).rank(2).contiguous().same_size(0, "q", 0)
          .arg("swa_lens").dtype(DType::i32).rank(1).contiguous().same_size(0, "q", 0)
          .arg("extra_cache").optional().dtype(DType::u8).rank(2).contiguous()
          .arg("extra_indices").optional().dtype(DType::i32).rank(2).contiguous().same_size(0, "q", 0)
          .arg("extra_lens").optional().dtype(DType::i32).rank(1).contiguous().same_size(0, "q", 0);
  return contract;
}

// The rules of one cache's (cache, indices, lens) triple; bounds depend on the geometry. The value
// rules read the index and length tensors, so they run for host tensors only (`values`).
void check_cache_values(const Model1Layout& layout, const char* cache_name, const Tensor& cache, int64_t page_size,
                        const char* indices_name, const Tensor& indices, const char* lens_name, const Tensor& lens,
                        Contract::Values values) {
  if (page_size < 1) {
    throw ContractError(kSparseAttentionOp, cache_name, "page_size must be >= 1, got " + std::to_string(page_size));
  }
  const int64_t entries = cache.size(0) * page_size;
  Contract(kSparseAttentionOp)
      .arg(cache_name).dim(1, layout.page_bytes(page_size))
      .arg(indices_name).values_in(-1, entries - 1)
      // topk_lengths_clamp1: a length of 0 would make an empty softmax (FlashMLA divides by it).
      .arg(lens_name).values_in(1, indices.size(1))
      .check({{cache_name, &cache}, {indices_name, &indices}, {lens_name, &lens}}, values);
}

// Appends the dequantized entries row t references (j < len, -1 skipped) to `keys`.
void gather(const Model1Layout& layout, const Tensor& cache, int64_t page_size, const Tensor& indices,
            const Tensor& lens, int64_t t, std::vector<float>& keys) {
  const int64_t topk = indices.size(1);
  const int32_t* row = indices.data<int32_t>() + t * topk;
  const int32_t len = lens.data<int32_t>()[t];
  for (int64_t j = 0; j < len; ++j) {
    if (row[j] < 0) continue;
    const size_t at = keys.size();
    keys.resize(at + static_cast<size_t>(layout.head_dim));
    model1_unpack(layout, page_size, cache.data<uint8_t>(), row[j], keys.data() + at);
  }
}

bool has_extra(const SparseAttentionArgs& a) { return a.extra_cache.defined(); }

}  // namespace

void check_sparse_attention_contract(const SparseAttentionArgs& a) {
  structural_contract().check({{"q", &a.q},
                               {"out", &a.out},
                               {"attn_sink", &a.attn_sink},
                               {"swa_cache", &a.swa_cache},
                               {"swa_indices", &a.swa_indices},
                               {"swa_lens", &a.swa_lens},
                               {"extra_cache", &a.extra_cache},
                               {"extra_indices", &a.extra_indices},
                               {"extra_lens", &a.extra_lens}});
  // The extra triple comes whole or not at all.
  const bool c = a.extra_cache.defined(), i = a.extra_indices.defined(), l = a.extra_lens.defined();
  if (c != i || c != l) {
    throw ContractError(kSparseAttentionOp, !c ? "extra_cache" : (!i ? "extra_indices" : "extra_lens"),
                        "extra_cache, extra_indices and extra_lens are given together or not at all");
  }
  // All on one device (a ContractError naming the first argument that differs).
  const bool gpu = runs_on_gpu(kSparseAttentionOp, {{"q", &a.q},
                                                    {"out", &a.out},
                                                    {"attn_sink", &a.attn_sink},
                                                    {"swa_cache", &a.swa_cache},
                                                    {"swa_indices", &a.swa_indices},
                                                    {"swa_lens", &a.swa_lens},
                                                    {"extra_cache", &a.extra_cache},
                                                    {"extra_indices", &a.extra_indices},
                                                    {"extra_lens", &a.extra_lens}});
  const Model1Layout layout = model1_layout(kSparseAttentionOp, a.q.size(2), a.rope_dim, a.kv_block, "kv_block");
  // Index and length values live in device memory on a GPU: the kernel skips bad ones instead.
  const Contract::Values values = gpu ? Contract::Values::skip : Contract::Values::check;
  check_cache_values(layout, "swa_cache", a.swa_cache, a.swa_page_size, "swa_indices", a.swa_indices, "swa_lens",
                     a.swa_lens, values);
  if (has_extra(a)) {
    check_cache_values(layout, "extra_cache", a.extra_cache, a.extra_page_size, "extra_indices", a.extra_indices,
                       "extra_lens", a.extra_lens, values);
  }
  if (gpu && a.q.size(2) > kSparseAttentionGpuMaxDim) {
    throw ContractError(kSparseAttentionOp, "q",
                        "the GPU kernel supports head_dim <= " + std::to_string(kSparseAttentionGpuMaxDim) + ", got " +
                            std::to_string(a.q.size(2)));
  }
}

void sparse_attention(const SparseAttentionArgs& a) {
  check_sparse_attention_contract(a);
  if (runs_on_gpu(kSparseAttentionOp, {{"q", &a.q}, {"out", &a.out}})) {
    DSV4_GPU_OR_FAIL(kSparseAttentionOp, cuda::sparse_attention(a, current_stream()));
  }
  const int64_t tokens = a.q.size(0);
  const int64_t heads = a.q.size(1);
  const int64_t dim = a.q.size(2);
  const Model1Layout layout = model1_layout(kSparseAttentionOp, dim, a.rope_dim, a.kv_block, "kv_block");
  const auto* q_all = a.q.data<const uint16_t>();
  auto* out_all = a.out.data<uint16_t>();
  const float* sink = a.attn_sink.data<float>();
  std::vector<float> keys;
  std::vector<float> q(static_cast<size_t>(dim));
  std::vector<float> logits;
  std::vector<float> acc(static_cast<size_t>(dim));
  for (int64_t t = 0; t < tokens; ++t) {
    keys.clear();
    gather(layout, a.swa_cache, a.swa_page_size, a.swa_indices, a.swa_lens, t, keys);
    if (has_extra(a)) gather(layout, a.extra_cache, a.extra_page_size, a.extra_indices, a.extra_lens, t, keys);
    const auto n = static_cast<int64_t>(keys.size()) / dim;
    logits.resize(static_cast<size_t>(n));
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* q_h = q_all + (t * heads + h) * dim;
      uint16_t* out_h = out_all + (t * heads + h) * dim;
      if (n == 0) {
        // No valid key: the output is 0 (the sink alone carries no value).
        std::fill(out_h, out_h + dim, f32_to_bf16(0.0f));
        continue;
      }
      for (int64_t i = 0; i < dim; ++i) q[static_cast<size_t>(i)] = bf16_to_f32(q_h[i]);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float* k = keys.data() + j * dim;
        float dot = 0.0f;  // f32 accumulation, as the tensor-core kernel's accumulator
        for (int64_t i = 0; i < dim; ++i) dot += q[static_cast<size_t>(i)] * k[i];
        logits[static_cast<size_t>(j)] = a.scale * dot;
        m = std::max(m, logits[static_cast<size_t>(j)]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float denominator = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(logits[static_cast<size_t>(j)] - m);
        denominator += p;         // the denominator sums the f32 probabilities
        const float w = round_bf16(p);  // P is bf16 before P.V
        const float* v = keys.data() + j * dim;  // V = K
        for (int64_t i = 0; i < dim; ++i) acc[static_cast<size_t>(i)] += w * v[i];
      }
      // The sink only enlarges the denominator (a null value of 0), added after the last key.
      denominator += std::exp(sink[h] - m);
      for (int64_t i = 0; i < dim; ++i) out_h[i] = f32_to_bf16(acc[static_cast<size_t>(i)] / denominator);
    }
  }
}

}  // namespace dsv4::kernels
