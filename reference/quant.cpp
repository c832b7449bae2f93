#include "reference/quant.h"

#include <algorithm>
#include <cmath>

#include "engine/core/formats.h"

namespace dsv4::ref {

float fp8_block_scale(float amax) {
  const float clamped = std::max(amax, 1e-4f);
  // A multiply by the fp32 reciprocal (not a divide), then the smallest power of two above it.
  return round_ue8m0_ceil(clamped * (1.0f / 448.0f));
}

float fp4_block_scale(float amax) {
  const float clamped = std::max(amax, 6.0f * 0x1.0p-126f);
  return round_ue8m0_ceil(clamped * (1.0f / 6.0f));
}

void fp8_quant_dequant(float* x, int64_t n, int64_t block, bool round_to_e4m3) {
  for (int64_t b = 0; b < n; b += block) {
    const int64_t end = std::min(n, b + block);
    float amax = 0.0f;
    for (int64_t i = b; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = fp8_block_scale(amax);
    for (int64_t i = b; i < end; ++i) {
      const float q = std::clamp(x[i] / s, -448.0f, 448.0f);
      x[i] = (round_to_e4m3 ? round_e4m3fn(q) : q) * s;
    }
  }
}

void fp4_quant_dequant(float* x, int64_t n, int64_t block) {
  for (int64_t b = 0; b < n; b += block) {
    const int64_t end = std::min(n, b + block);
    float amax = 0.0f;
    for (int64_t i = b; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = fp4_block_scale(amax);
    for (int64_t i = b; i < end; ++i) x[i] = round_e2m1(std::clamp(x[i] / s, -6.0f, 6.0f)) * s;
  }
}

void fp8_quant_dequant_rows(Mat& m, int64_t block, bool round_to_e4m3) {
  for (int64_t r = 0; r < m.rows; ++r) fp8_quant_dequant(m.row(r), m.cols, block, round_to_e4m3);
}

void fp4_quant_dequant_rows(Mat& m, int64_t block) {
  for (int64_t r = 0; r < m.rows; ++r) fp4_quant_dequant(m.row(r), m.cols, block);
}

void round_bf16_inplace(Mat& m) {
  for (float& v : m.data) v = round_bf16(v);
}

}  // namespace dsv4::ref
