#include "reference/rope.h"

#include <algorithm>
#include <cmath>

namespace dsv4::ref {

RopeTable make_rope_table(const ModelConfig& c, int64_t ratio) {
  RopeTable t;
  t.rope_dim = c.rope_head_dim;
  const int64_t pairs = c.rope_head_dim / 2;
  const double base = ratio == 0 ? c.rope_theta : c.compress_rope_theta;
  t.freqs.resize(static_cast<size_t>(pairs));
  for (int64_t j = 0; j < pairs; ++j) {
    // f_j = base^(-2j / rope_dim), computed in fp32 as the official code does.
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(c.rope_head_dim);
    t.freqs[static_cast<size_t>(j)] = 1.0f / std::pow(static_cast<float>(base), exponent);
  }
  if (ratio == 0) return t;
  // YaRN: frequencies below the correction range are divided by the factor, above it kept, and
  // blended linearly in between.
  const double two_pi = 2.0 * M_PI;
  auto correction_dim = [&](double rotations) {
    return static_cast<double>(c.rope_head_dim) * std::log(static_cast<double>(c.original_seq_len) / (rotations * two_pi)) /
           (2.0 * std::log(base));
  };
  const double lo = std::max(std::floor(correction_dim(c.beta_fast)), 0.0);
  double hi = std::min(std::ceil(correction_dim(c.beta_slow)), static_cast<double>(c.rope_head_dim - 1));
  if (hi == lo) hi += 0.001;
  for (int64_t j = 0; j < pairs; ++j) {
    const double ramp = std::clamp((static_cast<double>(j) - lo) / (hi - lo), 0.0, 1.0);
    const float smooth = static_cast<float>(1.0 - ramp);
    const float f = t.freqs[static_cast<size_t>(j)];
    t.freqs[static_cast<size_t>(j)] = f / static_cast<float>(c.rope_factor) * (1.0f - smooth) + f * smooth;
  }
  return t;
}

void apply_rope(float* x, int64_t pos, const RopeTable& table, bool inverse) {
  const int64_t pairs = table.rope_dim / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const float angle = static_cast<float>(pos) * table.freqs[static_cast<size_t>(j)];
    const float c = std::cos(angle);
    const float s = inverse ? -std::sin(angle) : std::sin(angle);
    const float a = x[2 * j], b = x[2 * j + 1];
    x[2 * j] = a * c - b * s;
    x[2 * j + 1] = a * s + b * c;
  }
}

}  // namespace dsv4::ref
