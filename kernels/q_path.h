// The query path's element-wise kernels (dsv4-model §0, §2.1, §2.5 items 2-4): RMSNorm with weight
// (attn_norm, ffn_norm, q_norm, ...), the weightless per-head q norm fused with RoPE (sglang
// fused_q_norm_rope), and the indexer query's RoPE + Hadamard + FP4/FP8 quant-dequant simulation.
//
// Numerics (equal to reference/norm.cpp, rope.cpp, hadamard.h, quant.cpp bit for bit):
//   RMS: sum of squares of the bf16 inputs accumulated in f64, r = f32(1 / sqrt(sum / n + eps)),
//     y = bf16(x * r [* w]) with f32 products.
//   RoPE: pair j of the last rope_dim = 2 * freqs.size() dims, (a, b) -> (a cos - b sin, a sin + b cos),
//     angle f32(pos) * freqs[j] in f32, each result rounded to bf16.
//   indexer_q, per head: RoPE on the last rope dims -> bf16; normalised Walsh-Hadamard over head_dim in
//     f32 (Sylvester order, butterfly, then * f32(1/sqrt(n))) -> bf16; quant-dequant in blocks of
//     `block`: fp4 s = ue8m0ceil(max(amax, 6 * 2^-126) * f32(1/6)), x = e2m1(clamp(x/s, +-6)) * s;
//     fp8 s = ue8m0ceil(max(amax, 1e-4) * f32(1/448)), x = e4m3(clamp(x/s, +-448)) * s; -> bf16.
//     The official QAT is fp4 with block 32; sglang's default fp8 has one scale per head (block = head_dim).
//
// Contracts (ContractError naming the argument and the rule; every tensor on one device):
//   rms_norm: x bf16 rank 2 with a unit last-dim stride (rows may be sliced out of a wider buffer),
//     weight f32 [n], out bf16 [T, n] contiguous (may not alias a strided x).
//   q_norm_rope_inplace / indexer_q: q bf16 [T, heads * head_dim] CONTIGUOUS (the GPU kernels index
//     q + t * H * D; a strided view is refused, never misread); heads, head_dim >= 1;
//     freqs f32 [rope_dim / 2] with 0 < rope_dim <= head_dim; positions i32 [T] in [0, 2^31 - 1].
//   indexer_q also: head_dim a power of two (Hadamard), 1 <= block, head_dim % block == 0.
//   The positions range reads tensor data, so it is checked for host tensors only (a GPU kernel
//   rotates a negative position like any other).
//
// Devices: host tensors run the host kernels (kernels/host/q_path.cpp), GPU tensors the CUDA
// kernels (kernels/cuda/q_path.cu) on current_stream(); they write the same bits (the GPU's f64
// sum of squares runs in another order: kernels/cuda/norm_rope_math.h says when that can matter).
// The GPU indexer_q holds a head in shared memory: head_dim <= 8192 there (ContractError beyond).
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kRmsNormOp = "rms_norm";
inline constexpr const char* kQNormRopeOp = "q_norm_rope_inplace";
inline constexpr const char* kIndexerQOp = "indexer_q";

enum class IndexerQuant { fp4, fp8 };

void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& out);

void q_norm_rope_inplace(Tensor& q, int64_t heads, int64_t head_dim, double eps, const Tensor& freqs,
                         const Tensor& positions);

void indexer_q(Tensor& q, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
               IndexerQuant quant, int64_t block);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
// The CUDA implementations (kernels/cuda/q_path.cu), enqueued on `stream` (a cudaStream_t). The
// entry points above check the contracts and call them for GPU tensors.
namespace dsv4::kernels::cuda {
void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& out, void* stream);
void q_norm_rope_inplace(Tensor& q, int64_t heads, int64_t head_dim, double eps, const Tensor& freqs,
                         const Tensor& positions, void* stream);
void indexer_q(Tensor& q, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
               IndexerQuant quant, int64_t block, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
