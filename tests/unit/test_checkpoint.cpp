#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/checkpoint/synthetic_weights.h"
#include "engine/config/model_config.h"
#include "engine/core/formats.h"

namespace dsv4 {
namespace {

std::map<std::string, TensorSpec> by_name(const std::vector<TensorSpec>& specs) {
  std::map<std::string, TensorSpec> out;
  for (const auto& s : specs) out.emplace(s.name, s);
  return out;
}

TEST(CheckpointLayout, TinyMatchesTheInferenceDemo) {
  const ModelConfig c = load_model_config("tiny");
  const auto specs = checkpoint_layout(c);
  EXPECT_EQ(specs.size(), 502u);
  const auto m = by_name(specs);
  ASSERT_EQ(m.size(), specs.size()) << "names must be unique";
  auto expect = [&](const std::string& name, std::vector<int64_t> shape, DType dtype) {
    auto it = m.find(name);
    ASSERT_NE(it, m.end()) << name;
    EXPECT_EQ(it->second.shape, shape) << name;
    EXPECT_EQ(it->second.dtype, dtype) << name;
  };
  expect("embed.weight", {1024, 128}, DType::bf16);
  expect("head.weight", {1024, 128}, DType::bf16);
  expect("hc_head_fn", {4, 512}, DType::f32);
  expect("hc_head_scale", {1}, DType::f32);
  expect("layers.0.hc_attn_fn", {24, 512}, DType::f32);
  expect("layers.0.attn.wq_b.weight", {1024, 128}, DType::f8_e4m3fn);
  expect("layers.0.attn.wq_b.scale", {8, 1}, DType::ue8m0);
  expect("layers.0.attn.wo_a.weight", {128, 512}, DType::bf16);
  expect("layers.0.ffn.gate.tid2eid", {1024, 2}, DType::i32);
  expect("layers.0.ffn.experts.7.w2.weight", {128, 64}, DType::i8);
  expect("layers.0.ffn.experts.7.w2.scale", {128, 4}, DType::ue8m0);
  expect("layers.1.attn.compressor.ape", {4, 256}, DType::f32);
  expect("layers.1.attn.indexer.wq_b.weight", {512, 128}, DType::f8_e4m3fn);
  expect("layers.1.attn.indexer.compressor.ape", {4, 256}, DType::f32);
  expect("layers.2.attn.compressor.ape", {128, 128}, DType::f32);
  expect("layers.3.ffn.gate.bias", {8}, DType::f32);
  expect("mtp.0.e_proj.weight", {128, 128}, DType::f8_e4m3fn);
  expect("mtp.0.hc_head_base", {4}, DType::f32);
  expect("mtp.0.ffn.gate.bias", {8}, DType::f32);
  EXPECT_EQ(m.count("layers.2.attn.indexer.wq_b.weight"), 0u) << "c128 layers have no indexer";
  EXPECT_EQ(m.count("layers.0.attn.compressor.ape"), 0u) << "ratio-0 layers have no compressor";
  EXPECT_EQ(m.count("layers.3.ffn.gate.tid2eid"), 0u) << "score-routed layers have no hash table";
  EXPECT_EQ(m.count("mtp.0.ffn.gate.tid2eid"), 0u) << "the MTP layer is never hash-routed";
  EXPECT_EQ(m.count("mtp.0.embed.weight"), 0u) << "embed and head are shared";
  EXPECT_EQ(specs.front().name, "hc_head_fn");
  EXPECT_EQ(specs.back().name, "mtp.0.norm.weight");
}

TEST(CheckpointLayout, FlashParameterCountMatchesTheRelease) {
  const ParameterCount p = count_parameters(load_model_config("flash"));
  const double main_b = static_cast<double>(p.total - p.mtp) / 1e9;
  EXPECT_GT(main_b, 283.0);  // released: 284B total, 13B activated
  EXPECT_LT(main_b, 286.0);
  EXPECT_GT(p.activated / 1e9, 12.0);
  EXPECT_LT(p.activated / 1e9, 16.0);
}

TEST(SyntheticWeights, EveryElementIsAFunctionOfSeedNameAndIndex) {
  EXPECT_EQ(synthetic_hash(1, "a", 5), synthetic_hash(1, "a", 5));
  EXPECT_NE(synthetic_hash(1, "a", 5), synthetic_hash(2, "a", 5));
  EXPECT_NE(synthetic_hash(1, "a", 5), synthetic_hash(1, "b", 5));
  EXPECT_NE(synthetic_hash(1, "a", 5), synthetic_hash(1, "a", 6));
  double lo = 1, hi = -1, sum = 0;
  for (int i = 0; i < 100000; ++i) {
    const double u = synthetic_uniform(7, "t", static_cast<uint64_t>(i));
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    sum += u;
  }
  EXPECT_GE(lo, -1.0);
  EXPECT_LT(hi, 1.0);
  EXPECT_NEAR(sum / 100000, 0.0, 0.01);
}

TEST(SyntheticWeights, Fp8WeightsDequantizeToVarianceOneOverFanIn) {
  const ModelConfig c = load_model_config("tiny");
  const auto m = by_name(checkpoint_layout(c));
  const TensorSpec& w = m.at("layers.0.attn.wq_b.weight");
  const TensorSpec& s = m.at("layers.0.attn.wq_b.scale");
  const auto wb = synthetic_tensor_bytes(c, w, 3);
  const auto sb = synthetic_tensor_bytes(c, s, 3);
  ASSERT_EQ(wb.size(), 1024u * 128u);
  ASSERT_EQ(sb.size(), 8u);
  std::set<uint8_t> codes(sb.begin(), sb.end());
  EXPECT_GE(codes.size(), 2u) << "block scales must differ, or a kernel using the wrong block passes";
  double sq = 0;
  for (int64_t r = 0; r < 1024; ++r) {
    const float scale = ue8m0_to_f32(sb[static_cast<size_t>(r / 128)]);
    for (int64_t k = 0; k < 128; ++k) {
      const double v = e4m3fn_to_f32(wb[static_cast<size_t>(r * 128 + k)]) * scale;
      EXPECT_LE(std::fabs(v), std::sqrt(3.0 / 128) * 1.07);
      sq += v * v;
    }
  }
  EXPECT_NEAR(std::sqrt(sq / (1024.0 * 128)), 1.0 / std::sqrt(128.0), 0.15 / std::sqrt(128.0));
  // The same bytes again, and one element computed alone agrees with the tensor.
  EXPECT_EQ(synthetic_tensor_bytes(c, w, 3), wb);
  EXPECT_NE(synthetic_tensor_bytes(c, w, 4), wb);
  EXPECT_EQ(synthetic_scale_code(w, 3, 5), sb[5]);
}

TEST(SyntheticWeights, Fp4ExpertsPackLowNibbleFirstWithRowScales) {
  const ModelConfig c = load_model_config("tiny");
  const auto m = by_name(checkpoint_layout(c));
  const TensorSpec& w = m.at("layers.3.ffn.experts.2.w1.weight");
  const auto wb = synthetic_tensor_bytes(c, w, 1);
  const auto sb = synthetic_tensor_bytes(c, m.at("layers.3.ffn.experts.2.w1.scale"), 1);
  ASSERT_EQ(wb.size(), 128u * 64u);
  ASSERT_EQ(sb.size(), 128u * 4u);
  int nonzero = 0;
  for (int64_t r = 0; r < 128; ++r) {
    for (int64_t k = 0; k < 128; ++k) {
      const float scale = ue8m0_to_f32(sb[static_cast<size_t>(r * 4 + k / 32)]);
      const double v = e2m1_to_f32(fp4_get(wb.data(), r * 128 + k)) * scale;
      EXPECT_LE(std::fabs(v), std::sqrt(3.0 / 128) * 1.5);
      nonzero += v != 0.0;
    }
  }
  EXPECT_GT(nonzero, 128 * 128 / 2);
}

TEST(SyntheticWeights, HashTableRowsHoldDistinctExperts) {
  const ModelConfig c = load_model_config("tiny");
  const auto m = by_name(checkpoint_layout(c));
  const auto bytes = synthetic_tensor_bytes(c, m.at("layers.0.ffn.gate.tid2eid"), 9);
  std::vector<int32_t> table(bytes.size() / 4);
  std::memcpy(table.data(), bytes.data(), bytes.size());
  std::set<int32_t> seen_first;
  for (size_t row = 0; row < 1024; ++row) {
    const int32_t a = table[row * 2], b = table[row * 2 + 1];
    EXPECT_NE(a, b);
    EXPECT_GE(std::min(a, b), 0);
    EXPECT_LT(std::max(a, b), 8);
    seen_first.insert(a);
  }
  EXPECT_EQ(seen_first.size(), 8u) << "every expert is someone's first choice";
}

TEST(SyntheticWeights, NormsSitNearOne) {
  const ModelConfig c = load_model_config("tiny");
  const auto m = by_name(checkpoint_layout(c));
  const auto bytes = synthetic_tensor_bytes(c, m.at("layers.0.attn_norm.weight"), 1);
  for (size_t i = 0; i < 128; ++i) {
    uint16_t code;
    std::memcpy(&code, bytes.data() + 2 * i, 2);
    const float v = bf16_to_f32(code);
    EXPECT_GE(v, 0.74f);
    EXPECT_LE(v, 1.26f);
  }
}

TEST(SyntheticWeights, WrittenCheckpointReadsBackWithEveryTensor) {
  const ModelConfig c = load_model_config("micro");
  const std::string path = ::testing::TempDir() + "/dsv4_micro.safetensors";
  write_synthetic_checkpoint(c, 11, path);
  const SafetensorsFile file = SafetensorsFile::open(path);
  const auto specs = checkpoint_layout(c);
  ASSERT_EQ(file.entries().size(), specs.size());
  for (const auto& s : specs) {
    const SafetensorsEntry& e = file.at(s.name);
    EXPECT_EQ(e.shape, s.shape) << s.name;
    EXPECT_EQ(dtype_from_safetensors(e.dtype), s.dtype) << s.name;
    const auto bytes = file.bytes(e);
    const auto expected = synthetic_tensor_bytes(c, s, 11);
    ASSERT_EQ(bytes.size(), expected.size()) << s.name;
    EXPECT_EQ(std::memcmp(bytes.data(), expected.data(), expected.size()), 0) << s.name;
  }
  EXPECT_EQ(file.metadata().at("seed"), "11");
  EXPECT_EQ(file.at("layers.0.attn.wq_a.weight").dtype, "F8_E4M3");
  EXPECT_EQ(file.at("layers.0.attn.wq_a.scale").dtype, "F8_E8M0");
  EXPECT_EQ(file.at("layers.0.ffn.experts.0.w1.weight").dtype, "I8");
  EXPECT_EQ(file.at("layers.0.ffn.gate.tid2eid").dtype, "I32");
  // The embedded config loads back to the same model.
  const ModelConfig again = parse_model_config(file.metadata().at("config"), path);
  EXPECT_EQ(model_config_to_json(again), model_config_to_json(c));
}

}  // namespace
}  // namespace dsv4
