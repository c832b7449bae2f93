// Host implementations of the fused KV norm + RoPE kernels and the MODEL1 cache entry codec.
// One "thread block" per row, as on the GPU; the in-place kernel addresses row t at t * D exactly as
// the GPU kernel's `input + work_id * kHeadDim` does, which is why its contract demands density.
#include "kernels/norm_rope.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/faults/faults.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

// rope_dim from the table; the structural rules have already checked ranks.
int64_t rope_dim_of(const char* op, const Tensor& kv, const Tensor& freqs) {
  const int64_t rope_dim = 2 * freqs.size(0);
  if (rope_dim < 1 || rope_dim > kv.size(1)) {
    throw ContractError(op, "freqs", "needs 0 < 2 * shape[0] <= kv.shape[1], got shape " + shape_str(freqs.shape()) +
                                         " for kv " + shape_str(kv.shape()));
  }
  return rope_dim;
}

// RMSNorm with weight then RoPE of one row, results as bf16-valued floats in `out` (D floats).
// The sum of squares is accumulated in f64 and the inverse rms rounded once to f32, matching the
// reference (reference/norm.cpp) bit for bit; the products are f32 with one bf16 rounding.
void norm_rope_row(const uint16_t* in, const float* weight, double eps, const float* freqs, int64_t dim,
                   int64_t rope_dim, int32_t pos, float* out) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < dim; ++i) {
    out[i] = bf16_to_f32(in[i]);
    sum_sq += static_cast<double>(out[i]) * out[i];
  }
  const auto r = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + eps));
  for (int64_t i = 0; i < dim; ++i) out[i] = round_bf16(out[i] * r * weight[i]);
  // RoPE reads the bf16 normed values (the unfused kernels round between the two ops).
  float* rope = out + (dim - rope_dim);
  for (int64_t j = 0; j < rope_dim / 2; ++j) {
    const float angle = static_cast<float>(pos) * freqs[j];
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    const float a = rope[2 * j];
    const float b = rope[2 * j + 1];
    rope[2 * j] = round_bf16(a * c - b * s);
    rope[2 * j + 1] = round_bf16(a * s + b * c);
  }
}

const Contract& inplace_contract() {
  static const Contract contract = Contract(kNormRopeOp)
                                       .arg("kv").dtype(DType::bf16).rank(2).contiguous()
                                       .arg("weight").dtype(DType::f32).rank(1).contiguous().same_size(0, "kv", 1)
                                       .arg("freqs").dtype(DType::f32).rank(1).contiguous()
                                       .arg("positions").dtype(DType::i32).rank(1).contiguous().same_size(0, "kv", 0)
                                       .values_in(0, kInt32Max);
  return contract;
}

// Fault norm-rope-contiguity-unchecked: the contract sees a dense stand-in, the kernel the view. On
// the host the stand-in is a contiguous copy; on a GPU a dense view over the same storage where it
// fits (no copy, so the launch stays capturable), else a copy too.
Tensor contract_stand_in(const Tensor& kv) {
  if (kv.defined() && on_gpu(kv) && kv.offset() + kv.numel() <= kv.storage_elements()) {
    return Tensor::over(kv.storage(), kv.dtype(), kv.shape(), kv.offset());
  }
  return kv.contiguous();
}

// The stride-aware variant: rows may be padded or sliced out of a wider buffer.
const Contract& store_contract() {
  static const Contract contract = Contract(kNormRopeStoreOp)
                                       .arg("kv").dtype(DType::bf16).rank(2).inner_contiguous()
                                       .arg("weight").dtype(DType::f32).rank(1).contiguous().same_size(0, "kv", 1)
                                       .arg("freqs").dtype(DType::f32).rank(1).contiguous()
                                       .arg("positions").dtype(DType::i32).rank(1).contiguous().same_size(0, "kv", 0)
                                       .values_in(0, kInt32Max)
                                       .arg("swa_locs").dtype(DType::i64).rank(1).contiguous().same_size(0, "kv", 0)
                                       .arg("cache").dtype(DType::u8).rank(2).contiguous();
  return contract;
}

