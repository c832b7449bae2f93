// The w8a8-int8 linear path (sglang's `--quantization w8a8_int8`, as its CPU backend runs DeepSeek):
// int8 weights per output channel with an f32 scale per channel, int8 activations per token with an
// f32 scale per token (dynamic), an exact integer accumulation, one bf16 rounding. The projection
// entry point that dispatches here is linear_projection (kernels/quant_gemm.h).
//
// Layouts:
//   x           [T, K]   bf16 or f32, last dim contiguous (rows may be padded)
//   q_act       [T, K]   i8, last dim contiguous
//   act_scales  [T]      f32, contiguous
//   w           [N, K]   i8, contiguous
//   w_scales    [N]      f32, contiguous
//   out         [T, N]   bf16, last dim contiguous
//
// Numerics (docs/numerics.md; reference/quant.h int8_quantize_row and reference/linear.h
// linear_w8a8_int8 are the same rules, and the host kernels equal them bit for bit):
//   quantize a row v[0, K) (a token of x, or a channel of the dequantized weight):
//     amax = max(max_k |v_k|, 1e-7)   s = f32(amax / 127)   inv = f32(127 / amax)
//     q_k  = clamp(rne(f32(v_k * inv)), -127, 127)            (round half to even)
//     An all-zero row: s = 1e-7 / 127, every q_k = 0. A token holding inf/NaN: s = NaN, q = 0.
//   GEMM: acc = Σ_k q_act[t, k] · w[n, k] in int32 (exact: K · 128² must fit, K <= kInt8MaxK),
//         out[t, n] = bf16((f32(acc) * act_scales[t]) * w_scales[n])   (two f32 multiplies, in
//         that order, no FMA; f32(acc) rounds to nearest even once |acc| > 2^24).
//
// Devices: act_quant_int8, gemm_int8_per_channel (and linear_projection's int8 path) take tensors
// that all live on one device (else a ContractError naming the first that differs): host tensors run
// kernels/host/int8_gemm.cpp, GPU tensors kernels/cuda/int8_gemm.cu on current_stream(), bit for bit
// the same results. quantize_weight_int8 is an offline step on host tensors only.
//
// Contract violations (dtype, rank, shape, contiguity, K too large, non-finite weights) are
// ContractErrors naming the argument.
#pragma once

#include <cstdint>
#include <limits>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr float kInt8AmaxFloor = 1e-7f;  // the amax clamp of a row (sglang's eps)
// The largest K whose int32 accumulation is exact for any i8 codes (|q| <= 128): K · 128² <= 2^31 - 1.
inline constexpr int64_t kInt8MaxK = std::numeric_limits<int32_t>::max() / (128 * 128);

// x [T, K] bf16/f32 -> q [T, K] i8, scales [T] f32, one scale per token (row).
void act_quant_int8(const Tensor& x, Tensor& q, Tensor& scales);

// The offline requantization of a checkpoint weight: w_dequantized [N, K] f32 (the FP8/FP4 weight
// times its block scales, as reference/weights.h dequantizes it; last dim contiguous, finite) ->
// q [N, K] i8 and scales [N] f32, one per output channel, by the same row rule as the activations.
struct Int8Weight {
  Tensor q;
  Tensor scales;
};
Int8Weight quantize_weight_int8(const Tensor& w_dequantized);

// out [T, N] = q_act [T, K] · w [N, K]^T with a scale per token and per output channel (see above).
void gemm_int8_per_channel(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out);

#if defined(DSV4_WITH_CUDA)
// The GPU implementations (kernels/cuda/int8_gemm.cu), enqueued on `stream` (a cudaStream_t /
// hipStream_t). They assume the entry point's contract checks have passed and never synchronize.
namespace cuda {
void act_quant_int8(const Tensor& x, Tensor& q, Tensor& scales, void* stream);
void gemm_int8_per_channel(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, void* stream);
// linear_projection's int8 path: act_quant_int8 into scratch, then gemm_int8_per_channel.
void linear_int8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out, void* stream);
}  // namespace cuda
#endif

}  // namespace dsv4::kernels
