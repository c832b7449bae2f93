// The normalised Walsh-Hadamard transform (dsv4-model §2.4): y = (x H) n^-1/2 with H the
// Sylvester-ordered +-1 matrix, H[i][j] = (-1)^popcount(i & j). n is a power of two. fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "engine/core/error.h"

namespace dsv4::ref {

inline void hadamard_inplace(float* x, int64_t n) {
  DSV4_ASSERT(n > 0 && (n & (n - 1)) == 0, "hadamard size must be a power of two");
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

}  // namespace dsv4::ref
