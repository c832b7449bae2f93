// The KV path's fused norm + RoPE (dsv4-model §2.2; sglang fused_norm_rope_inplace and
// fused_k_norm_rope_flashmla) and the FP8 "MODEL1" paged cache entry it writes (§5), which
// sparse_attention (kernels/sparse_attention.h) reads back.
//
// Per row of kv [T, D] bf16: RMSNorm with weight (sum of squares accumulated wider than the
// inputs, one inverse rms per row, y = bf16(x * r * w)), then interleaved RoPE on the last
// rope_dim = 2 * freqs.size() dims at positions[t]: pair j of the rope part, (a, b), becomes
// (a cos - b sin, a sin + b cos) with angle f32(pos) * freqs[j], computed in f32 and rounded to bf16.
//
// MODEL1 entry (D = nope + rope, nope a multiple of the scale block B: the config's kv_block_size,
// 64 on the released models (kKvScaleBlock), 16 on the micro preset):
//   values: | nope e4m3, one ue8m0 scale per B dims | rope bf16 little-endian |  nope + 2 rope B
//   scales: | ue8m0 x nope / B | 0-pad to a multiple of 8 B |                     8 B on Flash
// A page of page_size entries is every entry's values, then every entry's scales, padded to a
// multiple of the value stride (256 x 576 + 256 x 8 -> 149760 B on Flash). Location loc lives in
// page loc / page_size, slot loc % page_size. The block scale is the e4m3 ue8m0 rule of §2.9:
// 2^ceil(log2(max(amax, 1e-4) * f32(1/448))). engine/serving/kv_cache_layout.h packs and unpacks
// entries through model1_pack_entry / model1_unpack_entry below: one codec for both.
//
// Contracts (ContractError naming the argument and the rule):
//   fused_norm_rope_inplace: kv bf16 rank 2 CONTIGUOUS (PyTorch's rule: T = 1 passes whatever its
//     row stride), weight f32 [D], freqs f32 [rope_dim / 2] with 0 < rope_dim <= D, positions i32 [T]
//     with values >= 0; all on one device. The kernel indexes rows as t * D on either device (bug
//     class A1: a strided slice qkv_a[..., q_lora:] must be rejected, never misread).
//   fused_norm_rope_store_kv: as above but kv only needs a unit last-dim stride (any row stride);
//     swa_locs i64 [T] with values in [-1, pages * page_size) (-1: write nothing); cache u8
//     [pages, page_bytes(page_size)] contiguous; page_size >= 1; scale_block >= 1 with
//     (D - rope_dim) % scale_block == 0 (else a ContractError naming `scale_block`).
//   store_kv_model1: the store half of fused_norm_rope_store_kv alone, for rows already normed and
//     rotated (prefill CP norms its share in place, all-gathers it and stores the whole batch): each
//     row with locs[t] >= 0 is packed as it is at that location (model1_pack of the values
//     f32(kv[t]): the rope dims' bf16 codes come back unchanged, but for a signalling NaN, quieted).
//     kv bf16 [T, D] with a unit last-dim stride (any row stride); rope_dim even with 0 <= rope_dim < D (else a ContractError naming
//     `rope_dim`; the last rope_dim dims are the rope part); locs i64 [T] with values in
//     [-1, pages * page_size); cache, page_size and scale_block as for fused_norm_rope_store_kv.
//   The value rules (positions >= 0, the swa_locs / locs range) read tensor data, so they are
//   checked for host tensors only; on a GPU a location outside [0, pages * page_size) writes nothing
//   (as -1) and a negative position is rotated like any other. When two rows name one location the
//   later row's entry is written, on either device.
//
// Devices: host tensors run the host kernels (kernels/host/norm_rope.cpp), GPU tensors the CUDA
// kernels (kernels/cuda/norm_rope.cu) on current_stream(); they write the same bits (the GPU's f64
// sum of squares runs in another order: kernels/cuda/norm_rope_math.h says when that can matter;
// store_kv_model1 has no sum: equal for every input but NaN nope values, whose e4m3 NaN code may
// take another sign, as each device's division propagates a NaN).
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kNormRopeOp = "fused_norm_rope_inplace";
inline constexpr const char* kNormRopeStoreOp = "fused_norm_rope_store_kv";
inline constexpr const char* kStoreKvModel1Op = "store_kv_model1";
inline constexpr int64_t kKvScaleBlock = 64;  // nope dims per ue8m0 scale on the released models

