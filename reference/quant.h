// Quantize-dequantize, exactly where and how the official inference code does it (dsv4-model §2.9).
// All in fp32; scales are powers of two (ue8m0), so dequantization is exact.
#pragma once

#include <cstdint>

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

}  // namespace dsv4::ref