const Contract& store_model1_contract() {
  static const Contract contract = Contract(kStoreKvModel1Op)
                                       .arg("kv").dtype(DType::bf16).rank(2).inner_contiguous()
                                       .arg("locs").dtype(DType::i64).rank(1).contiguous().same_size(0, "kv", 0)
                                       .arg("cache").dtype(DType::u8).rank(2).contiguous();
  return contract;
}

// The MODEL1 cache rules both stores share, once the structural contract has passed: page_size >= 1,
// the layout of [D = kv.shape[1], rope_dim, scale_block], the cache's page bytes, and (host tensors)
// the locations in [-1, pages * page_size). Returns the layout.
Model1Layout check_model1_store(const char* op, const Tensor& kv, int64_t rope_dim, const char* locs_name,
                                const Tensor& locs, const Tensor& cache, int64_t page_size, int64_t scale_block,
                                Contract::Values values) {
  if (page_size < 1) throw ContractError(op, "page_size", "must be >= 1, got " + std::to_string(page_size));
  const Model1Layout layout = model1_layout(op, kv.size(1), rope_dim, scale_block);
  // The bounds depend on the geometry, so this part of the contract is built per launch.
  const int64_t entries = cache.size(0) * page_size;
  Contract(op)
      .arg(locs_name).values_in(-1, entries - 1)
      .arg("cache").dim(1, layout.page_bytes(page_size))
      .check({{locs_name, &locs}, {"cache", &cache}}, values);
  return layout;
}

// The host stores' loop: `fill(t, row)` writes row t's D floats, which are packed at locs[t]; rows at
// -1 are skipped, and a later row naming a location overwrites an earlier one.
template <class Fill>
void pack_rows(const Model1Layout& layout, int64_t page_size, const Tensor& locs, Tensor& cache, Fill fill) {
  const int64_t* loc = locs.data<int64_t>();
  std::vector<float> row(static_cast<size_t>(layout.head_dim));
  for (int64_t t = 0; t < locs.size(0); ++t) {
    if (loc[t] < 0) continue;  // padding rows (-1) write nothing
    fill(t, row.data());
    model1_pack(layout, page_size, row.data(), cache.data<uint8_t>(), loc[t]);
  }
}

}  // namespace

Model1Layout model1_layout(const char* op, int64_t head_dim, int64_t rope_dim, int64_t scale_block,
                           const char* block_argument) {
  const Model1Layout layout{head_dim, rope_dim, scale_block};
  if (rope_dim < 0 || rope_dim >= head_dim) {
    throw ContractError(op, "cache",
                        "MODEL1 needs 0 <= rope_dim < head_dim, got head_dim " + std::to_string(head_dim) +
                            ", rope_dim " + std::to_string(rope_dim));
  }
  if (scale_block < 1 || layout.nope_dim() % scale_block != 0) {
    throw ContractError(op, block_argument,
                        "MODEL1 needs a scale block >= 1 dividing the nope dims (head_dim - rope_dim), got " +
                            std::to_string(scale_block) + " for head_dim " + std::to_string(head_dim) +
                            ", rope_dim " + std::to_string(rope_dim));
  }
  return layout;
}

float e4m3_block_scale(float amax) {
  // A multiply by the f32 reciprocal, not a divide (§2.9); the scale is a power of two.
  return round_ue8m0_ceil(std::max(amax, 1e-4f) * (1.0f / kE4m3fnMaxF32));
}

void model1_pack_entry(const Model1Layout& l, const float* kv, uint8_t* values, uint8_t* scales) {
  const int64_t block = l.scale_block;
  for (int64_t b = 0; b < l.scale_count(); ++b) {
    const float* x = kv + b * block;
    float amax = 0.0f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = e4m3_block_scale(amax);
    scales[b] = f32_to_ue8m0_ceil(scale);  // exact: the scale is a power of two
    for (int64_t i = 0; i < block; ++i) {
      values[b * block + i] = f32_to_e4m3fn(std::clamp(x[i] / scale, -kE4m3fnMaxF32, kE4m3fnMaxF32));
    }
  }
  std::fill(scales + l.scale_count(), scales + l.scale_bytes(), uint8_t{0});
  uint8_t* rope = values + l.nope_dim();
  for (int64_t i = 0; i < l.rope_dim; ++i) {
    const uint16_t code = f32_to_bf16(kv[l.nope_dim() + i]);
    rope[2 * i] = static_cast<uint8_t>(code & 0xFFu);
    rope[2 * i + 1] = static_cast<uint8_t>(code >> 8);
  }
}

