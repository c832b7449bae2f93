// y = x W^T, with the official code's numerics per kind of linear (dsv4-model §2.9, §3).
#pragma once

#include "reference/context.h"
#include "reference/tensor.h"

namespace dsv4::ref {

enum class LinearKind {
  fp8,   // FP8 weights: x is FP8-quantized per 1 x act_block_size, y is bf16 (quant-sim)
  fp4,   // FP4 routed experts: the same activation quantization, y is bf16 (quant-sim)
         // (both: w8a8-int8 instead when Numerics::linear says so, see linear_w8a8_int8)
  bf16,  // a bf16 x bf16 product with a bf16 result, no activation quantization (wo_a, weights_proj)
  f32,   // an fp32 GEMM on the upcast input, fp32 result (gate, compressor wkv/wgate, head)
};

// x [T, in], w [out, in] (dequantized). Exact mode: every kind is a plain f32 product. Dot products
// accumulate in fp64 and round once to f32.
Mat linear(const Context& ctx, const Mat& x, const Mat& w, LinearKind kind);

// The w8a8-int8 product, what quant-sim runs for the fp8 and fp4 kinds under LinearQuant::w8a8_int8:
// w requantized per output channel and x per token by int8_quantize_row (reference/quant.h), then
//   y[t, n] = bf16((f32(acc) * s_x[t]) * s_w[n]),  acc = Σ_k q_x[t, k] · q_w[n, k] as an exact integer,
// two f32 multiplies in that order (acc converted once, round to nearest even), one bf16 rounding.
Mat linear_w8a8_int8(const Mat& x, const Mat& w);

}  // namespace dsv4::ref
