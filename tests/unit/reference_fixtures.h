// Shared by the reference's unit tests: deterministic inputs and a config with synthetic weights.
#pragma once

#include <cstdint>
#include <string>

#include "engine/config/model_config.h"
#include "reference/context.h"
#include "reference/quant.h"
#include "reference/tensor.h"
#include "reference/weights.h"

namespace dsv4::ref::testing {

// Deterministic values in [-2, 2] (xorshift), rounded to bf16 in quant-sim where inputs are bf16.
inline Mat make_input(int64_t rows, int64_t cols, uint64_t seed, Mode mode) {
  Mat x(rows, cols);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& v : x.data) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    v = static_cast<float>(static_cast<double>(s >> 11) * 0x1.0p-53 * 4.0 - 2.0);
  }
  if (mode == Mode::quant_sim) round_bf16_inplace(x);
  return x;
}

// A preset's config and synthetic weights of one seed.
struct Model {
  Model(const std::string& preset, uint64_t seed) : config(load_model_config(preset)), weights(Weights::synthetic(config, seed)) {}
  ModelConfig config;
  Weights weights;
};

}  // namespace dsv4::ref::testing
