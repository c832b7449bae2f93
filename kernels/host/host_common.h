// Helpers shared by the host kernels (kernels/host): argument checks and the small numeric building
// blocks that several kernels apply to their own data layouts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/core/tensor.h"

namespace dsv4::kernels::host {

inline constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Host kernels touch host memory only: a device tensor is refused, naming the argument. An
// undefined tensor (an absent optional argument) passes; its contract decides about it.
inline void require_host(const char* op, const char* argument, const Tensor& t) {
  if (t.defined() && t.device().kind != DeviceKind::host) {
    throw ContractError(op, argument, "needs a host tensor, got one on " + t.device().str());
  }
}

// f32(1 / sqrt(mean(x^2) + eps)) with the squares summed in f64, as reference/norm.cpp does.
inline float inverse_rms(const float* x, int64_t n, double eps) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps));
}

// The normalised Walsh-Hadamard transform in Sylvester order, in place, n a power of two.
inline void hadamard_inplace(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

// e4m3 quantize-dequantize in blocks with ue8m0 scales (dsv4-model §2.9): amax clamped to 1e-4, the
// scale 2^ceil(log2(amax * f32(1/448))); `round_to_e4m3 = false` only clamps (the initial release).
inline void fp8_quant_dequant_blocks(float* x, int64_t n, int64_t block, bool round_to_e4m3) {
  for (int64_t b = 0; b < n; b += block) {
    const int64_t end = std::min(n, b + block);
    float amax = 0.0f;
    for (int64_t i = b; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = round_ue8m0_ceil(std::max(amax, 1e-4f) * (1.0f / 448.0f));
    for (int64_t i = b; i < end; ++i) {
      const float q = std::clamp(x[i] / s, -448.0f, 448.0f);
      x[i] = (round_to_e4m3 ? round_e4m3fn(q) : q) * s;
    }
  }
}

// e2m1 quantize-dequantize in blocks with ue8m0 scales: amax clamped to 6 * 2^-126.
inline void fp4_quant_dequant_blocks(float* x, int64_t n, int64_t block) {
  for (int64_t b = 0; b < n; b += block) {
    const int64_t end = std::min(n, b + block);
    float amax = 0.0f;
    for (int64_t i = b; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = round_ue8m0_ceil(std::max(amax, 6.0f * 0x1.0p-126f) * (1.0f / 6.0f));
    for (int64_t i = b; i < end; ++i) x[i] = round_e2m1(std::clamp(x[i] / s, -6.0f, 6.0f)) * s;
  }
}

}  // namespace dsv4::kernels::host
