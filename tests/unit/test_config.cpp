#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/config/model_config.h"
#include "engine/config/presets.h"
#include "engine/config/runtime_options.h"
#include "engine/core/error.h"

namespace dsv4 {
namespace {

using json = nlohmann::json;

json tiny_json() { return json::parse(*find_preset("tiny")); }

// Expects parsing to fail with an InputError whose field is `field` and whose text names the source.
void expect_rejected(const json& j, const std::string& field, const std::string& rule_fragment = "") {
  try {
    parse_model_config(j.dump(), "cfg.json");
    FAIL() << "accepted; expected an error naming " << field;
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
    EXPECT_EQ(e.source(), "cfg.json");
    if (!rule_fragment.empty()) {
      EXPECT_NE(std::string(e.what()).find(rule_fragment), std::string::npos) << e.what();
    }
  }
}

TEST(Config, EveryPresetLoadsAndValidates) {
  for (const auto& name : preset_list()) {
    ModelConfig c = load_model_config(name);
    EXPECT_EQ(c.source, name);
    EXPECT_NO_THROW(validate_runtime_options(RuntimeOptions{}, c)) << name;
  }
}

TEST(Config, FlashHasTheReleasedShape) {
  ModelConfig c = load_model_config("flash");
  EXPECT_EQ(c.n_layers, 43);
  EXPECT_EQ(c.n_routed_experts, 256);
  int swa = 0, c4 = 0, c128 = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    switch (c.kind(l)) {
      case LayerKind::swa_only: ++swa; break;
      case LayerKind::c4_indexed: ++c4; break;
      case LayerKind::c128_pooled: ++c128; break;
    }
  }
  EXPECT_EQ(swa, 2);
  EXPECT_EQ(c4, 21);
  EXPECT_EQ(c128, 20);
  EXPECT_EQ(c.kind(43), LayerKind::swa_only);  // MTP
  EXPECT_DOUBLE_EQ(c.rope_factor, 16.0);
  EXPECT_EQ(c.original_seq_len, 65536);
  EXPECT_EQ(c.max_seq_len, 1048576);
}

TEST(Config, ProHasTheReleasedShape) {
  ModelConfig c = load_model_config("pro");
  EXPECT_EQ(c.n_layers, 61);
  EXPECT_EQ(c.ratio(0), 128);
  EXPECT_EQ(c.ratio(1), 128);
  EXPECT_EQ(c.ratio(60), 4);
  EXPECT_EQ(c.n_routed_experts, 384);
  EXPECT_DOUBLE_EQ(c.route_scale, 2.5);
}

TEST(Config, TinyAndMicroKeepEveryStructuralFeature) {
  for (const char* name : {"tiny", "micro"}) {
    ModelConfig c = load_model_config(name);
    bool swa = false, c4 = false, c128 = false, hash = false, score = false;
    for (int64_t l = 0; l < c.n_layers; ++l) {
      swa |= c.kind(l) == LayerKind::swa_only;
      c4 |= c.kind(l) == LayerKind::c4_indexed;
      c128 |= c.kind(l) == LayerKind::c128_pooled;
      hash |= c.is_hash_layer(l);
      score |= !c.is_hash_layer(l);
    }
    EXPECT_TRUE(swa && c4 && c128 && hash && score) << name;
    EXPECT_EQ(c.n_mtp_layers, 1) << name;
    EXPECT_FALSE(c.is_hash_layer(c.n_layers)) << "the MTP layer is never hash-routed";
  }
  ModelConfig micro = load_model_config("micro");
  EXPECT_EQ(micro.c128_ratio(), 16);
  EXPECT_EQ(micro.act_block_size, 32);
}

TEST(Config, BothNamingSchemesGiveTheSameConfig) {
  ModelConfig demo = load_model_config("tiny");
  json hf = {
      {"vocab_size", 1024}, {"hidden_size", 128}, {"num_hidden_layers", 5}, {"num_nextn_predict_layers", 1},
      {"num_attention_heads", 8}, {"num_key_value_heads", 1}, {"head_dim", 128}, {"qk_rope_head_dim", 64},
      {"q_lora_rank", 128}, {"o_groups", 2}, {"o_lora_rank", 64}, {"sliding_window", 128},
      {"compress_ratios", {0, 4, 128, 4, 128, 0}}, {"index_n_heads", 4}, {"index_head_dim", 128},
      {"index_topk", 64}, {"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"n_shared_experts", 1},
      {"moe_intermediate_size", 128}, {"num_hash_layers", 3}, {"scoring_func", "sqrtsoftplus"},
      {"routed_scaling_factor", 1.5}, {"swiglu_limit", 10.0}, {"rms_norm_eps", 1e-6},
      {"rope_scaling", {{"type", "yarn"}, {"factor", 16}, {"original_max_position_embeddings", 65536},
                        {"beta_fast", 32}, {"beta_slow", 1}}},
      {"max_position_embeddings", 1024}, {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"},
      {"quantization_config", {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}},
                               {"scale_fmt", "ue8m0"}, {"activation_scheme", "dynamic"}}}};
  ModelConfig from_hf = parse_model_config(hf.dump(), "hf.json");
  json a = model_config_to_json(demo);
  json b = model_config_to_json(from_hf);
  EXPECT_EQ(a, b) << a.dump() << "\n" << b.dump();
}

TEST(Config, RoundTripsThroughJson) {
  for (const auto& name : preset_list()) {
    ModelConfig c = load_model_config(name);
    ModelConfig again = parse_model_config(model_config_to_json(c).dump(), "again");
    EXPECT_EQ(model_config_to_json(c), model_config_to_json(again)) << name;
  }
}

TEST(Config, UnknownFieldsAreReportedNotDropped) {
  json j = tiny_json();
  j["n_expert_groups"] = 8;
  expect_rejected(j, "n_expert_groups", "unknown field");
  json k = tiny_json();
  k["rope_scaling"] = {{"type", "yarn"}, {"mscale", 1.0}};
  expect_rejected(k, "rope_scaling.mscale", "unknown field");
}

TEST(Config, AliasGivenTwiceIsRejected) {
  json j = tiny_json();
  j["hidden_size"] = 128;
  expect_rejected(j, "hidden_size", "given twice");
}

TEST(Config, MissingAndMistypedFieldsAreNamed) {
  json j = tiny_json();
  j.erase("q_lora_rank");
  expect_rejected(j, "q_lora_rank", "missing");
  json k = tiny_json();
  k["dim"] = "128";
  expect_rejected(k, "dim", "integer");
  json l = tiny_json();
  l["compress_ratios"] = {0, 4, "x"};
  expect_rejected(l, "compress_ratios[2]", "integer");
}

TEST(Config, StructuralRulesNameTheirField) {
  auto with = [](const char* key, json value) {
    json j = tiny_json();
    j[key] = std::move(value);
    return j;
  };
  expect_rejected(with("compress_ratios", {0, 4, 128, 4, 128}), "compress_ratios", "n_layers + n_mtp_layers");
  expect_rejected(with("compress_ratios", {0, 4, 128, 4, 64, 0}), "compress_ratios[4]", "share one ratio");
  expect_rejected(with("compress_ratios", {0, 4, 100, 4, 128, 0}), "compress_ratios[2]", "power of two");
  expect_rejected(with("compress_ratios", {0, 4, 128, 4, 128, 4}), "compress_ratios[5]", "MTP");
  expect_rejected(with("rope_head_dim", 63), "rope_head_dim", "even");
  expect_rejected(with("rope_head_dim", 96), "head_dim", "kv_block_size");
  expect_rejected(with("dim", 192), "dim", "act_block_size");
  expect_rejected(with("o_groups", 16), "o_groups", "divide n_heads");
  expect_rejected(with("n_shared_experts", 2), "n_shared_experts");
  expect_rejected(with("n_activated_experts", 9), "n_activated_experts");
  expect_rejected(with("index_head_dim", 96), "index_head_dim", "power of two");
  expect_rejected(with("score_func", "softmax"), "score_func");
  expect_rejected(with("window_size", 0), "window_size", ">= 1");
  expect_rejected(with("n_hash_layers", 6), "n_hash_layers");
  expect_rejected(with("scale_fmt", "fp32"), "scale_fmt");
}

TEST(Config, HuggingFaceFieldsWithAMeaningAreChecked) {
  json j = tiny_json();
  j["num_key_value_heads"] = 8;
  expect_rejected(j, "num_key_value_heads", "MQA");
  json k = tiny_json();
  k["tie_word_embeddings"] = true;
  expect_rejected(k, "tie_word_embeddings");
}

TEST(Config, BadJsonAndMissingFileNameTheSource) {
  try {
    parse_model_config("{\"dim\": ", "broken.json");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), "broken.json");
  }
  try {
    load_model_config("/nonexistent/dsv4.json");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("presets: flash, pro, small, tiny, micro"), std::string::npos);
  }
}

