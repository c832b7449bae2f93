#include "engine/checkpoint/dequantize.h"

#include "engine/core/formats.h"

namespace dsv4 {

std::vector<float> dequantize_fp8_weight(const TensorSpec& w, const std::vector<uint8_t>& codes,
                                         const std::vector<uint8_t>& scales, int64_t block) {
  const int64_t out = w.shape[0], in = w.shape[1];
  const int64_t scale_cols = (in + block - 1) / block;
  std::vector<float> m(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c) {
      const float s = ue8m0_to_f32(scales[static_cast<size_t>((r / block) * scale_cols + c / block)]);
      m[static_cast<size_t>(r * in + c)] = e4m3fn_to_f32(codes[static_cast<size_t>(r * in + c)]) * s;
    }
  }
  return m;
}

std::vector<float> dequantize_fp4_weight(const TensorSpec& w, const std::vector<uint8_t>& packed,
                                         const std::vector<uint8_t>& scales, int64_t block) {
  const int64_t out = w.shape[0], in = w.shape[1] * 2;
  std::vector<float> m(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c) {
      const float s = ue8m0_to_f32(scales[static_cast<size_t>(r * (in / block) + c / block)]);
      m[static_cast<size_t>(r * in + c)] = e2m1_to_f32(fp4_get(packed.data(), r * in + c)) * s;
    }
  }
  return m;
}

}  // namespace dsv4
