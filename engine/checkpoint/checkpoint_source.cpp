#include "engine/checkpoint/checkpoint_source.h"

#include "engine/checkpoint/synthetic_weights.h"
#include "engine/core/error.h"

namespace dsv4 {

CheckpointSource CheckpointSource::synthetic(const ModelConfig& config, uint64_t seed) {
  CheckpointSource s;
  s.config_ = &config;
  s.seed_ = seed;
  s.description_ = "synthetic seed " + std::to_string(seed);
  return s;
}

CheckpointSource CheckpointSource::file(const std::string& path) {
  CheckpointSource s;
  s.file_ = std::make_shared<SafetensorsFile>(SafetensorsFile::open(path));
  s.description_ = path;
  return s;
}

std::vector<uint8_t> CheckpointSource::bytes(const TensorSpec& spec) const {
  if (!file_) return synthetic_tensor_bytes(*config_, spec, seed_);
  const SafetensorsEntry& e = file_->at(spec.name);
  const auto dtype = dtype_from_safetensors(e.dtype);
  if (!dtype || *dtype != spec.dtype) {
    throw InputError(description_, spec.name,
                     "dtype " + e.dtype + ", the checkpoint layout needs " + std::string(safetensors_dtype_name(spec.dtype)));
  }
  if (e.shape != spec.shape) throw InputError(description_, spec.name, "shape differs from the config's layout");
  const auto span = file_->bytes(e);
  return std::vector<uint8_t>(span.begin(), span.end());
}

}  // namespace dsv4
