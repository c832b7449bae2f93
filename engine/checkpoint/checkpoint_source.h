// Where a model's parameters come from: a safetensors checkpoint or the synthetic generator. Both
// hand out each tensor of checkpoint_layout(config) as the checkpoint stores it (dtype and shape of
// the TensorSpec), so the reference and the engine load weights through one validated path.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/safetensors.h"

namespace dsv4 {

class CheckpointSource {
 public:
  // The synthetic weights of `seed` (the values `dsv4h weights` writes).
  static CheckpointSource synthetic(const ModelConfig& config, uint64_t seed);
  // A safetensors file; InputError(path, ...) when it cannot be opened or parsed.
  static CheckpointSource file(const std::string& path);

  // The stored bytes of one tensor. InputError(path, tensor name, ...) when the file lacks it or
  // stores it with another dtype or shape than the layout needs.
  std::vector<uint8_t> bytes(const TensorSpec& spec) const;
  // "synthetic seed N" or the path: what error messages and reports name.
  const std::string& description() const { return description_; }

 private:
  CheckpointSource() = default;
  const ModelConfig* config_ = nullptr;
  uint64_t seed_ = 0;
  std::shared_ptr<SafetensorsFile> file_;
  std::string description_;
};

}  // namespace dsv4
