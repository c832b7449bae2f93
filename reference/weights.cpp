#include "reference/weights.h"

#include <cstring>
#include <functional>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/checkpoint_source.h"
#include "engine/checkpoint/dequantize.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4::ref {

namespace {

using BytesOf = std::function<std::vector<uint8_t>(const TensorSpec&)>;

Mat dense(const TensorSpec& spec, const std::vector<uint8_t>& bytes) {
  const int64_t rows = spec.shape.empty() ? 1 : (spec.shape.size() == 1 ? 1 : spec.shape[0]);
  int64_t n = 1;
  for (int64_t d : spec.shape) n *= d;
  Mat m(rows, rows == 0 ? 0 : n / rows);
  for (int64_t i = 0; i < n; ++i) m.data[static_cast<size_t>(i)] = static_cast<float>(load_element_f64(spec.dtype, bytes.data(), i));
  return m;
}

Mat as_mat(int64_t rows, std::vector<float> values) {
  Mat m;
  m.rows = rows;
  m.cols = rows == 0 ? 0 : static_cast<int64_t>(values.size()) / rows;
  m.data = std::move(values);
  return m;
}

std::map<std::string, Mat> load(const ModelConfig& config, const BytesOf& bytes_of) {
  const std::vector<TensorSpec> layout = checkpoint_layout(config);
  std::map<std::string, const TensorSpec*> by_name;
  for (const auto& s : layout) by_name[s.name] = &s;
  std::map<std::string, Mat> out;
  for (const TensorSpec& spec : layout) {
    switch (spec.role) {
      case TensorRole::block_scale:
        break;  // folded into its weight
      case TensorRole::fp8_weight: {
        const TensorSpec& scale = *by_name.at(spec.weight_name);
        out[spec.name] = as_mat(spec.shape[0], dequantize_fp8_weight(spec, bytes_of(spec), bytes_of(scale), config.weight_block_size));
        break;
      }
      case TensorRole::fp4_weight: {
        const TensorSpec& scale = *by_name.at(spec.weight_name);
        out[spec.name] = as_mat(spec.shape[0], dequantize_fp4_weight(spec, bytes_of(spec), bytes_of(scale), config.fp4_block_size));
        break;
      }
      default:
        out[spec.name] = dense(spec, bytes_of(spec));
        break;
    }
  }
  return out;
}

}  // namespace

Weights Weights::from_file(const ModelConfig& config, const std::string& path) {
  const CheckpointSource source = CheckpointSource::file(path);
  Weights w;
  w.tensors_ = load(config, [&](const TensorSpec& spec) { return source.bytes(spec); });
  return w;
}

Weights Weights::synthetic(const ModelConfig& config, uint64_t seed) {
  const CheckpointSource source = CheckpointSource::synthetic(config, seed);
  Weights w;
  w.tensors_ = load(config, [&](const TensorSpec& spec) { return source.bytes(spec); });
  return w;
}

const Mat& Weights::get(const std::string& name) const {
  auto it = tensors_.find(name);
  DSV4_ASSERT(it != tensors_.end(), "no tensor named " + name);
  return it->second;
}

}  // namespace dsv4::ref
