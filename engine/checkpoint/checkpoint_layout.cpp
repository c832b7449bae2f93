#include "engine/checkpoint/checkpoint_layout.h"

#include "engine/core/error.h"

namespace dsv4 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

class LayoutBuilder {
 public:
  explicit LayoutBuilder(const ModelConfig& c) : c_(c) {}

  void add(std::string name, std::vector<int64_t> shape, DType dtype, TensorRole role, int64_t fan_in = 0) {
    specs_.push_back(TensorSpec{std::move(name), std::move(shape), dtype, role, fan_in, "", DType::f32});
  }

  // An FP8 linear [out, in] with its weight_block_size^2 ue8m0 scales (or bf16 when the config says so).
  void linear_fp8(const std::string& prefix, int64_t out, int64_t in) {
    if (c_.weight_dtype == "bf16") {
      add(prefix + ".weight", {out, in}, DType::bf16, TensorRole::dense_weight, in);
      return;
    }
    const int64_t b = c_.weight_block_size;
    specs_.push_back({prefix + ".weight", {out, in}, DType::f8_e4m3fn, TensorRole::fp8_weight, in, prefix + ".scale"});
    specs_.push_back({prefix + ".scale", {ceil_div(out, b), ceil_div(in, b)}, DType::ue8m0, TensorRole::block_scale, in,
                      prefix + ".weight", DType::f8_e4m3fn});
  }

  // A routed-expert linear [out, in]: FP4 pairs in I8 bytes with 1 x fp4_block_size scales.
  void linear_expert(const std::string& prefix, int64_t out, int64_t in) {
    if (c_.expert_dtype == "fp8") {
      linear_fp8(prefix, out, in);
      return;
    }
    specs_.push_back({prefix + ".weight", {out, in / 2}, DType::i8, TensorRole::fp4_weight, in, prefix + ".scale"});
    specs_.push_back({prefix + ".scale", {out, in / c_.fp4_block_size}, DType::ue8m0, TensorRole::block_scale, in,
                      prefix + ".weight", DType::f4_e2m1});
  }

  void hc(const std::string& prefix, const std::string& which) {
    const int64_t mix = (2 + c_.hc_mult) * c_.hc_mult;
    add(prefix + "hc_" + which + "_fn", {mix, c_.hc_mult * c_.dim}, DType::f32, TensorRole::dense_weight,
        c_.hc_mult * c_.dim);
  }

  void hc_params(const std::string& p) {
    const int64_t mix = (2 + c_.hc_mult) * c_.hc_mult;
    hc(p, "attn");
    hc(p, "ffn");
    add(p + "hc_attn_base", {mix}, DType::f32, TensorRole::bias);
    add(p + "hc_ffn_base", {mix}, DType::f32, TensorRole::bias);
    add(p + "hc_attn_scale", {3}, DType::f32, TensorRole::bias);
    add(p + "hc_ffn_scale", {3}, DType::f32, TensorRole::bias);
  }

  void hc_head(const std::string& p) {
    add(p + "hc_head_fn", {c_.hc_mult, c_.hc_mult * c_.dim}, DType::f32, TensorRole::dense_weight, c_.hc_mult * c_.dim);
    add(p + "hc_head_base", {c_.hc_mult}, DType::f32, TensorRole::bias);
    add(p + "hc_head_scale", {1}, DType::f32, TensorRole::bias);
  }

