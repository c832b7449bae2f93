#include "engine/config/model_config.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "engine/config/presets.h"
#include "engine/core/error.h"

namespace dsv4 {

using json = nlohmann::json;

int64_t ModelConfig::ratio(int64_t layer_id) const {
  DSV4_ASSERT(layer_id >= 0, "negative layer id");
  DSV4_ASSERT(layer_id < static_cast<int64_t>(compress_ratios.size()), "layer id past compress_ratios");
  return compress_ratios[static_cast<size_t>(layer_id)];
}

LayerKind ModelConfig::kind(int64_t layer_id) const {
  const int64_t r = ratio(layer_id);
  if (r == 0) return LayerKind::swa_only;
  if (r == 4) return LayerKind::c4_indexed;
  return LayerKind::c128_pooled;
}

bool ModelConfig::is_hash_layer(int64_t layer_id) const {
  return layer_id < n_layers && layer_id < n_hash_layers;
}

int64_t ModelConfig::c128_ratio() const {
  for (int64_t r : compress_ratios) {
    if (r > 4) return r;
  }
  return 0;
}

int64_t ModelConfig::max_ratio() const {
  int64_t out = 0;
  for (int64_t r : compress_ratios) out = std::max(out, r);
  return out;
}

std::string_view layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::swa_only: return "swa";
    case LayerKind::c4_indexed: return "c4+indexer";
    case LayerKind::c128_pooled: return "c128";
  }
  DSV4_ASSERT(false, "unknown layer kind");
}

namespace {

// Typed access to one JSON value; every error names the source file and the JSON path.
struct FieldReader {
  const std::string& source;

  int64_t integer(const json& v, const std::string& path) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (d == static_cast<double>(static_cast<int64_t>(d))) return static_cast<int64_t>(d);
    }
    throw InputError(source, path, "must be an integer, got " + v.dump());
  }
  double number(const json& v, const std::string& path) const {
    if (v.is_number()) return v.get<double>();
    throw InputError(source, path, "must be a number, got " + v.dump());
  }
  std::string string(const json& v, const std::string& path) const {
    if (v.is_string()) return v.get<std::string>();
    throw InputError(source, path, "must be a string, got " + v.dump());
  }
  bool boolean(const json& v, const std::string& path) const {
    if (v.is_boolean()) return v.get<bool>();
    throw InputError(source, path, "must be true or false, got " + v.dump());
  }
  std::vector<int64_t> integers(const json& v, const std::string& path) const {
    if (!v.is_array()) throw InputError(source, path, "must be a list of integers, got " + v.dump());
    std::vector<int64_t> out;
    for (size_t i = 0; i < v.size(); ++i) out.push_back(integer(v[i], path + "[" + std::to_string(i) + "]"));
    return out;
  }
  void expect(bool ok, const std::string& path, const std::string& rule) const {
    if (!ok) throw InputError(source, path, rule);
  }
};

using Setter = std::function<void(ModelConfig&, const json&, const std::string&, const FieldReader&)>;

struct Field {
  std::vector<std::string> names;  // demo name first, then Hugging Face names
  Setter set;
};

Setter set_int(int64_t ModelConfig::*member) {
  return [member](ModelConfig& c, const json& v, const std::string& p, const FieldReader& r) {
    c.*member = r.integer(v, p);
  };
}
Setter set_num(double ModelConfig::*member) {
  return [member](ModelConfig& c, const json& v, const std::string& p, const FieldReader& r) {
    c.*member = r.number(v, p);
  };
}
Setter set_str(std::string ModelConfig::*member) {
  return [member](ModelConfig& c, const json& v, const std::string& p, const FieldReader& r) {
    c.*member = r.string(v, p);
  };
}