TEST(Config, LoadsFromAFile) {
  const std::string path = ::testing::TempDir() + "/dsv4_cfg.json";
  std::ofstream(path) << *find_preset("micro");
  ModelConfig c = load_model_config(path);
  EXPECT_EQ(c.source, path);
  EXPECT_EQ(c.dim, 64);
}

// --- runtime options ---

void expect_runtime_rejected(const RuntimeOptions& o, const char* preset, const std::string& field) {
  try {
    validate_runtime_options(o, load_model_config(preset), "flags");
    FAIL() << "accepted; expected an error naming " << field;
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

TEST(RuntimeOptions, SwaPageSizeZeroIsRejectedByName) {
  RuntimeOptions o;
  o.swa_page_size = 0;
  expect_runtime_rejected(o, "tiny", "swa_page_size");
}

TEST(RuntimeOptions, DivisibilityRules) {
  RuntimeOptions o;
  o.page_size = 64;  // compressed c128 pool pages would hold 0 entries
  expect_runtime_rejected(o, "tiny", "page_size");
  o = RuntimeOptions{};
  o.swa_page_size = 96;  // does not divide 256
  expect_runtime_rejected(o, "tiny", "swa_page_size");
  o = RuntimeOptions{};
  o.swa_page_size = 64;  // divides 256, but the c128 ring of 128 does not fit a page
  expect_runtime_rejected(o, "tiny", "swa_page_size");
  o = RuntimeOptions{};
  o.c4_ring_size = 6;
  expect_runtime_rejected(o, "tiny", "c4_ring_size");
  o = RuntimeOptions{};
  o.c128_ring_size = 100;
  expect_runtime_rejected(o, "tiny", "c128_ring_size");
  o = RuntimeOptions{};
  o.speculative = true;  // rings 16 and 256 still divide a 256-token SWA page
  EXPECT_NO_THROW(validate_runtime_options(o, load_model_config("tiny")));
  o.swa_page_size = 128;
  expect_runtime_rejected(o, "tiny", "swa_page_size");
  o = RuntimeOptions{};
  o.batch_buckets = {1, 4, 2};
  expect_runtime_rejected(o, "tiny", "batch_buckets");
  o = RuntimeOptions{};
  o.batch_buckets = {1, 128};
  expect_runtime_rejected(o, "tiny", "batch_buckets");
}

TEST(RuntimeOptions, MicroAcceptsSmallPages) {
  RuntimeOptions o;
  o.page_size = 32;
  o.swa_page_size = 16;
  EXPECT_NO_THROW(validate_runtime_options(o, load_model_config("micro")));
  o.swa_page_size = 1;  // the c16 ring does not fit
  expect_runtime_rejected(o, "micro", "swa_page_size");
}

TEST(RuntimeOptions, FlagsParseAndNameThemselves) {
  RuntimeOptions o;
  EXPECT_TRUE(apply_runtime_flag(o, "--swa-page-size", "128"));
  EXPECT_EQ(o.swa_page_size, 128);
  EXPECT_TRUE(apply_runtime_flag(o, "--batch-buckets", "1,2,8"));
  EXPECT_EQ(o.batch_buckets, (std::vector<int64_t>{1, 2, 8}));
  EXPECT_FALSE(apply_runtime_flag(o, "--config", "tiny"));
  try {
    apply_runtime_flag(o, "--page-size", "2x");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.source(), "--page-size");
    EXPECT_EQ(e.field(), "page_size");
  }
  EXPECT_THROW(apply_runtime_flag(o, "--batch-buckets", "1,,2"), InputError);
  EXPECT_THROW(apply_runtime_flag(o, "--speculative", "yes"), InputError);
}

}  // namespace
}  // namespace dsv4