// Byte geometry of one MODEL1 entry and page (the GPU kernel's constants, derived from D, rope_dim
// and the scale block).
struct Model1Layout {
  int64_t head_dim = 0;
  int64_t rope_dim = 0;
  int64_t scale_block = kKvScaleBlock;  // nope dims per ue8m0 scale (the config's kv_block_size)
  int64_t nope_dim() const { return head_dim - rope_dim; }
  int64_t scale_count() const { return nope_dim() / scale_block; }
  int64_t value_bytes() const { return nope_dim() + 2 * rope_dim; }
  int64_t scale_bytes() const { return (scale_count() + 7) / 8 * 8; }
  int64_t page_bytes(int64_t page_size) const {
    const int64_t raw = page_size * (value_bytes() + scale_bytes());
    return (raw + value_bytes() - 1) / value_bytes() * value_bytes();
  }
};

// Throws ContractError(op, "cache", ...) unless 0 <= rope_dim < head_dim, and
// ContractError(op, block_argument, ...) unless scale_block >= 1 divides head_dim - rope_dim.
Model1Layout model1_layout(const char* op, int64_t head_dim, int64_t rope_dim, int64_t scale_block = kKvScaleBlock,
                           const char* block_argument = "scale_block");

// The power-of-two scale of one e4m3 block (§2.9): 2^ceil(log2(max(amax, 1e-4) * f32(1/448))).
float e4m3_block_scale(float amax);

// Packs one entry (head_dim floats, nope then rope) into its value bytes (value_bytes()) and scale
// bytes (scale_bytes(), the pad written as 0); touches nothing else.
void model1_pack_entry(const Model1Layout& layout, const float* kv, uint8_t* values, uint8_t* scales);
// Dequantizes one entry into head_dim floats (e4m3 * scale exactly, rope from bf16).
void model1_unpack_entry(const Model1Layout& layout, const uint8_t* values, const uint8_t* scales, float* kv);

// Packs one entry (head_dim floats, nope then rope) at `loc` of a contiguous byte cache.
void model1_pack(const Model1Layout& layout, int64_t page_size, const float* kv, uint8_t* cache, int64_t loc);
// Dequantizes the entry at `loc` into head_dim floats (e4m3 * scale exactly, rope from bf16).
void model1_unpack(const Model1Layout& layout, int64_t page_size, const uint8_t* cache, int64_t loc, float* kv);

void check_norm_rope_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs, const Tensor& positions);
void fused_norm_rope_inplace(Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                             const Tensor& positions);

void check_norm_rope_store_contract(const Tensor& kv, const Tensor& weight, const Tensor& freqs,
                                    const Tensor& positions, const Tensor& swa_locs, const Tensor& cache,
                                    int64_t page_size, int64_t scale_block = kKvScaleBlock);
// kv is read only; each row with swa_locs[t] >= 0 is normed, rotated and packed at that location
// with one ue8m0 scale per scale_block nope dims (pass the config's kv_block_size).
void fused_norm_rope_store_kv(const Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                              const Tensor& positions, const Tensor& swa_locs, Tensor& cache, int64_t page_size,
                              int64_t scale_block = kKvScaleBlock);

// kv is read only; each row with locs[t] >= 0 is packed as it is at that location (no norm, no RoPE),
// with one ue8m0 scale per scale_block nope dims. store_kv_model1 of the rows fused_norm_rope_inplace
// leaves writes fused_norm_rope_store_kv's bytes for the same rows.
void store_kv_model1(const Tensor& kv, int64_t rope_dim, const Tensor& locs, Tensor& cache, int64_t page_size,
                     int64_t scale_block = kKvScaleBlock);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
// The CUDA implementations (kernels/cuda/norm_rope.cu), enqueued on `stream` (a cudaStream_t). The
// entry points above check the contracts and call them for GPU tensors.
namespace dsv4::kernels::cuda {
void fused_norm_rope_inplace(Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                             const Tensor& positions, void* stream);
void fused_norm_rope_store_kv(const Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                              const Tensor& positions, const Tensor& swa_locs, Tensor& cache, int64_t page_size,
                              int64_t scale_block, void* stream);
void store_kv_model1(const Tensor& kv, int64_t rope_dim, const Tensor& locs, Tensor& cache, int64_t page_size,
                     int64_t scale_block, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