void set_rope_scaling(ModelConfig& c, const json& v, const std::string& path, const FieldReader& r) {
  r.expect(v.is_object(), path, "must be an object");
  for (const auto& [key, value] : v.items()) {
    const std::string p = path + "." + key;
    if (key == "type" || key == "rope_type") {
      r.expect(r.string(value, p) == "yarn", p, "only \"yarn\" rope scaling is part of DeepSeek-V4");
    } else if (key == "factor") {
      c.rope_factor = r.number(value, p);
    } else if (key == "original_max_position_embeddings") {
      c.original_seq_len = r.integer(value, p);
    } else if (key == "beta_fast") {
      c.beta_fast = r.number(value, p);
    } else if (key == "beta_slow") {
      c.beta_slow = r.number(value, p);
    } else {
      throw InputError(r.source, p, "unknown field (DeepSeek-V4 has no such rope-scaling field)");
    }
  }
}

void set_quantization_config(ModelConfig& c, const json& v, const std::string& path, const FieldReader& r) {
  r.expect(v.is_object(), path, "must be an object");
  for (const auto& [key, value] : v.items()) {
    const std::string p = path + "." + key;
    if (key == "quant_method") {
      r.expect(r.string(value, p) == "fp8", p, "only \"fp8\" block quantization is supported");
      c.weight_dtype = "fp8";
    } else if (key == "fmt") {
      r.expect(r.string(value, p) == "e4m3", p, "only \"e4m3\" is supported");
    } else if (key == "activation_scheme") {
      r.expect(r.string(value, p) == "dynamic", p, "only \"dynamic\" activation scales are supported");
    } else if (key == "scale_fmt") {
      c.scale_fmt = r.string(value, p);
    } else if (key == "weight_block_size") {
      const auto block = r.integers(value, p);
      r.expect(block.size() == 2, p, "must be [rows, cols]");
      r.expect(block[0] == block[1], p, "square blocks only (rows == cols)");
      c.weight_block_size = block[0];
    } else {
      throw InputError(r.source, p, "unknown field");
    }
  }
}

// Fields that carry no information for the harness but appear in released configs. Those with a
// meaning are checked, so that a config that relies on a feature we do not model is refused.
void check_informational(const std::string& key, const json& v, const std::string& path, const FieldReader& r) {
  if (key == "model_type") {
    r.expect(r.string(v, path) == "deepseek_v4", path, "must be \"deepseek_v4\"");
  } else if (key == "num_key_value_heads") {
    r.expect(r.integer(v, path) == 1, path, "DeepSeek-V4 attention is MQA: must be 1");
  } else if (key == "tie_word_embeddings") {
    r.expect(!r.boolean(v, path), path, "DeepSeek-V4 does not tie embeddings: must be false");
  } else if (key == "topk_method") {
    r.expect(r.string(v, path) == "noaux_tc", path, "must be \"noaux_tc\"");
  } else if (key == "norm_topk_prob") {
    r.expect(r.boolean(v, path), path, "routing weights are normalised: must be true");
  } else if (key == "attention_bias") {
    r.expect(!r.boolean(v, path), path, "DeepSeek-V4 has no attention bias: must be false");
  } else if (key == "hidden_act") {
    r.expect(r.string(v, path) == "silu", path, "must be \"silu\"");
  } else if (key == "scale_dtype") {
    r.expect(r.string(v, path) == "fp8", path, "only e8m0 (\"fp8\") scales are supported");
  }
}

