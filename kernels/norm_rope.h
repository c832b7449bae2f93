// The KV path's fused norm + RoPE (dsv4-model §2.2; sglang fused_norm_rope_inplace and
// fused_k_norm_rope_flashmla) and the FP8 "MODEL1" paged cache entry it writes (§5), which
// sparse_attention (kernels/sparse_attention.h) reads back.
//
// Per row of kv [T, D] bf16: RMSNorm with weight (sum of squares accumulated wider than the
// inputs, one inverse rms per row, y = bf16(x * r * w)), then interleaved RoPE on the last
// rope_dim = 2 * freqs.size() dims at positions[t]: pair j of the rope part, (a, b), becomes
// (a cos - b sin, a sin + b cos) with angle f32(pos) * freqs[j], computed in f32 and rounded to bf16.
//
// MODEL1 entry (D = nope + rope, nope a multiple of kKvScaleBlock):
//   values: | nope e4m3, one ue8m0 scale per 64 dims | rope bf16 little-endian |  nope + 2 rope B
//   scales: | ue8m0 x nope / 64 | 0-pad to 8 B |                                    8 B on Flash
// A page of page_size entries is every entry's values, then every entry's scales, padded to a
// multiple of the value stride (256 x 576 + 256 x 8 -> 149760 B on Flash). Location loc lives in
// page loc / page_size, slot loc % page_size. The block scale is the e4m3 ue8m0 rule of §2.9:
// 2^ceil(log2(max(amax, 1e-4) * f32(1/448))).
//
// Contracts (ContractError naming the argument and the rule):
//   fused_norm_rope_inplace: kv bf16 rank 2 CONTIGUOUS (PyTorch's rule: T = 1 passes whatever its
//     row stride), weight f32 [D], freqs f32 [rope_dim / 2] with 0 < rope_dim <= D, positions i32 [T]
//     with values >= 0; host tensors. The kernel indexes rows as t * D, as the GPU one does (bug
//     class A1: a strided slice qkv_a[..., q_lora:] must be rejected, never misread).
//   fused_norm_rope_store_kv: as above but kv only needs a unit last-dim stride (any row stride);
//     swa_locs i64 [T] with values in [-1, pages * page_size) (-1: write nothing); cache u8
//     [pages, page_bytes(page_size)] contiguous; page_size >= 1; (D - rope_dim) % 64 == 0.
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kNormRopeOp = "fused_norm_rope_inplace";
inline constexpr const char* kNormRopeStoreOp = "fused_norm_rope_store_kv";
inline constexpr int64_t kKvScaleBlock = 64;  // nope dims per ue8m0 scale

// Byte geometry of one MODEL1 entry and page (the GPU kernel's constants, derived from D and rope_dim).
struct Model1Layout {
  int64_t head_dim = 0;
  int64_t rope_dim = 0;
  int64_t nope_dim() const { return head_dim - rope_dim; }
  int64_t scale_count() const { return nope_dim() / kKvScaleBlock; }
  int64_t value_bytes() const { return nope_dim() + 2 * rope_dim; }
  int64_t scale_bytes() const { return (scale_count() + 7) / 8 * 8; }
  int64_t page_bytes(int64_t page_size) const {
    const int64_t raw = page_size * (value_bytes() + scale_bytes());
    return (raw + value_bytes() - 1) / value_bytes() * value_bytes();
  }
};

// Throws ContractError(op, "cache"/"kv", ...) unless D, rope_dim describe a MODEL1 entry.
Model1Layout model1_layout(const char* op, int64_t head_dim, int64_t rope_dim);

// Packs one entry (head_dim floats, nope then rope) at `loc` of a contiguous byte cache.
void model1_pack(const Model1Layout& layout, int64_t page_size, const float* kv, uint8_t* cache, int64_t loc);
// Dequantizes the entry at `loc` into head_dim floats (e4m3 * scale exactly, rope from bf16).
void model1_unpack(const Model1Layout& layout, int64_t page_size, const uint8_t* cache, int64_t loc, float* kv);

void check_norm_rope_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs, const Tensor& positions);
void fused_norm_rope_inplace(Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                             const Tensor& positions);

void check_norm_rope_store_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs,
                                    const Tensor& positions, const Tensor& swa_locs, const Tensor& cache,
                                    int64_t page_size);
// kv is read only; each row with swa_locs[t] >= 0 is normed, rotated and packed at that location.
void fused_norm_rope_store_kv(const Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                              const Tensor& positions, const Tensor& swa_locs, Tensor& cache, int64_t page_size);

}  // namespace dsv4::kernels
