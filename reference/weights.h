// The model's parameters as the reference uses them: every tensor of the checkpoint layout,
// dequantized to f32 (FP8 weights times their 128x128 block scales, FP4 experts times their 1x32
// scales, bf16 upcast). Loaded from a safetensors file or generated in memory from a seed (the same
// values `dsv4h weights` writes).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "engine/config/model_config.h"
#include "reference/tensor.h"

namespace dsv4::ref {

class Weights {
 public:
  // InputError(path, tensor, ...) when a tensor is missing or has the wrong dtype or shape.
  static Weights from_file(const ModelConfig& config, const std::string& path);
  static Weights synthetic(const ModelConfig& config, uint64_t seed);

  // The dequantized tensor: [rows, cols] for matrices (fp4 unpacked to its logical width), one row
  // for vectors, [dim0, rest] for higher ranks. Asserts that it exists.
  const Mat& get(const std::string& name) const;
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  size_t size() const { return tensors_.size(); }

 private:
  std::map<std::string, Mat> tensors_;
};

}  // namespace dsv4::ref
