#include "engine/checkpoint/synthetic_weights.h"

#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "engine/checkpoint/safetensors.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4 {

namespace {

uint64_t mix64(uint64_t z) {
  // splitmix64's finalizer: a bijection with full avalanche.
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t fnv1a64(std::string_view text) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (char ch : text) {
    h ^= static_cast<uint8_t>(ch);
    h *= 0x100000001b3ULL;
  }
  return h;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Largest magnitude of a matrix with variance 1/fan_in drawn uniformly: sqrt(3 / fan_in).
double matrix_bound(int64_t fan_in) { return std::sqrt(3.0 / static_cast<double>(fan_in)); }

// synthetic_hash for one (seed, name), with the name hashed once: the generators below draw every
// element of a tensor from it (hashing the name per element made the tiny checkpoint take 0.7 s).
class NameStream {
 public:
  NameStream(uint64_t seed, std::string_view name) : key_(mix64(seed ^ fnv1a64(name))) {}
  uint64_t hash(uint64_t index) const { return mix64(key_ + index * 0x9e3779b97f4a7c15ULL); }
  double uniform(uint64_t index) const { return static_cast<double>(hash(index) >> 11) * 0x1.0p-52 - 1.0; }

 private:
  uint64_t key_;
};

// The dense value of element `index` for the roles stored as plain floats.
double dense_value(const TensorSpec& spec, const NameStream& values, int64_t index) {
  const double u = values.uniform(static_cast<uint64_t>(index));
  switch (spec.role) {
    case TensorRole::dense_weight:
      // embed has no fan-in: its rows are the residual stream's O(1) input.
      return spec.fan_in > 0 ? u * matrix_bound(spec.fan_in) : u;
    case TensorRole::norm_weight:
      return 1.0 + 0.25 * u;
    case TensorRole::sink:
      return 2.0 * u;
    case TensorRole::bias:
      if (ends_with(spec.name, "_scale")) return 0.625 + 0.375 * u;  // hc mix scales in [0.25, 1]
      if (ends_with(spec.name, "gate.bias")) return 0.1 * u;
      return 0.5 * u;  // hc bases, compressor ape
    default:
      DSV4_ASSERT(false, "not a dense role: " + spec.name);
  }
}

void store_float(DType dtype, uint8_t* out, int64_t index, double value) {
  if (dtype == DType::f32) {
    const float f = static_cast<float>(value);
    std::memcpy(out + 4 * index, &f, 4);
  } else if (dtype == DType::bf16) {
    const uint16_t b = f32_to_bf16(static_cast<float>(value));
    std::memcpy(out + 2 * index, &b, 2);
  } else {
    DSV4_ASSERT(false, "dense tensors are f32 or bf16");
  }
}

struct BlockFormat {
  double max_value;
  int exponent_spread;  // scales vary by 2^[0, spread) across blocks, so a wrong block shows
};

BlockFormat block_format(DType scaled) {
  if (scaled == DType::f8_e4m3fn) return {448.0, 3};
  DSV4_ASSERT(scaled == DType::f4_e2m1, "block scales cover e4m3fn or e2m1 values");
  return {6.0, 2};
}

// Columns of the logical (unpacked) weight and blocks per row of its scales.
struct BlockGeometry {
  int64_t rows, cols, block_rows, block_cols, scale_cols;
};

BlockGeometry geometry(const ModelConfig& c, const TensorSpec& weight) {
  BlockGeometry g{};
  g.rows = weight.shape[0];
  if (weight.role == TensorRole::fp4_weight) {
    g.cols = weight.shape[1] * 2;
    g.block_rows = 1;
    g.block_cols = c.fp4_block_size;
  } else {
    g.cols = weight.shape[1];
    g.block_rows = c.weight_block_size;
    g.block_cols = c.weight_block_size;
  }
  g.scale_cols = (g.cols + g.block_cols - 1) / g.block_cols;
  return g;
}

}  // namespace

uint64_t synthetic_hash(uint64_t seed, std::string_view name, uint64_t index) {
  return NameStream(seed, name).hash(index);
}

double synthetic_uniform(uint64_t seed, std::string_view name, uint64_t index) {
  return NameStream(seed, name).uniform(index);
}

namespace {

// The scale codes of one block-scaled weight (its fp8_weight / fp4_weight spec or its block_scale
// spec): the smallest power of two that maps the weight's bound into the format, raised per block.
class ScaleCodes {
 public:
  ScaleCodes(const TensorSpec& spec, uint64_t seed) : stream_(seed, scale_stream_name(spec)) {
    const bool is_scale = spec.role == TensorRole::block_scale;
    const DType scaled = is_scale ? spec.scaled_dtype
                                  : (spec.role == TensorRole::fp8_weight ? DType::f8_e4m3fn : DType::f4_e2m1);
    const BlockFormat fmt = block_format(scaled);
    base_ = f32_to_ue8m0_ceil(static_cast<float>(matrix_bound(spec.fan_in) / fmt.max_value));
    spread_ = static_cast<uint64_t>(fmt.exponent_spread);
  }
  uint8_t code(int64_t block_index) const {
    return static_cast<uint8_t>(base_ + stream_.hash(static_cast<uint64_t>(block_index)) % spread_);
  }

