#include "engine/config/presets.h"

#include <map>

#include <nlohmann/json.hpp>

namespace dsv4 {

namespace {

using json = nlohmann::json;

std::vector<int64_t> repeat_pair(std::vector<int64_t> head, int64_t a, int64_t b, int times,
                                 std::vector<int64_t> tail) {
  for (int i = 0; i < times; ++i) {
    head.push_back(a);
    head.push_back(b);
  }
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

// Released models, in Hugging Face's naming (dsv4-model §1), so the HF path is exercised too.
json released(int64_t hidden, int64_t layers, int64_t heads, int64_t q_lora, int64_t o_groups,
              std::vector<int64_t> ratios, int64_t topk, int64_t experts, int64_t inter,
              double route_scale) {
  return json{
      {"architectures", {"DeepseekV4ForCausalLM"}},
      {"model_type", "deepseek_v4"},
      {"vocab_size", 129280},
      {"hidden_size", hidden},
      {"num_hidden_layers", layers},
      {"num_nextn_predict_layers", 1},
      {"num_attention_heads", heads},
      {"num_key_value_heads", 1},
      {"head_dim", 512},
      {"qk_rope_head_dim", 64},
      {"q_lora_rank", q_lora},
      {"o_groups", o_groups},
      {"o_lora_rank", 1024},
      {"sliding_window", 128},
      {"compress_ratios", ratios},
      {"index_n_heads", 64},
      {"index_head_dim", 128},
      {"index_topk", topk},
      {"n_routed_experts", experts},
      {"num_experts_per_tok", 6},
      {"n_shared_experts", 1},
      {"moe_intermediate_size", inter},
      {"num_hash_layers", 3},
      {"scoring_func", "sqrtsoftplus"},
      {"topk_method", "noaux_tc"},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", route_scale},
      {"swiglu_limit", 10.0},
      {"hc_mult", 4},
      {"hc_sinkhorn_iters", 20},
      {"hc_eps", 1e-6},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 10000},
      {"compress_rope_theta", 160000},
      {"rope_scaling",
       {{"type", "yarn"}, {"factor", 16}, {"original_max_position_embeddings", 65536},
        {"beta_fast", 32}, {"beta_slow", 1}}},
      {"max_position_embeddings", 1048576},
      {"tie_word_embeddings", false},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
      {"quantization_config",
       {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
        {"scale_fmt", "ue8m0"}, {"weight_block_size", {128, 128}}}},
      {"expert_dtype", "fp4"},
  };
}

// Scaled-down configs, in the inference demo's naming.
json demo_style(int64_t vocab, int64_t dim, std::vector<int64_t> ratios, int64_t heads, int64_t head_dim,
                int64_t rope_dim, int64_t q_lora, int64_t o_groups, int64_t o_lora, int64_t window,
                int64_t index_heads, int64_t index_dim, int64_t topk, int64_t experts, int64_t active,
                int64_t inter, int64_t max_seq_len) {
  const int64_t n_layers = static_cast<int64_t>(ratios.size()) - 1;
  return json{
      {"vocab_size", vocab},       {"dim", dim},
      {"n_layers", n_layers},      {"n_mtp_layers", 1},
      {"n_heads", heads},          {"head_dim", head_dim},
      {"rope_head_dim", rope_dim}, {"q_lora_rank", q_lora},
      {"o_groups", o_groups},      {"o_lora_rank", o_lora},
      {"window_size", window},     {"compress_ratios", ratios},
      {"index_n_heads", index_heads}, {"index_head_dim", index_dim},
      {"index_topk", topk},        {"n_routed_experts", experts},
      {"n_activated_experts", active}, {"n_shared_experts", 1},
      {"moe_inter_dim", inter},    {"n_hash_layers", 3},
      {"score_func", "sqrtsoftplus"}, {"route_scale", 1.5},
      {"swiglu_limit", 10.0},      {"hc_mult", 4},
      {"hc_sinkhorn_iters", 20},   {"hc_eps", 1e-6},
      {"norm_eps", 1e-6},          {"rope_theta", 10000.0},
      {"compress_rope_theta", 160000.0}, {"rope_factor", 16.0},
      {"original_seq_len", 65536}, {"beta_fast", 32},
      {"beta_slow", 1},            {"max_seq_len", max_seq_len},
      {"dtype", "fp8"},            {"scale_fmt", "ue8m0"},
      {"expert_dtype", "fp4"},
  };
}

const std::map<std::string, std::string>& presets() {
  static const std::map<std::string, std::string> table = [] {
    std::map<std::string, std::string> t;
    t["flash"] = released(4096, 43, 64, 1024, 8, repeat_pair({0, 0}, 4, 128, 20, {4, 0}), 512, 256,
                          2048, 1.5)
                     .dump(2);
    t["pro"] = released(7168, 61, 128, 1536, 16, repeat_pair({128, 128}, 4, 128, 29, {4, 0}), 1024,
                        384, 3072, 2.5)
                   .dump(2);
    t["small"] = demo_style(129280, 4096, {0, 0, 4, 128, 4, 128, 4, 128, 0}, 64, 512, 64, 1024, 8,
                            1024, 128, 64, 128, 512, 64, 6, 2048, 65536)
                     .dump(2);
    t["tiny"] = demo_style(1024, 128, {0, 4, 128, 4, 128, 0}, 8, 128, 64, 128, 2, 64, 128, 4, 128,
                           64, 8, 2, 128, 1024)
                    .dump(2);
    // micro keeps every structure (window, c4 + indexer, non-overlapping c16 standing in for c128,
    // hash and score routing, MTP) at sizes where one end-to-end case costs microseconds.
    json micro = demo_style(256, 64, {0, 4, 16, 4, 16, 0}, 4, 64, 16, 64, 2, 32, 16, 2, 32, 4, 4, 2,
                            64, 256);
    micro["weight_block_size"] = 32;
    micro["act_block_size"] = 32;
    micro["kv_block_size"] = 16;
    micro["fp4_block_size"] = 16;
    t["micro"] = micro.dump(2);
    return t;
  }();
  return table;
}

}  // namespace

const std::string* find_preset(const std::string& name) {
  auto it = presets().find(name);
  return it == presets().end() ? nullptr : &it->second;
}

std::vector<std::string> preset_list() {
  return {"flash", "pro", "small", "tiny", "micro"};
}

std::string preset_names() {
  std::string out;
  for (const auto& n : preset_list()) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace dsv4
