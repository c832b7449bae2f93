// The DeepSeek-V4 model configuration: one struct for both naming schemes (the inference demo's
// `inference/config.json` and Hugging Face's `config.json`), validated once at load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv4 {

// How a layer's attention sees the past (dsv4-model §2): the window only, the window plus the
// indexer-selected overlapping ratio-4 entries, or the window plus every non-overlapping entry.
enum class LayerKind { swa_only, c4_indexed, c128_pooled };

struct ModelConfig {
  std::string source;  // preset name or file path, for error messages and `info`

  int64_t vocab_size = 0;
  int64_t dim = 0;
  int64_t n_layers = 0;
  int64_t n_mtp_layers = 1;
  int64_t n_heads = 0;
  int64_t head_dim = 0;
  int64_t rope_head_dim = 0;
  int64_t q_lora_rank = 0;
  int64_t o_groups = 0;
  int64_t o_lora_rank = 0;
  int64_t window_size = 0;
  std::vector<int64_t> compress_ratios;  // n_layers + n_mtp_layers entries (at least)

  int64_t index_n_heads = 0;
  int64_t index_head_dim = 0;
  int64_t index_topk = 0;

  int64_t n_routed_experts = 0;
  int64_t n_activated_experts = 0;
  int64_t n_shared_experts = 1;
  int64_t moe_inter_dim = 0;
  int64_t n_hash_layers = 0;
  std::string score_func = "sqrtsoftplus";
  double route_scale = 1.0;
  double swiglu_limit = 0.0;
  bool clamp_shared_expert = true;  // the current official code clamps the shared expert too

  int64_t hc_mult = 4;
  int64_t hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double norm_eps = 1e-6;

  double rope_theta = 10000.0;
  double compress_rope_theta = 160000.0;
  double rope_factor = 16.0;
  int64_t original_seq_len = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  int64_t max_seq_len = 0;

  // Quantization (dsv4-model §2.9). The block sizes are fields so that `micro` can shrink them.
  std::string weight_dtype = "fp8";   // "fp8" (e4m3 with ue8m0 block scales) or "bf16"
  std::string expert_dtype = "fp4";   // "fp4" (e2m1, 1 x fp4_block_size ue8m0 scales) or "fp8"
  std::string scale_fmt = "ue8m0";
  std::string indexer_quant = "fp4";  // "fp4" (the official QAT) or "fp8" (sglang's default)
  int64_t weight_block_size = 128;    // FP8 weight scales cover weight_block_size^2 blocks
  int64_t act_block_size = 128;       // FP8 activation scales cover 1 x act_block_size
  int64_t kv_block_size = 64;         // FP8 simulation of the KV nope dims
  int64_t fp4_block_size = 32;        // FP4 experts and indexer q/k

  int64_t nope_head_dim() const { return head_dim - rope_head_dim; }
  int64_t ratio(int64_t layer_id) const;  // layer_id in [0, n_layers + n_mtp_layers)
  LayerKind kind(int64_t layer_id) const;
  bool is_hash_layer(int64_t layer_id) const;  // MTP layers never are
  int64_t c128_ratio() const;  // the non-overlapping ratio in use (128 on released models), 0 if none
  int64_t max_ratio() const;
};

// Loads a config from JSON text; `source` names the file in errors. Accepts both naming schemes,
// reports unknown fields and validates every rule (InputError naming the field and the rule).
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
// A preset name (flash, pro, small, tiny, micro) or a path to a JSON file.
ModelConfig load_model_config(const std::string& name_or_path);
// Throws InputError(config.source, field, rule) for the first rule that fails.
void validate_model_config(const ModelConfig& config);
// The config in the inference demo's naming (plus our quantization fields), loadable again.
nlohmann::json model_config_to_json(const ModelConfig& config);

std::string_view layer_kind_name(LayerKind kind);

}  // namespace dsv4
