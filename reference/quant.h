// Quantize-dequantize, exactly where and how the official inference code does it (dsv4-model §2.9).
// All in fp32; scales are powers of two (ue8m0), so dequantization is exact.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/tensor.h"

namespace dsv4::ref {

// The ue8m0 scale of a block: 2^ceil(log2(amax * fp32(1/fmt_max))), amax clamped from below.
float fp8_block_scale(float amax);  // amax >= 1e-4, fmt max 448
float fp4_block_scale(float amax);  // amax >= 6 * 2^-126, fmt max 6

// In place over `n` values in blocks of `block`: x <- e4m3(clamp(x / s, -448, 448)) * s.
// `round_to_e4m3 = false` reproduces the initial release (clamp only, no FP8 rounding).
void fp8_quant_dequant(float* x, int64_t n, int64_t block, bool round_to_e4m3 = true);
// In place: x <- e2m1(clamp(x / s, -6, 6)) * s, blocks of `block`.
void fp4_quant_dequant(float* x, int64_t n, int64_t block);

// Every row of m, blocks along the row.
void fp8_quant_dequant_rows(Mat& m, int64_t block, bool round_to_e4m3 = true);
void fp4_quant_dequant_rows(Mat& m, int64_t block);

// Rounds every element to bf16 (round to nearest even).
void round_bf16_inplace(Mat& m);

// ---- symmetric int8 per row (w8a8-int8: weights per output channel, activations per token) -----
//
// One rule for both operands (docs/numerics.md), the one sglang's CPU kernel applies to a token:
//   amax = max(max_i |x_i|, kInt8AmaxFloor)           (an all-zero row gets amax = the floor)
//   s    = f32(amax / 127)                            the row's scale
//   inv  = f32(127 / amax)                            its reciprocal, rounded on its own
//   q_i  = clamp(rne(f32(x_i * inv)), -127, 127)      rne = round half to even; -128 never occurs
// A row holding an infinity or a NaN gets s = NaN and q = 0, so every output of that row is NaN.
inline constexpr float kInt8AmaxFloor = 1e-7f;
inline constexpr float kInt8Max = 127.0f;

// Quantizes x[0, n) into q[0, n); returns the scale.
float int8_quantize_row(const float* x, int64_t n, int8_t* q);

// Every row of m: q [rows * cols] row-major, one scale per row.
struct Int8Rows {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int8_t> q;
  std::vector<float> scales;
  int8_t at(int64_t r, int64_t c) const { return q[static_cast<size_t>(r * cols + c)]; }
};
Int8Rows int8_quantize_rows(const Mat& m);

}  // namespace dsv4::ref