const std::set<std::string>& informational_fields() {
  static const std::set<std::string> fields = {
      "architectures", "model_type", "transformers_version", "torch_dtype", "bos_token_id",
      "eos_token_id", "initializer_range", "use_cache", "attention_dropout", "attention_bias",
      "num_key_value_heads", "tie_word_embeddings", "topk_method", "norm_topk_prob", "hidden_act",
      "max_batch_size", "scale_dtype", "auto_map", "pad_token_id", "_name_or_path"};
  return fields;
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      {{"vocab_size"}, set_int(&ModelConfig::vocab_size)},
      {{"dim", "hidden_size"}, set_int(&ModelConfig::dim)},
      {{"n_layers", "num_hidden_layers"}, set_int(&ModelConfig::n_layers)},
      {{"n_mtp_layers", "num_nextn_predict_layers"}, set_int(&ModelConfig::n_mtp_layers)},
      {{"n_heads", "num_attention_heads"}, set_int(&ModelConfig::n_heads)},
      {{"head_dim"}, set_int(&ModelConfig::head_dim)},
      {{"rope_head_dim", "qk_rope_head_dim"}, set_int(&ModelConfig::rope_head_dim)},
      {{"q_lora_rank"}, set_int(&ModelConfig::q_lora_rank)},
      {{"o_groups"}, set_int(&ModelConfig::o_groups)},
      {{"o_lora_rank"}, set_int(&ModelConfig::o_lora_rank)},
      {{"window_size", "sliding_window"}, set_int(&ModelConfig::window_size)},
      {{"compress_ratios"},
       [](ModelConfig& c, const json& v, const std::string& p, const FieldReader& r) {
         c.compress_ratios = r.integers(v, p);
       }},
      {{"index_n_heads"}, set_int(&ModelConfig::index_n_heads)},
      {{"index_head_dim"}, set_int(&ModelConfig::index_head_dim)},
      {{"index_topk"}, set_int(&ModelConfig::index_topk)},
      {{"n_routed_experts"}, set_int(&ModelConfig::n_routed_experts)},
      {{"n_activated_experts", "num_experts_per_tok"}, set_int(&ModelConfig::n_activated_experts)},
      {{"n_shared_experts"}, set_int(&ModelConfig::n_shared_experts)},
      {{"moe_inter_dim", "moe_intermediate_size"}, set_int(&ModelConfig::moe_inter_dim)},
      {{"n_hash_layers", "num_hash_layers"}, set_int(&ModelConfig::n_hash_layers)},
      {{"score_func", "scoring_func"}, set_str(&ModelConfig::score_func)},
      {{"route_scale", "routed_scaling_factor"}, set_num(&ModelConfig::route_scale)},
      {{"swiglu_limit"}, set_num(&ModelConfig::swiglu_limit)},
      {{"clamp_shared_expert"},
       [](ModelConfig& c, const json& v, const std::string& p, const FieldReader& r) {
         c.clamp_shared_expert = r.boolean(v, p);
       }},
      {{"hc_mult"}, set_int(&ModelConfig::hc_mult)},
      {{"hc_sinkhorn_iters"}, set_int(&ModelConfig::hc_sinkhorn_iters)},
      {{"hc_eps"}, set_num(&ModelConfig::hc_eps)},
      {{"norm_eps", "rms_norm_eps"}, set_num(&ModelConfig::norm_eps)},
      {{"rope_theta"}, set_num(&ModelConfig::rope_theta)},
      {{"compress_rope_theta"}, set_num(&ModelConfig::compress_rope_theta)},
      {{"rope_factor"}, set_num(&ModelConfig::rope_factor)},
      {{"original_seq_len"}, set_int(&ModelConfig::original_seq_len)},
      {{"beta_fast"}, set_num(&ModelConfig::beta_fast)},
      {{"beta_slow"}, set_num(&ModelConfig::beta_slow)},
      {{"rope_scaling"}, set_rope_scaling},
      {{"max_seq_len", "max_position_embeddings"}, set_int(&ModelConfig::max_seq_len)},
      {{"dtype"}, set_str(&ModelConfig::weight_dtype)},
      {{"quantization_config"}, set_quantization_config},
      {{"expert_dtype"}, set_str(&ModelConfig::expert_dtype)},
      {{"scale_fmt"}, set_str(&ModelConfig::scale_fmt)},
      {{"indexer_quant"}, set_str(&ModelConfig::indexer_quant)},
      {{"weight_block_size"}, set_int(&ModelConfig::weight_block_size)},
      {{"act_block_size"}, set_int(&ModelConfig::act_block_size)},
      {{"kv_block_size"}, set_int(&ModelConfig::kv_block_size)},
      {{"fp4_block_size"}, set_int(&ModelConfig::fp4_block_size)},
  };
  return table;
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw InputError(source, "", std::string("not valid JSON: ") + e.what());
  }
  const FieldReader reader{source};
  if (!root.is_object()) throw InputError(source, "", "a config must be a JSON object");

  std::map<std::string, const Field*> by_name;
  for (const Field& f : fields()) {
    for (const std::string& n : f.names) by_name[n] = &f;
  }

  ModelConfig config;
  config.source = source;
  std::map<const Field*, std::string> seen;  // which name set each field, to catch aliases given twice
  for (const auto& [key, value] : root.items()) {
    auto it = by_name.find(key);
    if (it == by_name.end()) {
      if (informational_fields().count(key) != 0) {
        check_informational(key, value, key, reader);
        continue;
      }
      throw InputError(source, key,
                       "unknown field (not a DeepSeek-V4 field of the inference demo or of Hugging "
                       "Face's config; remove it or fix its spelling)");
    }
    auto [prev, inserted] = seen.emplace(it->second, key);
    if (!inserted) {
      throw InputError(source, key, "given twice, also as '" + prev->second + "'");
    }
    it->second->set(config, value, key, reader);
  }
  static const char* required[] = {"vocab_size", "dim", "n_layers", "n_heads", "head_dim",
                                   "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                                   "window_size", "compress_ratios", "n_routed_experts",
                                   "n_activated_experts", "moe_inter_dim", "max_seq_len"};
  for (const char* name : required) {
    const Field* f = by_name.at(name);
    if (seen.count(f) == 0) {
      std::string names;
      for (const auto& n : f->names) names += (names.empty() ? "" : " / ") + n;
      throw InputError(source, name, "missing (spelled " + names + ")");
    }
  }
  validate_model_config(config);
  return config;
}

