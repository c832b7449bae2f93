// The model's parameters in runtime buffers, in the layouts the kernels take: FP8 weights as e4m3
// codes with their ue8m0 block scales, FP4 experts as packed e2m1 bytes with 1 x fp4_block scales,
// bf16 and f32 tensors as stored, except RMSNorm weights, which are widened once to f32 (exactly)
// because every norm kernel takes an f32 weight. One buffer per tensor, named after it, so hazard
// and guard reports name the parameter.
#pragma once

#include <functional>
#include <map>
#include <string>

#include "engine/checkpoint/checkpoint_source.h"
#include "engine/runtime/runtime.h"

namespace dsv4::engine {

class DeviceWeights {
 public:
  // `keep` selects the tensors to load (a pipeline stage holds only its own); all when empty. With
  // `int8`, every FP8 and FP4 weight is dequantized and requantized per output channel (w8a8-int8,
  // kernels/int8_gemm.h): "X.weight" becomes i8 [N, K] and "X.scale" f32 [N].
  DeviceWeights(rt::Runtime& runtime, int device, const ModelConfig& config, const CheckpointSource& source,
                const std::function<bool(const std::string&)>& keep = {}, bool int8 = false);
  ~DeviceWeights();
  DeviceWeights(const DeviceWeights&) = delete;
  DeviceWeights& operator=(const DeviceWeights&) = delete;

  struct Entry {
    rt::BufferId buffer;
    DType dtype = DType::f32;
    Shape shape;
  };
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  const Entry& entry(const std::string& name) const;  // asserts that it exists
  // The tensor as a kernel argument (its whole buffer).
  Tensor get(const std::string& name) const;
  rt::BufferId buffer(const std::string& name) const { return entry(name).buffer; }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  rt::Runtime& runtime_;
  std::map<std::string, Entry> entries_;
  uint64_t total_bytes_ = 0;
};

}  // namespace dsv4::engine