  void compressor(const std::string& p, int64_t ratio, int64_t head_dim) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    add(p + "ape", {ratio, coff * head_dim}, DType::f32, TensorRole::bias);
    add(p + "wkv.weight", {coff * head_dim, c_.dim}, DType::bf16, TensorRole::dense_weight, c_.dim);
    add(p + "wgate.weight", {coff * head_dim, c_.dim}, DType::bf16, TensorRole::dense_weight, c_.dim);
    add(p + "norm.weight", {head_dim}, DType::bf16, TensorRole::norm_weight);
  }

  void block(const std::string& p, int64_t layer_id) {
    const int64_t ratio = c_.ratio(layer_id);
    const int64_t hd = c_.n_heads * c_.head_dim;
    add(p + "attn.attn_sink", {c_.n_heads}, DType::f32, TensorRole::sink);
    linear_fp8(p + "attn.wq_a", c_.q_lora_rank, c_.dim);
    add(p + "attn.q_norm.weight", {c_.q_lora_rank}, DType::bf16, TensorRole::norm_weight);
    linear_fp8(p + "attn.wq_b", hd, c_.q_lora_rank);
    linear_fp8(p + "attn.wkv", c_.head_dim, c_.dim);
    add(p + "attn.kv_norm.weight", {c_.head_dim}, DType::bf16, TensorRole::norm_weight);
    add(p + "attn.wo_a.weight", {c_.o_groups * c_.o_lora_rank, hd / c_.o_groups}, DType::bf16,
        TensorRole::dense_weight, hd / c_.o_groups);
    linear_fp8(p + "attn.wo_b", c_.dim, c_.o_groups * c_.o_lora_rank);
    if (ratio > 0) compressor(p + "attn.compressor.", ratio, c_.head_dim);
    if (ratio == 4) {
      linear_fp8(p + "attn.indexer.wq_b", c_.index_n_heads * c_.index_head_dim, c_.q_lora_rank);
      add(p + "attn.indexer.weights_proj.weight", {c_.index_n_heads, c_.dim}, DType::bf16,
          TensorRole::dense_weight, c_.dim);
      compressor(p + "attn.indexer.compressor.", ratio, c_.index_head_dim);
    }
    add(p + "ffn.gate.weight", {c_.n_routed_experts, c_.dim}, DType::bf16, TensorRole::dense_weight, c_.dim);
    if (c_.is_hash_layer(layer_id)) {
      add(p + "ffn.gate.tid2eid", {c_.vocab_size, c_.n_activated_experts}, DType::i32, TensorRole::hash_table);
    } else {
      add(p + "ffn.gate.bias", {c_.n_routed_experts}, DType::f32, TensorRole::bias);
    }
    for (int64_t e = 0; e < c_.n_routed_experts; ++e) {
      const std::string ep = p + "ffn.experts." + std::to_string(e) + ".";
      linear_expert(ep + "w1", c_.moe_inter_dim, c_.dim);
      linear_expert(ep + "w2", c_.dim, c_.moe_inter_dim);
      linear_expert(ep + "w3", c_.moe_inter_dim, c_.dim);
    }
    linear_fp8(p + "ffn.shared_experts.w1", c_.moe_inter_dim, c_.dim);
    linear_fp8(p + "ffn.shared_experts.w2", c_.dim, c_.moe_inter_dim);
    linear_fp8(p + "ffn.shared_experts.w3", c_.moe_inter_dim, c_.dim);
    add(p + "attn_norm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
    add(p + "ffn_norm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
  }

  std::vector<TensorSpec> build() {
    hc_head("");
    add("embed.weight", {c_.vocab_size, c_.dim}, DType::bf16, TensorRole::dense_weight, 0);
    for (int64_t l = 0; l < c_.n_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      hc_params(p);
      block(p, l);
    }
    add("norm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
    add("head.weight", {c_.vocab_size, c_.dim}, DType::bf16, TensorRole::dense_weight, c_.dim);
    for (int64_t m = 0; m < c_.n_mtp_layers; ++m) {
      const std::string p = "mtp." + std::to_string(m) + ".";
      hc_params(p);
      hc_head(p);
      block(p, c_.n_layers + m);
      linear_fp8(p + "e_proj", c_.dim, c_.dim);
      linear_fp8(p + "h_proj", c_.dim, c_.dim);
      add(p + "enorm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
      add(p + "hnorm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
      add(p + "norm.weight", {c_.dim}, DType::bf16, TensorRole::norm_weight);
    }
    return std::move(specs_);
  }

 private:
  const ModelConfig& c_;
  std::vector<TensorSpec> specs_;
};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

std::vector<TensorSpec> checkpoint_layout(const ModelConfig& config) {
  return LayoutBuilder(config).build();
}

ParameterCount count_parameters(const ModelConfig& config) {
  ParameterCount count;
  int64_t one_expert = 0;  // parameters of one routed expert (w1, w2, w3)
  int64_t moe_layers = 0;
  for (const TensorSpec& s : checkpoint_layout(config)) {
    const int64_t n = numel(s.shape);
    count.stored_bytes += dtype_storage_bytes(s.dtype, n);
    if (s.role == TensorRole::block_scale) {
      count.scale_bytes += dtype_storage_bytes(s.dtype, n);
      continue;
    }
    const int64_t params = s.role == TensorRole::fp4_weight ? 2 * n : n;
    count.total += params;
    if (s.name.rfind("mtp.", 0) == 0) count.mtp += params;
    if (s.name.find(".ffn.experts.") != std::string::npos) {
      count.routed_experts += params;
      if (s.name.find(".ffn.experts.0.") != std::string::npos && s.name.rfind("layers.0.", 0) == 0) {
        one_expert += params;
      }
    }
    if (s.name.size() > 16 && s.name.compare(s.name.size() - 16, 16, ".ffn.gate.weight") == 0) ++moe_layers;
  }
  count.activated = count.total - count.routed_experts + moe_layers * config.n_activated_experts * one_expert;
  return count;
}

}  // namespace dsv4
