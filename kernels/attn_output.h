// The attention output's kernels before wo_b (dsv4-model §2.7): inverse RoPE on each head's rope
// dims (V carries rotated rope dims), then the grouped low-rank projection wo_a.
//
// inverse_rope_inplace: per head, the last rope_dim = 2 * freqs.size() dims rotated by the conjugate:
//   (a, b) -> (a c - b s', a s' + b c) with s' = -sin(f32(pos) * freqs[j]), f32 math, bf16 results
//   (bit for bit reference/rope.cpp apply_rope(inverse = true)).
// grouped_wo_a: o viewed [T, G, W] with W = H * D / G (heads grouped contiguously), wo_a viewed
//   [G, r, W]; u[t, g * r + i] = bf16(Σ_k o[t, g W + k] * wo_a[g r + i, k]), bf16 x bf16 products exact
//   in f32, accumulated in f32 in k order (the GPU kernel's accumulator; the reference sums in f64, so
//   results may differ from it by one bf16 ulp near rounding boundaries).
//
// Contracts (ContractError naming the argument and the rule; every tensor on one device):
//   inverse_rope_inplace: o bf16 [T, heads * head_dim] contiguous, freqs f32 [rope_dim / 2] with
//     0 < rope_dim <= head_dim, positions i32 [T] in [0, 2^31 - 1].
//   grouped_wo_a: o bf16 rank 2 with unit last-dim stride, groups >= 1 dividing o.shape[1], wo_a bf16
//     [groups * r, o.shape[1] / groups] contiguous, out bf16 [T, groups * r] contiguous.
//   The positions range reads tensor data, so it is checked for host tensors only (a GPU kernel
//   rotates a negative position like any other).
//
// Devices: host tensors run the host kernels (kernels/host/attn_output.cpp), GPU tensors the CUDA
// kernels (kernels/cuda/attn_output.cu) on current_stream(); both write the same bits (the GPU's
// grouped_wo_a keeps one f32 accumulator per output, summed in k order like the host's).
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kInverseRopeOp = "inverse_rope_inplace";
inline constexpr const char* kGroupedWoAOp = "grouped_wo_a";

void inverse_rope_inplace(Tensor& o, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions);

void grouped_wo_a(const Tensor& o, const Tensor& wo_a, int64_t groups, Tensor& out);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
// The CUDA implementations (kernels/cuda/attn_output.cu), enqueued on `stream` (a cudaStream_t). The
// entry points above check the contracts and call them for GPU tensors.
namespace dsv4::kernels::cuda {
void inverse_rope_inplace(Tensor& o, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
                          void* stream);
void grouped_wo_a(const Tensor& o, const Tensor& wo_a, int64_t groups, Tensor& out, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