void model1_unpack_entry(const Model1Layout& l, const uint8_t* values, const uint8_t* scales, float* kv) {
  const int64_t block = l.scale_block;
  for (int64_t b = 0; b < l.scale_count(); ++b) {
    const float scale = ue8m0_to_f32(scales[b]);
    for (int64_t i = 0; i < block; ++i) {
      const int64_t d = b * block + i;
      kv[d] = e4m3fn_to_f32(values[d]) * scale;  // exact: the scale is a power of two
    }
  }
  const uint8_t* rope = values + l.nope_dim();
  for (int64_t i = 0; i < l.rope_dim; ++i) {
    kv[l.nope_dim() + i] = bf16_to_f32(static_cast<uint16_t>(rope[2 * i] | (rope[2 * i + 1] << 8)));
  }
}

void model1_pack(const Model1Layout& l, int64_t page_size, const float* kv, uint8_t* cache, int64_t loc) {
  uint8_t* page = cache + (loc / page_size) * l.page_bytes(page_size);
  const int64_t slot = loc % page_size;
  model1_pack_entry(l, kv, page + slot * l.value_bytes(), page + page_size * l.value_bytes() + slot * l.scale_bytes());
}

void model1_unpack(const Model1Layout& l, int64_t page_size, const uint8_t* cache, int64_t loc, float* kv) {
  const uint8_t* page = cache + (loc / page_size) * l.page_bytes(page_size);
  const int64_t slot = loc % page_size;
  model1_unpack_entry(l, page + slot * l.value_bytes(), page + page_size * l.value_bytes() + slot * l.scale_bytes(),
                      kv);
}

void check_norm_rope_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs, const Tensor& positions) {
  // One device; the value rule (positions >= 0) reads host tensors only.
  const bool gpu =
      runs_on_gpu(kNormRopeOp, {{"kv", &kv}, {"weight", &weight}, {"freqs", &freqs}, {"positions", &positions}});
  inplace_contract().check({{"kv", &kv}, {"weight", &weight}, {"freqs", &freqs}, {"positions", &positions}},
                           gpu ? Contract::Values::skip : Contract::Values::check);
  rope_dim_of(kNormRopeOp, kv, freqs);
}

void fused_norm_rope_inplace(Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                             const Tensor& positions) {
  // Fault norm-rope-contiguity-unchecked: the contract sees a dense stand-in, the kernel the view.
  const bool unchecked = faults::enabled(faults::Fault::norm_rope_contiguity_unchecked);
  check_norm_rope_contract(unchecked ? contract_stand_in(kv) : kv, weight, freqs, positions);
  if (runs_on_gpu(kNormRopeOp, {{"kv", &kv}, {"weight", &weight}, {"freqs", &freqs}, {"positions", &positions}})) {
    DSV4_GPU_OR_FAIL(kNormRopeOp, cuda::fused_norm_rope_inplace(kv, weight, eps, freqs, positions, current_stream()));
  }
  const int64_t rows = kv.size(0);
  const int64_t dim = kv.size(1);
  const int64_t rope_dim = rope_dim_of(kNormRopeOp, kv, freqs);
  auto* base = kv.data<uint16_t>();
  const int32_t* pos = positions.data<int32_t>();
  std::vector<float> row(static_cast<size_t>(dim));
  for (int64_t t = 0; t < rows; ++t) {
    uint16_t* x = base + t * dim;  // dense rows by contract
    norm_rope_row(x, weight.data<float>(), eps, freqs.data<float>(), dim, rope_dim, pos[t], row.data());
    for (int64_t i = 0; i < dim; ++i) x[i] = f32_to_bf16(row[static_cast<size_t>(i)]);
  }
}

