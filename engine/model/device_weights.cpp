#include "engine/model/device_weights.h"

#include <cstring>

#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4::engine {

DeviceWeights::DeviceWeights(rt::Runtime& runtime, int device, const ModelConfig& config,
                             const CheckpointSource& source, const std::function<bool(const std::string&)>& keep)
    : runtime_(runtime) {
  for (const TensorSpec& spec : checkpoint_layout(config)) {
    if (keep && !keep(spec.name)) continue;
    std::vector<uint8_t> bytes = source.bytes(spec);
    Entry e;
    e.dtype = spec.dtype;
    e.shape = spec.shape;
    if (spec.role == TensorRole::norm_weight && spec.dtype != DType::f32) {
      // Widen to f32 (exact for bf16): the norm kernels take f32 weights.
      const int64_t n = shape_numel(spec.shape);
      std::vector<uint8_t> wide(static_cast<size_t>(n) * 4);
      for (int64_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(load_element_f64(spec.dtype, bytes.data(), i));
        std::memcpy(wide.data() + i * 4, &v, 4);
      }
      bytes = std::move(wide);
      e.dtype = DType::f32;
    }
    const DType poison = e.dtype == DType::f32 ? DType::f32 : DType::u8;
    e.buffer = runtime_.alloc(device, bytes.size(), spec.name, poison);
    runtime_.upload(e.buffer, 0, bytes.data(), bytes.size());
    total_bytes_ += bytes.size();
    entries_.emplace(spec.name, std::move(e));
  }
}

DeviceWeights::~DeviceWeights() {
  for (auto& [name, e] : entries_) runtime_.free(e.buffer);
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