void validate_model_config(const ModelConfig& c) {
  const FieldReader r{c.source};
  auto positive = [&](int64_t v, const char* field) {
    r.expect(v >= 1, field, "must be >= 1, got " + std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.dim, "dim");
  positive(c.n_layers, "n_layers");
  r.expect(c.n_mtp_layers >= 0, "n_mtp_layers", "must be >= 0");
  positive(c.n_heads, "n_heads");
  positive(c.head_dim, "head_dim");
  positive(c.rope_head_dim, "rope_head_dim");
  positive(c.q_lora_rank, "q_lora_rank");
  positive(c.o_groups, "o_groups");
  positive(c.o_lora_rank, "o_lora_rank");
  positive(c.window_size, "window_size");
  positive(c.n_routed_experts, "n_routed_experts");
  positive(c.n_activated_experts, "n_activated_experts");
  positive(c.moe_inter_dim, "moe_inter_dim");
  positive(c.hc_mult, "hc_mult");
  positive(c.hc_sinkhorn_iters, "hc_sinkhorn_iters");
  positive(c.max_seq_len, "max_seq_len");
  positive(c.original_seq_len, "original_seq_len");
  positive(c.weight_block_size, "weight_block_size");
  positive(c.act_block_size, "act_block_size");
  positive(c.kv_block_size, "kv_block_size");
  positive(c.fp4_block_size, "fp4_block_size");
  r.expect(c.n_hash_layers >= 0 && c.n_hash_layers <= c.n_layers, "n_hash_layers",
           "must be in [0, n_layers]");

  // Layer types: indexed by layer id, MTP ids start at n_layers.
  const int64_t n_total = c.n_layers + c.n_mtp_layers;
  r.expect(static_cast<int64_t>(c.compress_ratios.size()) >= n_total, "compress_ratios",
           "needs n_layers + n_mtp_layers = " + std::to_string(n_total) + " entries, got " +
               std::to_string(c.compress_ratios.size()));
  int64_t c128 = 0;
  bool any_c4 = false;
  for (size_t i = 0; i < c.compress_ratios.size(); ++i) {
    const int64_t ratio = c.compress_ratios[i];
    const std::string path = "compress_ratios[" + std::to_string(i) + "]";
    r.expect(ratio == 0 || ratio == 4 || (is_power_of_two(ratio) && ratio >= 8 && ratio <= 128), path,
             "must be 0 (window only), 4 (overlapping, indexed) or a power of two in [8, 128] "
             "(non-overlapping; 128 on released models), got " + std::to_string(ratio));
    if (ratio > 4) {
      r.expect(c128 == 0 || c128 == ratio, path,
               "all non-overlapping layers must share one ratio (" + std::to_string(c128) + ")");
      c128 = ratio;
    }
    any_c4 = any_c4 || ratio == 4;
    if (static_cast<int64_t>(i) >= c.n_layers && static_cast<int64_t>(i) < n_total) {
      r.expect(ratio == 0, path, "the MTP block attends to its window only: must be 0");
    }
  }

  // Head geometry and quantization blocks (dsv4-model §7).
  r.expect(c.rope_head_dim % 2 == 0, "rope_head_dim", "must be even (RoPE rotates pairs)");
  r.expect(c.rope_head_dim < c.head_dim, "rope_head_dim", "must be smaller than head_dim");
  r.expect(c.nope_head_dim() % c.kv_block_size == 0, "head_dim",
           "head_dim - rope_head_dim must be a multiple of kv_block_size (" +
               std::to_string(c.kv_block_size) + ") for the KV FP8 blocks");
  r.expect(c.dim % c.act_block_size == 0, "dim",
           "must be a multiple of act_block_size (" + std::to_string(c.act_block_size) + ")");
  r.expect(c.q_lora_rank % c.act_block_size == 0, "q_lora_rank",
           "must be a multiple of act_block_size (" + std::to_string(c.act_block_size) + ")");
  r.expect((c.o_groups * c.o_lora_rank) % c.act_block_size == 0, "o_lora_rank",
           "o_groups * o_lora_rank must be a multiple of act_block_size");
  r.expect(c.moe_inter_dim % c.act_block_size == 0, "moe_inter_dim",
           "must be a multiple of act_block_size (" + std::to_string(c.act_block_size) + ")");
  r.expect(c.dim % c.fp4_block_size == 0, "dim", "must be a multiple of fp4_block_size (FP4 expert K blocks)");
  r.expect(c.moe_inter_dim % c.fp4_block_size == 0, "moe_inter_dim",
           "must be a multiple of fp4_block_size (FP4 expert K blocks)");
  r.expect(c.n_heads % c.o_groups == 0, "o_groups", "must divide n_heads (a group is whole heads)");
  r.expect(c.n_shared_experts == 1, "n_shared_experts", "DeepSeek-V4 has exactly one shared expert");
  r.expect(c.n_activated_experts <= c.n_routed_experts, "n_activated_experts",
           "must be <= n_routed_experts");
  r.expect(c.score_func == "sqrtsoftplus", "score_func", "only \"sqrtsoftplus\" is DeepSeek-V4's");
  r.expect(c.route_scale > 0, "route_scale", "must be > 0");
  r.expect(c.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 disables the clamp)");
  r.expect(c.hc_eps > 0, "hc_eps", "must be > 0");
  r.expect(c.norm_eps > 0, "norm_eps", "must be > 0");
  r.expect(c.rope_theta > 1, "rope_theta", "must be > 1");
  r.expect(c.compress_rope_theta > 1, "compress_rope_theta", "must be > 1");
  r.expect(c.rope_factor >= 1, "rope_factor", "must be >= 1");
  r.expect(c.beta_slow > 0, "beta_slow", "must be > 0");
  r.expect(c.beta_fast > c.beta_slow, "beta_fast", "must be > beta_slow");
  r.expect(c.weight_dtype == "fp8" || c.weight_dtype == "bf16", "dtype", "must be \"fp8\" or \"bf16\"");
  r.expect(c.expert_dtype == "fp4" || c.expert_dtype == "fp8", "expert_dtype", "must be \"fp4\" or \"fp8\"");
  r.expect(c.scale_fmt == "ue8m0", "scale_fmt", "only \"ue8m0\" (power-of-two) scales are supported");
  r.expect(c.indexer_quant == "fp4" || c.indexer_quant == "fp8", "indexer_quant", "must be \"fp4\" or \"fp8\"");
  r.expect(c.weight_block_size % c.act_block_size == 0 || c.act_block_size % c.weight_block_size == 0,
           "weight_block_size", "must divide or be a multiple of act_block_size");

  if (any_c4) {
    positive(c.index_n_heads, "index_n_heads");
    positive(c.index_head_dim, "index_head_dim");
    positive(c.index_topk, "index_topk");
    r.expect(is_power_of_two(c.index_head_dim), "index_head_dim", "must be a power of two (Hadamard transform)");
    r.expect(c.index_head_dim % c.fp4_block_size == 0, "index_head_dim", "must be a multiple of fp4_block_size");
    r.expect(c.rope_head_dim < c.index_head_dim, "index_head_dim", "must be larger than rope_head_dim");
  }
  // Positions must fit the compressed caches and the hash table must index real experts.
  if (c128 > 0) {
    r.expect(c.max_seq_len >= c128, "max_seq_len", "must hold at least one non-overlapping block");
  }
}

ModelConfig load_model_config(const std::string& name_or_path) {
  if (const std::string* text = find_preset(name_or_path)) {
    return parse_model_config(*text, name_or_path);
  }
  std::ifstream in(name_or_path);
  if (!in) {
    throw InputError(name_or_path, "",
                     "no such config preset or readable file (presets: " + preset_names() + ")");
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse_model_config(buffer.str(), name_or_path);
}

nlohmann::json model_config_to_json(const ModelConfig& c) {
  return json{
      {"vocab_size", c.vocab_size},
      {"dim", c.dim},
      {"n_layers", c.n_layers},
      {"n_mtp_layers", c.n_mtp_layers},
      {"n_heads", c.n_heads},
      {"head_dim", c.head_dim},
      {"rope_head_dim", c.rope_head_dim},
      {"q_lora_rank", c.q_lora_rank},
      {"o_groups", c.o_groups},
      {"o_lora_rank", c.o_lora_rank},
      {"window_size", c.window_size},
      {"compress_ratios", c.compress_ratios},
      {"index_n_heads", c.index_n_heads},
      {"index_head_dim", c.index_head_dim},
      {"index_topk", c.index_topk},
      {"n_routed_experts", c.n_routed_experts},
      {"n_activated_experts", c.n_activated_experts},
      {"n_shared_experts", c.n_shared_experts},
      {"moe_inter_dim", c.moe_inter_dim},
      {"n_hash_layers", c.n_hash_layers},
      {"score_func", c.score_func},
      {"route_scale", c.route_scale},
      {"swiglu_limit", c.swiglu_limit},
      {"clamp_shared_expert", c.clamp_shared_expert},
      {"hc_mult", c.hc_mult},
      {"hc_sinkhorn_iters", c.hc_sinkhorn_iters},
      {"hc_eps", c.hc_eps},
      {"norm_eps", c.norm_eps},
      {"rope_theta", c.rope_theta},
      {"compress_rope_theta", c.compress_rope_theta},
      {"rope_factor", c.rope_factor},
      {"original_seq_len", c.original_seq_len},
      {"beta_fast", c.beta_fast},
      {"beta_slow", c.beta_slow},
      {"max_seq_len", c.max_seq_len},
      {"dtype", c.weight_dtype},
      {"expert_dtype", c.expert_dtype},
      {"scale_fmt", c.scale_fmt},
      {"indexer_quant", c.indexer_quant},
      {"weight_block_size", c.weight_block_size},
      {"act_block_size", c.act_block_size},
      {"kv_block_size", c.kv_block_size},
      {"fp4_block_size", c.fp4_block_size},
  };
}

}  // namespace dsv4
