// Deterministic synthetic DeepSeek-V4 weights for any config. Every element is a pure function of
// (seed, tensor name, element index), through a counter-based hash, so one element (and its block
// scale) can be computed alone and two runs or two machines agree bit for bit. Values are scaled so
// that activations stay O(1) through the model: matrices have variance 1/fan_in, norms sit near 1.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/config/model_config.h"

namespace dsv4 {

// 64 well-mixed bits for (seed, name, index).
uint64_t synthetic_hash(uint64_t seed, std::string_view name, uint64_t index);
// Uniform in [-1, 1), from synthetic_hash.
double synthetic_uniform(uint64_t seed, std::string_view name, uint64_t index);

// The ue8m0 code of block `block_index` of the scales paired with `weight` (an fp8_weight or
// fp4_weight spec, or its block_scale spec).
uint8_t synthetic_scale_code(const TensorSpec& spec, uint64_t seed, int64_t block_index);

// The tensor's bytes as the checkpoint stores them (dtype_storage_bytes of the stored shape).
std::vector<uint8_t> synthetic_tensor_bytes(const ModelConfig& config, const TensorSpec& spec, uint64_t seed);

// Writes every tensor of checkpoint_layout(config) to `path` (atomically), with metadata naming the
// generator, the seed and the config.
void write_synthetic_checkpoint(const ModelConfig& config, uint64_t seed, const std::string& path);

}  // namespace dsv4