 private:
  static std::string scale_stream_name(const TensorSpec& spec) {
    const bool is_scale = spec.role == TensorRole::block_scale;
    DSV4_ASSERT(is_scale || spec.role == TensorRole::fp8_weight || spec.role == TensorRole::fp4_weight,
                "scale codes belong to block-scaled weights: " + spec.name);
    return (is_scale ? spec.weight_name : spec.name) + "#scale";
  }
  NameStream stream_;
  uint8_t base_ = 0;
  uint64_t spread_ = 1;
};

}  // namespace

uint8_t synthetic_scale_code(const TensorSpec& spec, uint64_t seed, int64_t block_index) {
  return ScaleCodes(spec, seed).code(block_index);
}

std::vector<uint8_t> synthetic_tensor_bytes(const ModelConfig& config, const TensorSpec& spec, uint64_t seed) {
  const int64_t n = numel(spec.shape);
  std::vector<uint8_t> out(static_cast<size_t>(dtype_storage_bytes(spec.dtype, n)), 0);
  switch (spec.role) {
    case TensorRole::fp8_weight:
    case TensorRole::fp4_weight: {
      const BlockGeometry g = geometry(config, spec);
      const double bound = matrix_bound(spec.fan_in);
      const ScaleCodes codes(spec, seed);
      const NameStream values(seed, spec.name);
      std::vector<float> row_scales(static_cast<size_t>(g.scale_cols));
      for (int64_t r = 0; r < g.rows; ++r) {
        if (r % g.block_rows == 0) {
          for (int64_t b = 0; b < g.scale_cols; ++b) {
            row_scales[static_cast<size_t>(b)] = ue8m0_to_f32(codes.code((r / g.block_rows) * g.scale_cols + b));
          }
        }
        for (int64_t col = 0; col < g.cols; ++col) {
          const int64_t logical = r * g.cols + col;
          const float scale = row_scales[static_cast<size_t>(col / g.block_cols)];
          const double value = values.uniform(static_cast<uint64_t>(logical)) * bound;
          const float scaled = static_cast<float>(value / scale);
          if (spec.role == TensorRole::fp8_weight) {
            out[static_cast<size_t>(logical)] = f32_to_e4m3fn(scaled);
          } else {
            fp4_set(out.data(), logical, f32_to_e2m1(scaled));
          }
        }
      }
      break;
    }
    case TensorRole::block_scale: {
      const ScaleCodes codes(spec, seed);
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = codes.code(i);
      break;
    }
    case TensorRole::hash_table: {
      // Each row holds distinct experts (a partial Fisher-Yates shuffle driven by the hash), since the
      // reference's scatter-add would drop one of two equal experts.
      const int64_t k = spec.shape[1];
      const int64_t experts = config.n_routed_experts;
      DSV4_ASSERT(k <= experts, "tid2eid needs k distinct experts");
      std::vector<int32_t> perm(static_cast<size_t>(experts));
      const NameStream picks(seed, spec.name);
      for (int64_t row = 0; row < spec.shape[0]; ++row) {
        for (int64_t e = 0; e < experts; ++e) perm[static_cast<size_t>(e)] = static_cast<int32_t>(e);
        for (int64_t j = 0; j < k; ++j) {
          const uint64_t h = picks.hash(static_cast<uint64_t>(row * k + j));
          const int64_t pick = j + static_cast<int64_t>(h % static_cast<uint64_t>(experts - j));
          std::swap(perm[static_cast<size_t>(j)], perm[static_cast<size_t>(pick)]);
          std::memcpy(out.data() + 4 * (row * k + j), &perm[static_cast<size_t>(j)], 4);
        }
      }
      break;
    }
    default: {
      const NameStream values(seed, spec.name);
      for (int64_t i = 0; i < n; ++i) store_float(spec.dtype, out.data(), i, dense_value(spec, values, i));
      break;
    }
  }
  return out;
}

void write_synthetic_checkpoint(const ModelConfig& config, uint64_t seed, const std::string& path) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.set_metadata("generator", "dsv4-harness synthetic weights v1");
  writer.set_metadata("seed", std::to_string(seed));
  writer.set_metadata("config", model_config_to_json(config).dump());
  for (const TensorSpec& spec : checkpoint_layout(config)) {
    writer.add(spec.name, spec.dtype, spec.shape, synthetic_tensor_bytes(config, spec, seed));
  }
  writer.write(path);
}

}  // namespace dsv4
