#include "engine/model/device_weights.h"

#include <cstring>

#include "engine/core/error.h"
#include "engine/checkpoint/dequantize.h"
#include "engine/core/formats.h"
#include "kernels/int8_gemm.h"

namespace dsv4::engine {

DeviceWeights::DeviceWeights(rt::Runtime& runtime, int device, const ModelConfig& config,
                             const CheckpointSource& source, const std::function<bool(const std::string&)>& keep,
                             bool int8)
    : runtime_(runtime) {
  const std::vector<TensorSpec> layout = checkpoint_layout(config);
  std::map<std::string, const TensorSpec*> by_name;
  for (const TensorSpec& spec : layout) by_name[spec.name] = &spec;
  auto add = [&](const std::string& name, DType dtype, Shape shape, const void* data, size_t bytes) {
    Entry e;
    e.dtype = dtype;
    e.shape = std::move(shape);
    e.buffer = runtime_.alloc(device, bytes, name, dtype == DType::f32 ? DType::f32 : DType::u8);
    runtime_.upload(e.buffer, 0, data, bytes);
    total_bytes_ += bytes;
    entries_.emplace(name, std::move(e));
  };
  for (const TensorSpec& spec : layout) {
    if (keep && !keep(spec.name)) continue;
    const bool quantized = spec.role == TensorRole::fp8_weight || spec.role == TensorRole::fp4_weight;
    if (int8 && spec.role == TensorRole::block_scale) continue;  // replaced with the channel scales
    if (int8 && quantized) {
      const TensorSpec& scale = *by_name.at(spec.weight_name);
      const bool fp8 = spec.role == TensorRole::fp8_weight;
      std::vector<float> w = fp8 ? dequantize_fp8_weight(spec, source.bytes(spec), source.bytes(scale), config.weight_block_size)
                                 : dequantize_fp4_weight(spec, source.bytes(spec), source.bytes(scale), config.fp4_block_size);
      const int64_t N = spec.shape[0], K = static_cast<int64_t>(w.size()) / N;
      Tensor dense = Tensor::empty({N, K}, DType::f32, spec.name);
      std::memcpy(dense.data_ptr(), w.data(), w.size() * 4);
      const kernels::Int8Weight q = kernels::quantize_weight_int8(dense);
      add(spec.name, DType::i8, {N, K}, q.q.data_ptr(), static_cast<size_t>(N * K));
      add(spec.weight_name, DType::f32, {N}, q.scales.data_ptr(), static_cast<size_t>(N) * 4);
      continue;
    }
    std::vector<uint8_t> bytes = source.bytes(spec);
    DType dtype = spec.dtype;
    if (spec.role == TensorRole::norm_weight && spec.dtype != DType::f32) {
      // Widen to f32 (exact for bf16): the norm kernels take f32 weights.
      const int64_t n = shape_numel(spec.shape);
      std::vector<uint8_t> wide(static_cast<size_t>(n) * 4);
      for (int64_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(load_element_f64(spec.dtype, bytes.data(), i));
        std::memcpy(wide.data() + i * 4, &v, 4);
      }
      bytes = std::move(wide);
      dtype = DType::f32;
    }
    add(spec.name, dtype, spec.shape, bytes.data(), bytes.size());
  }
}

DeviceWeights::~DeviceWeights() {
  // As ~ModelRunner: a queued launch failing again after a failed step must not escape.
  for (auto& [name, e] : entries_) {
    try {
      runtime_.free(e.buffer);
    } catch (const std::exception&) {
    }
  }
}

const DeviceWeights::Entry& DeviceWeights::entry(const std::string& name) const {
  auto it = entries_.find(name);
  DSV4_ASSERT(it != entries_.end(), "no weight named " + name);
  return it->second;
}

Tensor DeviceWeights::get(const std::string& name) const {
  const Entry& e = entry(name);
  return runtime_.tensor(e.buffer, e.dtype, e.shape);
}

}  // namespace dsv4::engine
