// Rotary embedding (dsv4-model §2.2, §2.8): the last rope_dim dims of a vector are rope_dim/2
// interleaved complex pairs (x[2j], x[2j+1]) rotated by pos * f_j. Ratio-0 layers use rope_theta
// without scaling; compressed layers (and their indexer and compressors) use compress_rope_theta
// with YaRN. The layer's ratio alone picks the table.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/config/model_config.h"

namespace dsv4::ref {

struct RopeTable {
  int64_t rope_dim = 0;
  std::vector<float> freqs;  // f_j, j < rope_dim / 2, fp32
};

RopeTable make_rope_table(const ModelConfig& config, int64_t ratio);

// Rotates the rope_dim values at `x` (the rope part of a vector) for position `pos`, in fp32;
// `inverse` uses the conjugate rotation. The caller rounds the result to its dtype.
void apply_rope(float* x, int64_t pos, const RopeTable& table, bool inverse);

}  // namespace dsv4::ref
