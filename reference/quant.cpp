#include "reference/quant.h"

#include <algorithm>
#include <cmath>
#include <limits>

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

float int8_quantize_row(const float* x, int64_t n, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    std::fill(q, q + n, int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  amax = std::max(amax, kInt8AmaxFloor);
  const float inv = kInt8Max / amax;
  for (int64_t i = 0; i < n; ++i) {
    const float scaled = x[i] * inv;  // rounded to f32 before the integer rounding
    // nearbyint rounds half to even in the default rounding mode; |scaled| <= 127 * (1 + 2^-23).
    q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(scaled), -kInt8Max, kInt8Max));
  }
  return amax / kInt8Max;
}

Int8Rows int8_quantize_rows(const Mat& m) {
  Int8Rows r;
  r.rows = m.rows;
  r.cols = m.cols;
  r.q.resize(static_cast<size_t>(m.rows * m.cols));
  r.scales.resize(static_cast<size_t>(m.rows));
  for (int64_t i = 0; i < m.rows; ++i) r.scales[static_cast<size_t>(i)] = int8_quantize_row(m.row(i), m.cols, r.q.data() + i * m.cols);
  return r;
}

}  // namespace dsv4::ref