void check_norm_rope_store_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs,
                                    const Tensor& positions, const Tensor& swa_locs, const Tensor& cache,
                                    int64_t page_size, int64_t scale_block) {
  // One device; the value rules (positions >= 0, the swa_locs range) read host tensors only.
  const bool gpu = runs_on_gpu(kNormRopeStoreOp, {{"kv", &kv},
                                                  {"weight", &weight},
                                                  {"freqs", &freqs},
                                                  {"positions", &positions},
                                                  {"swa_locs", &swa_locs},
                                                  {"cache", &cache}});
  const Contract::Values values = gpu ? Contract::Values::skip : Contract::Values::check;
  store_contract().check({{"kv", &kv},
                          {"weight", &weight},
                          {"freqs", &freqs},
                          {"positions", &positions},
                          {"swa_locs", &swa_locs},
                          {"cache", &cache}},
                         values);
  check_model1_store(kNormRopeStoreOp, kv, rope_dim_of(kNormRopeStoreOp, kv, freqs), "swa_locs", swa_locs, cache,
                     page_size, scale_block, values);
}

void fused_norm_rope_store_kv(const Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                              const Tensor& positions, const Tensor& swa_locs, Tensor& cache, int64_t page_size,
                              int64_t scale_block) {
  check_norm_rope_store_contract(kv, weight, freqs, positions, swa_locs, cache, page_size, scale_block);
  if (runs_on_gpu(kNormRopeStoreOp, {{"kv", &kv},
                                     {"weight", &weight},
                                     {"freqs", &freqs},
                                     {"positions", &positions},
                                     {"swa_locs", &swa_locs},
                                     {"cache", &cache}})) {
    DSV4_GPU_OR_FAIL(kNormRopeStoreOp, cuda::fused_norm_rope_store_kv(kv, weight, eps, freqs, positions, swa_locs, cache, page_size, scale_block,
                                   current_stream()));
  }
  const int64_t dim = kv.size(1);
  const int64_t rope_dim = rope_dim_of(kNormRopeStoreOp, kv, freqs);
  const Model1Layout layout = model1_layout(kNormRopeStoreOp, dim, rope_dim, scale_block);
  const auto* base = kv.data<const uint16_t>();
  const int32_t* pos = positions.data<int32_t>();
  pack_rows(layout, page_size, swa_locs, cache, [&](int64_t t, float* row) {
    // The row stride comes from the view, so slices of a wider qkv_a buffer are read correctly.
    norm_rope_row(base + t * kv.stride(0), weight.data<float>(), eps, freqs.data<float>(), dim, rope_dim, pos[t], row);
  });
}

void store_kv_model1(const Tensor& kv, int64_t rope_dim, const Tensor& locs, Tensor& cache, int64_t page_size,
                     int64_t scale_block) {
  // One device; the value rule (the locs range) reads host tensors only.
  const bool gpu = runs_on_gpu(kStoreKvModel1Op, {{"kv", &kv}, {"locs", &locs}, {"cache", &cache}});
  const Contract::Values values = gpu ? Contract::Values::skip : Contract::Values::check;
  store_model1_contract().check({{"kv", &kv}, {"locs", &locs}, {"cache", &cache}}, values);
  if (rope_dim < 0 || rope_dim >= kv.size(1) || rope_dim % 2 != 0) {
    throw ContractError(kStoreKvModel1Op, "rope_dim",
                        "needs an even rope_dim with 0 <= rope_dim < kv.shape[1], got " + std::to_string(rope_dim) +
                            " for kv " + shape_str(kv.shape()));
  }
  const Model1Layout layout =
      check_model1_store(kStoreKvModel1Op, kv, rope_dim, "locs", locs, cache, page_size, scale_block, values);
  if (gpu) {
    DSV4_GPU_OR_FAIL(kStoreKvModel1Op,
                     cuda::store_kv_model1(kv, rope_dim, locs, cache, page_size, scale_block, current_stream()));
  }
  const auto* base = kv.data<const uint16_t>();
  pack_rows(layout, page_size, locs, cache, [&](int64_t t, float* row) {
    const uint16_t* x = base + t * kv.stride(0);
    for (int64_t i = 0; i < layout.head_dim; ++i) row[i] = bf16_to_f32(x[i]);
  });
}

}  // namespace dsv4::kernels