#include "engine/config/cache_geometry.h"

namespace dsv4 {
namespace {

TEST(CacheGeometry, FlashUsesTheModel1Layout) {
  const CacheGeometry g = cache_geometry(load_model_config("flash"), RuntimeOptions{});
  EXPECT_EQ(g.kv_entry_bytes, 584);  // 448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad
  EXPECT_EQ(g.kv_value_bytes, 576);
  EXPECT_EQ(g.c4_entries_per_page, 64);
  EXPECT_EQ(g.c128_entries_per_page, 2);
  EXPECT_EQ(g.c4_ring_size, 8);
  EXPECT_EQ(g.c128_ring_size, 128);
  EXPECT_EQ(g.c4_state_row_bytes, 8192);  // |kv A|kv B|score A|score B| in fp32
}

TEST(CacheGeometry, IndexerKeyBytesFollowItsQuantization) {
  ModelConfig c = load_model_config("flash");
  c.indexer_quant = "fp8";
  EXPECT_EQ(cache_geometry(c, RuntimeOptions{}).indexer_key_bytes, 132);
  c.indexer_quant = "fp4";
  EXPECT_EQ(cache_geometry(c, RuntimeOptions{}).indexer_key_bytes, 68);
}

TEST(CacheGeometry, SpeculativeRingsDouble) {
  RuntimeOptions o;
  o.speculative = true;
  const CacheGeometry g = cache_geometry(load_model_config("flash"), o);
  EXPECT_EQ(g.c4_ring_size, 16);
  EXPECT_EQ(g.c128_ring_size, 256);
}

}  // namespace
}  // namespace dsv4
