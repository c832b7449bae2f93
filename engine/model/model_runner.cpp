#include "engine/model/model_runner.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/faults/faults.h"
#include "engine/serving/compressed_locations.h"
#include "kernels/attn_output.h"
#include "kernels/cast.h"
#include "kernels/device.h"
#include "kernels/compressor.h"
#include "kernels/indexer_logits.h"
#include "kernels/mhc.h"
#include "kernels/moe.h"
#include "kernels/norm_rope.h"
#include "kernels/q_path.h"
#include "kernels/quant_gemm.h"
#include "kernels/sparse_attention.h"
#include "kernels/token_ops.h"
#include "reference/rope.h"

namespace dsv4::engine {

namespace {

constexpr int64_t kC4 = 4;

// Tokens per CP rank: the round-robin shares padded to equal length.
int64_t cp_local_tokens(int64_t T, int64_t size) { return (T + size - 1) / size; }

// Rows t = i * size + rank of a [T, width] array, padded with `pad` rows to cp_local_tokens.
template <class V>
std::vector<V> cp_slice(const std::vector<V>& v, int64_t T, int64_t width, int64_t rank, int64_t size,
                        const std::vector<V>& pad) {
  const int64_t L = cp_local_tokens(T, size);
  std::vector<V> out;
  out.reserve(static_cast<size_t>(L * width));
  for (int64_t i = 0; i < L; ++i) {
    const int64_t t = i * size + rank;
    if (t < T) {
      out.insert(out.end(), v.begin() + t * width, v.begin() + (t + 1) * width);
    } else {
      out.insert(out.end(), pad.begin(), pad.end());
    }
  }
  return out;
}

// One quantized projection, by the weight's format: e4m3 with its block scales (blocks of `block`),
// i8 with its per-channel scales (w8a8-int8), bf16 without (s undefined).
void project(const Tensor& x, const Tensor& w, const Tensor& s, Tensor& out, int64_t block) {
  if (!s.defined()) {
    kernels::linear_projection(x, w, kernels::kNoWeightScale, out);
  } else if (w.dtype() == DType::i8) {
    // Fault quant-scale-scalar: one number where the per-channel scale tensor belongs (seed bug A5).
    const bool scalar = faults::enabled(faults::Fault::quant_scale_scalar);
    kernels::linear_projection(x, w, kernels::ChannelScales{scalar ? s.narrow(0, 0, 1) : s}, out);
  } else {
    kernels::linear_projection(x, w, kernels::BlockScales{s, block}, out);
  }
}

template <class T>
void upload_vec(rt::Runtime& rt, const DeviceTensor& d, const std::vector<T>& v) {
  DSV4_ASSERT(static_cast<int64_t>(v.size() * sizeof(T)) <= static_cast<int64_t>(rt.bytes(d.buffer)),
              "metadata larger than its buffer " + rt.name(d.buffer));
  if (!v.empty()) rt.upload(d.buffer, 0, v.data(), v.size() * sizeof(T));
}

int64_t entry_bytes(bool indexer, int64_t dims, const kernels::Model1Layout& l) {
  return indexer ? dims * 4 : l.value_bytes() + l.scale_bytes();
}

int32_t argmax_row(const float* row, int64_t V) { return static_cast<int32_t>(std::max_element(row, row + V) - row); }

ref::Mat to_mat(const Tensor& t, int64_t rows, int64_t cols) {
  const std::vector<double> v = t.values();
  DSV4_ASSERT(static_cast<int64_t>(v.size()) == rows * cols, "a probe holds rows x cols values");
  ref::Mat m(rows, cols);
  std::copy(v.begin(), v.end(), m.data.begin());
  return m;
}

}  // namespace

// ---- layers and streams -------------------------------------------------------------------------

struct ModelRunner::Layer {
  int64_t id = 0;
  int64_t ratio = 0;
  std::string prefix;  // "layers.{id}"
  bool hash = false;
  Tensor freqs;        // the layer's rope table
  kernels::Model1Layout kv_layout;
  DeviceTensor swa_cache;           // [swa pages, page_bytes(swa_page_size)] u8
  DeviceTensor comp_cache;          // [full pages, page_bytes(page_size / ratio)] u8
  int64_t comp_page_entries = 0;
  DeviceTensor comp_state;          // attention compressor's state rows
  kernels::CompressStateLayout comp_state_layout;
  DeviceTensor idx_keys;            // [c4 entries / 64, 64, index_head_dim] f32 (ratio 4)
  DeviceTensor idx_state;           // the indexer compressor's state rows
  std::vector<kernels::ExpertWeights> experts;  // the routed experts' weights and scales
  DeviceTensor expert_table;        // [E, 6] i64: their device pointers (moe_experts on a GPU)
  kernels::CompressStateLayout idx_state_layout;
  // Speculative verify batches: what the drafts' entries and state rows overwrite, saved before
  // they do (slot j of the backup = candidate j of the ratio's ScrubCandidates).
  DeviceTensor comp_backup, state_backup, idx_keys_backup, idx_state_backup;
};

struct ModelRunner::Streams {
  rt::StreamId kv, compressor, indexer, indexer_q, indexer_w;
};

std::vector<int64_t> default_pp_partition(int64_t n_layers, int64_t pp) {
  if (pp < 1 || pp > n_layers) {
    throw InputError("--pp", "", "must be in [1, " + std::to_string(n_layers) + "] (one layer per stage at least), got " +
                                     std::to_string(pp));
  }
  std::vector<int64_t> parts(static_cast<size_t>(pp), n_layers / pp);
  const int64_t rest = n_layers % pp;
  for (int64_t i = 2; i < rest + 2; ++i) parts[static_cast<size_t>(pp - i)] += 1;
  return parts;
}

void validate_pp_partition(const std::vector<int64_t>& partition, int64_t n_layers, const std::string& source) {
  if (partition.empty()) throw InputError(source, "", "names no stage");
  int64_t sum = 0;
  for (size_t i = 0; i < partition.size(); ++i) {
    if (partition[i] < 1) {
      throw InputError(source, "stage " + std::to_string(i), "holds " + std::to_string(partition[i]) + " layers; every stage needs at least one");
    }
    sum += partition[i];
  }
  if (sum != n_layers) {
    throw InputError(source, "", "the stages hold " + std::to_string(sum) + " layers, the model has " + std::to_string(n_layers));
  }
}

bool stage_holds_weight(const ModelConfig& config, int64_t layer_begin, int64_t layer_end, const std::string& name) {
  if (name.rfind("layers.", 0) == 0) {
    const int64_t layer = std::stoll(name.substr(7, name.find('.', 7) - 7));
    return layer >= layer_begin && layer < layer_end;
  }
  // The embedding on the first stage, and on the last for the MTP block, which shares it.
  if (name == "embed.weight") return layer_begin == 0 || layer_end == config.n_layers;
  return layer_end == config.n_layers;  // head, norm, hc_head_*, mtp.*
}

ModelRunner::ModelRunner(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
                         const DeviceWeights& weights, EngineOptions engine_options,
                         const serving::ReqToTokenPool& slots, const serving::TokenAllocator& full,
                         const serving::SwaTokenAllocator& swa)
    : ModelRunner(runtime, config, options, weights, std::move(engine_options), slots, full, swa, 0, config.n_layers) {}

ModelRunner::ModelRunner(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
                         const DeviceWeights& weights, EngineOptions engine_options,
                         const serving::ReqToTokenPool& slots, const serving::TokenAllocator& full,
                         const serving::SwaTokenAllocator& swa, int64_t layer_begin, int64_t layer_end)
    : rt_(runtime),
      config_(config),
      options_(options),
      weights_(weights),
      engine_options_(engine_options),
      slots_(slots),
      full_(full),
      swa_(swa),
      layer_begin_(layer_begin),
      layer_end_(layer_end) {
  validate_runtime_options(options_, config_);
  DSV4_ASSERT(0 <= layer_begin_ && layer_begin_ < layer_end_ && layer_end_ <= config_.n_layers, "a stage holds layers");
  const std::string src = "engine options";
  if (engine_options_.indexer_sms < 1) throw InputError(src, "indexer_sms", "must be >= 1");
  if (config_.act_block_size != config_.weight_block_size) {
    throw InputError("model config", "act_block_size", "the engine's FP8 GEMM needs act_block_size == weight_block_size");
  }
  for (int64_t l = layer_begin_; l < layer_end_; ++l) {
    has_c4_ = has_c4_ || config_.ratio(l) == kC4;
    if (config_.ratio(l) > 0 && config_.ratio(l) != kC4) c128_ratio_ = config_.ratio(l);
  }
  if (has_c4_ && options_.page_size % (kC4 * kernels::kIndexerPageKeys) != 0) {
    throw InputError(src, "page_size",
                     "must be a multiple of " + std::to_string(kC4 * kernels::kIndexerPageKeys) +
                         " on a model with ratio-4 layers: the indexer's key pages hold " +
                         std::to_string(kernels::kIndexerPageKeys) + " entries of one full page");
  }
  max_rows_ = *std::max_element(options_.batch_buckets.begin(), options_.batch_buckets.end());
  max_rows_ = std::max(max_rows_, options_.max_running_requests);
  if (engine_options_.draft_tokens < 0 || engine_options_.draft_tokens > 4) {
    throw InputError(src, "draft_tokens", "must be in [0, 4], got " + std::to_string(engine_options_.draft_tokens));
  }
  if (engine_options_.draft_tokens > 0 && !engine_options_.mtp) {
    throw InputError(src, "draft_tokens", "speculative decoding drafts with the MTP block (--mtp)");
  }
  if (engine_options_.draft_tokens > 0 && !options_.speculative) {
    throw InputError("runtime options", "speculative",
                     "must be true with speculative decoding: the rings double so that drafts never overwrite "
                     "committed compress state");
  }
  // A TARGET_VERIFY batch feeds 1 + draft_tokens tokens per row, and every one of them goes through
  // the head (each is a prediction to verify).
  max_tokens_ = std::max(options_.chunked_prefill_tokens, max_rows_ * (1 + engine_options_.draft_tokens));
  max_head_rows_ = std::max(max_rows_, max_rows_ * (1 + engine_options_.draft_tokens));
  const int64_t T = max_tokens_;
  const int64_t d = config_.dim, hc = config_.hc_mult, H = config_.n_heads, D = config_.head_dim;
  const int64_t ql = config_.q_lora_rank;

  main_ = rt_.create_stream(engine_options_.device, "main");
  streams_ = std::make_unique<Streams>();
  if (engine_options_.multi_stream) {
    streams_->kv = rt_.create_stream(engine_options_.device, "alt0.kv");
    streams_->compressor = rt_.create_stream(engine_options_.device, "alt1.compressor");
    streams_->indexer = rt_.create_stream(engine_options_.device, "alt2.indexer");
    streams_->indexer_q = rt_.create_stream(engine_options_.device, "alt3.indexer_q");
    streams_->indexer_w = rt_.create_stream(engine_options_.device, "alt4.indexer_w");
  } else {
    streams_->kv = streams_->compressor = streams_->indexer = streams_->indexer_q = streams_->indexer_w = main_;
  }

  // The rope tables live with the kernels that read them (device memory on the cuda backend).
  auto rope_table = [&](const std::string& name, const std::vector<float>& f) {
    DeviceTensor table = alloc(name, DType::f32, {static_cast<int64_t>(f.size())});
    upload_vec(rt_, table, f);
    return table.t;
  };
  freqs_dense_ = rope_table("rope.freqs_dense", ref::make_rope_table(config_, 0).freqs);
  if (config_.max_ratio() > 0) {
    freqs_compressed_ = rope_table("rope.freqs_compressed", ref::make_rope_table(config_, config_.max_ratio()).freqs);
  }

  // Geometry of the state pools, one per ratio (every layer of a ratio has the same rows).
  const int64_t swa_pages = swa_.page_count();
  RuntimeOptions pool_options = options_;
  // Fault swa-page-size-default-zero: the core compressor's pools built without the SWA page size
  // (seed bug A4); the pool's construction-time guard is what stands between it and a division by 0.
  if (faults::enabled(faults::Fault::swa_page_size_default_zero)) pool_options.swa_page_size = 0;
  if (has_c4_) {
    for (int64_t l = layer_begin_; l < layer_end_; ++l) {
      if (config_.ratio(l) == kC4) {
        c4_pool_ = std::make_unique<serving::CompressStatePool>(config_, pool_options, l,
                                                                serving::CompressStateOwner::attention, swa_pages);
        break;
      }
    }
  }
  if (c128_ratio_ > 0) {
    for (int64_t l = layer_begin_; l < layer_end_; ++l) {
      if (config_.ratio(l) == c128_ratio_) {
        c128_pool_ = std::make_unique<serving::CompressStatePool>(config_, pool_options, l,
                                                                  serving::CompressStateOwner::attention, swa_pages);
        break;
      }
    }
  }

  // Caches and state, per layer (and the MTP block's SWA cache on the last stage).
  for (int64_t l = layer_begin_; l < layer_end_; ++l) layers_.push_back(make_layer(l, "layers." + std::to_string(l)));
  if (engine_options_.mtp && is_last_stage()) {
    if (config_.n_mtp_layers < 1) throw InputError("--mtp", "", "the config has no MTP block (n_mtp_layers = 0)");
    // The chain's scratch slots (one per row and chain step) past the SWA allocator's pages.
    const int64_t chain_slots = max_rows_ * std::max<int64_t>(0, engine_options_.draft_tokens - 1);
    chain_scratch_base_ = swa_.page_count() * options_.swa_page_size;
    mtp_layer_ = make_layer(config_.n_layers, "mtp.0", (chain_slots + options_.swa_page_size - 1) / options_.swa_page_size);
  }

  // Activations.
  R_a_ = alloc("R_a", DType::bf16, {T, hc * d});
  R_b_ = alloc("R_b", DType::bf16, {T, hc * d});
  R_mid_ = alloc("R_mid", DType::bf16, {T, hc * d});
  x_ = alloc("hc_x", DType::bf16, {T, d});
  xn_ = alloc("xn", DType::bf16, {T, d});
  post_ = alloc("hc_post", DType::f32, {T, hc});
  comb_ = alloc("hc_comb", DType::f32, {T, hc, hc});
  qkv_a_ = alloc("qkv_a", DType::bf16, {T, ql + D});
  qr_ = alloc("q_lora", DType::bf16, {T, ql});
  q_ = alloc("q", DType::bf16, {T, H * D});
  o_ = alloc("attn_o", DType::bf16, {T, H * D});
  u_ = alloc("attn_u", DType::bf16, {T, config_.o_groups * config_.o_lora_rank});
  attn_out_ = alloc("attn_out", DType::bf16, {T, d});
  max_context_ = config_.max_seq_len / kC4;
  const int64_t max_blocks = T + max_rows_ + 1;
  if (has_c4_ || c128_ratio_ > 0) {
    const int64_t coff_max = has_c4_ ? 2 : 1;
    ckv_ = alloc("compressor_kv", DType::f32, {T, coff_max * D});
    cscore_ = alloc("compressor_score", DType::f32, {T, coff_max * D});
    centries_ = alloc("compressor_entries", DType::f32, {max_blocks, D});
    const int64_t S = std::max<int64_t>(2 * kC4, c128_ratio_);
    plan_capacity_ = kernels::compress_plan_words(T, max_blocks, S);
  }
  if (has_c4_) {
    const int64_t Hi = config_.index_n_heads, Di = config_.index_head_dim;
    ikv_ = alloc("indexer_compressor_kv", DType::f32, {T, 2 * Di});
    iscore_ = alloc("indexer_compressor_score", DType::f32, {T, 2 * Di});
    ientries_ = alloc("indexer_compressor_entries", DType::f32, {max_blocks, Di});
    iq_ = alloc("indexer_q", DType::bf16, {T, Hi * Di});
    iq32_ = alloc("indexer_q_f32", DType::f32, {T, Hi * Di});
    iw_bf16_ = alloc("indexer_weights_raw", DType::bf16, {T, Hi});
    iw_ = alloc("indexer_weights", DType::f32, {T, Hi});
    ilogits_ = alloc("indexer_logits", DType::f32, {T, max_context_});
    itopk_ = alloc("indexer_topk", DType::i32, {T, config_.index_topk});
  }
  const int64_t E = config_.n_routed_experts, k = config_.n_activated_experts, I = config_.moe_inter_dim;
  gate_logits_ = alloc("gate_logits", DType::f32, {T, E});
  experts_ = alloc("experts", DType::i32, {T, k});
  expert_weights_ = alloc("expert_weights", DType::f32, {T, k});
  routed_ = alloc("routed_out", DType::bf16, {T, k, d});
  sg_ = alloc("shared_g", DType::bf16, {T, I});
  su_ = alloc("shared_u", DType::bf16, {T, I});
  sh_ = alloc("shared_h", DType::bf16, {T, I});
  shared_out_ = alloc("shared_out", DType::bf16, {T, d});
  ffn_out_ = alloc("ffn_out", DType::bf16, {T, d});
  if (is_last_stage()) {
    last_R_ = alloc("last_R", DType::bf16, {max_head_rows_, hc * d});
    head_y_ = alloc("head_y", DType::bf16, {max_head_rows_, d});
    head_yn_ = alloc("head_yn", DType::bf16, {max_head_rows_, d});
    logits_ = alloc("logits", DType::f32, {max_head_rows_, config_.vocab_size});
  }
  if (mtp_layer_) {
    m_row_next_ = alloc("meta.row_next_ids", DType::i32, {max_head_rows_});
    m_sampled_ = alloc("sampled_ids", DType::i32, {max_head_rows_});
    m_next_ids_ = alloc("mtp.next_ids", DType::i32, {T});
    mtp_e_ = alloc("mtp.e", DType::bf16, {T, d});
    mtp_en_ = alloc("mtp.e_norm", DType::bf16, {T, d});
    mtp_ep_ = alloc("mtp.e_proj", DType::bf16, {T, d});
    mtp_hn_ = alloc("mtp.h_norm", DType::bf16, {T, d});
    mtp_hp_ = alloc("mtp.h_proj", DType::bf16, {T, d});
    mtp_R_ = alloc("mtp.R", DType::bf16, {T, hc * d});
    mtp_R_out_ = alloc("mtp.R_out", DType::bf16, {T, hc * d});
    draft_logits_ = alloc("draft_logits", DType::f32, {max_head_rows_, config_.vocab_size});
    if (engine_options_.draft_tokens > 0) {
      mtp_hidden_ = alloc("mtp.hidden", DType::bf16, {T, hc * d});
      chain_ids_ = alloc("draft.chain_ids", DType::i32, {max_rows_});
      chain_logits_ = alloc("draft.logits", DType::f32, {max_rows_ * engine_options_.draft_tokens, config_.vocab_size});
    }
  }

  // Metadata.
  swa_width_ = config_.window_size;
  m_ids_ = alloc("meta.input_ids", DType::i32, {T});
  m_pos_ = alloc("meta.positions", DType::i32, {T});
  m_swa_loc_ = alloc("meta.swa_loc", DType::i64, {T});
  m_swa_idx_ = alloc("meta.swa_indices", DType::i32, {T, swa_width_});
  m_swa_len_ = alloc("meta.swa_lens", DType::i32, {T});
  m_last_ = alloc("meta.last_token", DType::i32, {max_head_rows_});
  if (mtp_layer_) {
    m_mtp_pos_ = alloc("meta.mtp.positions", DType::i32, {T});
    m_mtp_swa_loc_ = alloc("meta.mtp.swa_loc", DType::i64, {T});
    m_mtp_swa_idx_ = alloc("meta.mtp.swa_indices", DType::i32, {T, swa_width_});
    m_mtp_swa_len_ = alloc("meta.mtp.swa_lens", DType::i32, {T});
    if (engine_options_.draft_tokens > 0) {
      // DRAFT_EXTEND's tokens (at most rows x (1 + k)), then k - 1 chain steps of one token per row.
      const int64_t cap = max_rows_ * 2 * engine_options_.draft_tokens;
      m_dx_pos_ = alloc("meta.draft.positions", DType::i32, {cap});
      m_dx_swa_loc_ = alloc("meta.draft.swa_loc", DType::i64, {cap});
      m_dx_swa_idx_ = alloc("meta.draft.swa_indices", DType::i32, {cap, swa_width_});
      m_dx_swa_len_ = alloc("meta.draft.swa_lens", DType::i32, {cap});
      m_dx_src_ = alloc("meta.draft.hidden_rows", DType::i32, {cap});
      m_dx_next_ = alloc("meta.draft.next_ids", DType::i32, {cap});
      m_dx_last_ = alloc("meta.draft.last_token", DType::i32, {max_rows_});
      m_dx_head_ = alloc("meta.draft.first_head_row", DType::i32, {max_rows_});
      m_dx_ident_ = alloc("meta.draft.rows", DType::i32, {max_rows_});
      std::vector<int32_t> ident(static_cast<size_t>(max_rows_));
      for (int64_t r = 0; r < max_rows_; ++r) ident[static_cast<size_t>(r)] = static_cast<int32_t>(r);
      upload_vec(rt_, m_dx_ident_, ident);
    }
  }
  if (engine_options_.draft_tokens > 0 && (has_c4_ || c128_ratio_ > 0)) {
    // The scrub: each draft of a verify batch completes at most one block and writes one state row.
    scrub_capacity_ = max_rows_ * engine_options_.draft_tokens;
    const int64_t words = 2 + 4 * scrub_capacity_;
    if (has_c4_) {
      m_c4_backup_ = alloc("meta.c4_backup", DType::i64, {words});
      m_c4_scrub_ = alloc("meta.c4_scrub", DType::i64, {words});
    }
    if (c128_ratio_ > 0) {
      m_c128_backup_ = alloc("meta.c128_backup", DType::i64, {words});
      m_c128_scrub_ = alloc("meta.c128_scrub", DType::i64, {words});
    }
    for (auto& layer : layers_) {
      if (layer->ratio == 0) continue;
      const int64_t n = scrub_capacity_;
      layer->comp_backup = alloc(layer->prefix + ".scrub.entries", DType::u8,
                                 {n, entry_bytes(false, config_.head_dim, layer->kv_layout)});
      layer->state_backup = alloc(layer->prefix + ".scrub.state", DType::u8, {n, layer->comp_state_layout.row_bytes});
      if (layer->ratio == kC4) {
        layer->idx_keys_backup = alloc(layer->prefix + ".scrub.indexer_keys", DType::u8,
                                       {n, entry_bytes(true, config_.index_head_dim, layer->kv_layout)});
        layer->idx_state_backup = alloc(layer->prefix + ".scrub.indexer_state", DType::u8,
                                        {n, layer->idx_state_layout.row_bytes});
      }
    }
  }
  if (has_c4_) {
    c4_pages_ = (max_context_ + kernels::kIndexerPageKeys - 1) / kernels::kIndexerPageKeys;
    m_c4_plan_ = alloc("meta.c4_plan", DType::i64, {plan_capacity_});
    m_c4_ctx_ = alloc("meta.c4_context_lens", DType::i32, {T, 1});
    m_c4_block_table_ = alloc("meta.c4_block_table", DType::i32, {T, c4_pages_});
    m_c4_schedule_ = alloc("meta.c4_schedule", DType::i32, {engine_options_.indexer_sms + 1, 2});
    m_c4_idx_ = alloc("meta.c4_indices", DType::i32, {T, config_.index_topk});
    m_c4_len_ = alloc("meta.c4_lens", DType::i32, {T});
  }
  if (c128_ratio_ > 0) {
    c128_width_ = std::max<int64_t>(1, config_.max_seq_len / c128_ratio_);
    m_c128_plan_ = alloc("meta.c128_plan", DType::i64, {plan_capacity_});
    m_c128_idx_ = alloc("meta.c128_indices", DType::i32, {T, c128_width_});
    m_c128_len_ = alloc("meta.c128_lens", DType::i32, {T});
  }

  std::vector<const serving::CompressStatePool*> pools;
  if (c4_pool_) pools.push_back(c4_pool_.get());
  if (c128_pool_) pools.push_back(c128_pool_.get());
  eager_metadata_ = std::make_unique<serving::ForwardMetadata>(swa_, pools);
}

DeviceTensor ModelRunner::alloc_state(const std::string& name, const serving::CompressStatePool& pool) {
  DeviceTensor d = alloc(name, DType::u8, {pool.row_count(), pool.row_layout().row_bytes});
  // Every row clean (kv 0, score -inf), the dummy row included.
  std::vector<uint8_t> clean(static_cast<size_t>(pool.buffer_bytes()));
  const auto row = static_cast<size_t>(pool.row_layout().row_bytes);
  for (int64_t r = 0; r < pool.row_count(); ++r) {
    serving::fill_clean_state_row(pool.row_layout(), std::span<uint8_t>(clean).subspan(static_cast<size_t>(r) * row, row));
  }
  rt_.upload(d.buffer, 0, clean.data(), clean.size());
  return d;
}

std::unique_ptr<ModelRunner::Layer> ModelRunner::make_layer(int64_t id, const std::string& prefix, int64_t extra_swa_pages) {
  auto layer = std::make_unique<Layer>();
  layer->id = id;
  layer->ratio = config_.ratio(id);
  layer->prefix = prefix;
  layer->hash = id < config_.n_hash_layers;
  layer->freqs = layer->ratio > 0 ? freqs_compressed_ : freqs_dense_;
  layer->kv_layout = kernels::model1_layout("engine", config_.head_dim, config_.rope_head_dim, config_.kv_block_size);
  for (int64_t e = 0; e < config_.n_routed_experts; ++e) {
    const std::string ep = prefix + ".ffn.experts." + std::to_string(e) + ".";
    auto get = [&](const std::string& n) { return weights_.get(ep + n); };
    layer->experts.push_back({get("w1.weight"), get("w1.scale"), get("w2.weight"), get("w2.scale"), get("w3.weight"),
                              get("w3.scale")});
  }
  layer->expert_table = alloc(prefix + ".ffn.expert_table", DType::i64, {config_.n_routed_experts, 6});
  upload_vec(rt_, layer->expert_table, kernels::expert_pointer_table(layer->experts));
  const int64_t swa_pages = swa_.page_count();
  layer->swa_cache = alloc(prefix + ".swa_kv", DType::u8,
                           {swa_pages + extra_swa_pages, layer->kv_layout.page_bytes(options_.swa_page_size)});
  if (layer->ratio > 0) {
    layer->comp_page_entries = options_.page_size / layer->ratio;
    layer->comp_cache = alloc(prefix + ".c" + std::to_string(layer->ratio) + "_kv", DType::u8,
                              {full_.page_count(), layer->kv_layout.page_bytes(layer->comp_page_entries)});
    const serving::CompressStatePool& pool = layer->ratio == kC4 ? *c4_pool_ : *c128_pool_;
    layer->comp_state_layout = pool.row_layout().kernel_layout();
    layer->comp_state = alloc_state(prefix + ".compress_state", pool);
  }
  if (layer->ratio == kC4) {
    const int64_t entries = full_.capacity_tokens() / kC4;
    layer->idx_keys = alloc(prefix + ".indexer_keys", DType::f32,
                            {entries / kernels::kIndexerPageKeys, kernels::kIndexerPageKeys, config_.index_head_dim});
    const serving::CompressStatePool ipool(config_, options_, id, serving::CompressStateOwner::indexer, swa_pages);
    layer->idx_state_layout = ipool.row_layout().kernel_layout();
    layer->idx_state = alloc_state(prefix + ".indexer_compress_state", ipool);
  }
  return layer;
}

ModelRunner::~ModelRunner() {
  // Freeing waits for queued launches, like cudaFree. After a failed step a queued launch may fail
  // again; the step has reported its error already, and a destructor must not throw.
  for (rt::BufferId b : owned_) {
    try {
      rt_.free(b);
    } catch (const std::exception&) {
    }
  }
}

DeviceTensor ModelRunner::alloc(const std::string& name, DType dtype, const Shape& shape) {
  const int64_t bytes = std::max<int64_t>(1, dtype_storage_bytes(dtype, shape_numel(shape)));
  const DType poison = (dtype == DType::u8) ? DType::u8 : dtype;
  DeviceTensor d;
  d.buffer = rt_.alloc(engine_options_.device, static_cast<uint64_t>(bytes), name, poison);
  d.t = rt_.tensor(d.buffer, dtype, shape);
  owned_.push_back(d.buffer);
  return d;
}

DeviceTensor ModelRunner::view(const DeviceTensor& base, const Shape& shape) const {
  return DeviceTensor{base.buffer, rt_.tensor(base.buffer, base.t.dtype(), shape, base.t.offset())};
}

DeviceTensor ModelRunner::rows(const DeviceTensor& base, int64_t count) const {
  return DeviceTensor{base.buffer, base.t.narrow(0, 0, count)};
}

DeviceTensor ModelRunner::rows(const DeviceTensor& base, int64_t first, int64_t count) const {
  return DeviceTensor{base.buffer, base.t.narrow(0, first, count)};
}

DeviceTensor ModelRunner::weight(const std::string& name) const { return DeviceTensor{weights_.buffer(name), weights_.get(name)}; }

rt::ByteRange ModelRunner::range_of(const DeviceTensor& d) const {
  const Tensor& t = d.t;
  if (t.numel() == 0) return rt::ByteRange{d.buffer, 0, 0};
  int64_t last = t.offset();
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const int64_t begin = t.dtype() == DType::f4_e2m1 ? t.offset() / 2 : dtype_storage_bytes(t.dtype(), t.offset());
  const int64_t end = dtype_storage_bytes(t.dtype(), last + 1);
  return rt_.range(d.buffer, static_cast<uint64_t>(begin), static_cast<uint64_t>(end));
}

void ModelRunner::op(rt::StreamId stream, const std::string& name, std::vector<DeviceTensor> reads,
                     std::vector<DeviceTensor> writes, std::function<void()> fn, std::function<void()> check) {
  rt::Launch launch;
  launch.op = name;
  for (const auto& r : reads) launch.accesses.push_back({range_of(r), rt::AccessKind::read});
  for (const auto& w : writes) launch.accesses.push_back({range_of(w), rt::AccessKind::write});
  // One body for both backends: the kernels' entry points pick the host or the GPU implementation
  // from where the tensors live, and enqueue GPU work on the stream set here.
  launch.cuda = [fn](void* cuda_stream) {
    kernels::StreamScope scope(cuda_stream);
    fn();
  };
  launch.host = std::move(fn);
  launch.check_contract = std::move(check);
  rt_.launch(stream, std::move(launch));
}

void ModelRunner::probe(rt::StreamId stream, const std::string& key, const DeviceTensor& value, int64_t cols) {
  const int64_t n = value.t.size(0);
  probe_with(stream, key, {value}, [n, cols](const std::vector<Tensor>& v) { return to_mat(v[0], n, cols); });
}

// A probe copies the bytes of its tensors on `stream` into staging buffers of its own (a device copy,
// which graphs capture like any launch); finish_probes() downloads them once the step is done and
// turns them into the record's values. Staging buffers are per probe and per graph, so a replay
// rewrites the buffers its capture named.
void ModelRunner::probe_with(rt::StreamId stream, const std::string& key, std::vector<DeviceTensor> values,
                             std::function<ref::Mat(const std::vector<Tensor>&)> convert) {
  if (!engine_options_.probes || suppress_probes_) return;
  PendingProbe pending{key, {}, std::move(convert)};
  for (size_t i = 0; i < values.size(); ++i) {
    const Tensor& t = values[i].t;
    DSV4_ASSERT(t.dtype() != DType::f4_e2m1, "probes copy whole-byte tensors");
    const rt::ByteRange range = range_of(values[i]);
    const uint64_t bytes = range.end - range.begin;
    const std::string name = "probe." + std::to_string(staging_scope_) + "." + key + "." + std::to_string(i);
    auto it = probe_staging_.find(name);
    if (it == probe_staging_.end() || rt_.bytes(it->second) < bytes) {
      if (it != probe_staging_.end()) rt_.free(it->second);
      const rt::BufferId b = rt_.alloc(engine_options_.device, std::max<uint64_t>(bytes, 1), name);
      it = probe_staging_.insert_or_assign(name, b).first;
    }
    if (bytes > 0) rt_.copy(stream, rt_.range(it->second, 0, bytes), range);
    const int64_t esize = dtype_storage_bytes(t.dtype(), 1);
    const int64_t offset = t.numel() == 0 ? 0 : t.offset() - static_cast<int64_t>(range.begin) / esize;
    pending.sources.push_back({it->second, bytes, t.dtype(), t.shape(), t.strides(), offset});
  }
  pending_probes_.push_back(std::move(pending));
}

void ModelRunner::finish_probes() {
  if (record_ != nullptr) {
    for (const PendingProbe& p : pending_probes_) {
      std::vector<Tensor> views;
      for (const ProbeSource& s : p.sources) {
        Tensor host = Tensor::empty({std::max<int64_t>(1, static_cast<int64_t>(s.bytes))}, DType::u8, "probe");
        if (s.bytes > 0) rt_.download(s.staging, 0, host.data_ptr(), s.bytes);
        const int64_t esize = dtype_storage_bytes(s.dtype, 1);
        const int64_t elements = std::max<int64_t>(1, static_cast<int64_t>(s.bytes) / esize);
        views.push_back(Tensor::over(host.storage(), s.dtype, {elements}).as_strided(s.shape, s.strides, s.offset));
      }
      record_->values[p.key] = p.convert(views);
    }
  }
  pending_probes_.clear();
}

void ModelRunner::wait_on(rt::StreamId waiter, rt::StreamId producer, const std::string& event_name) {
  if (waiter == producer) return;
  auto it = events_.find(event_name);
  if (it == events_.end()) it = events_.emplace(event_name, rt_.create_event(event_name)).first;
  rt_.record(it->second, producer);
  rt_.wait(waiter, it->second);
}

// ---- metadata -----------------------------------------------------------------------------------

void ModelRunner::prepare_metadata(const serving::ForwardBatch& batch, serving::ForwardMetadata& metadata) {
  if (metadata.upgrade()) ++metadata_upgrades_;
  const serving::UpgradedForwardMetadata& up = metadata.upgraded();
  const int64_t T = batch.token_count();
  const int64_t W = swa_width_;
  const int64_t max_seq = slots_.max_seq_len();

  std::vector<int32_t> ids(batch.input_ids.begin(), batch.input_ids.end());
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::vector<int64_t> swa_loc(up.swa_loc.begin(), up.swa_loc.end());
  std::vector<int32_t> swa_idx(static_cast<size_t>(T * W), -1), swa_len(static_cast<size_t>(T), 1);
  // The head's rows: each row's last token, or every token of a TARGET_VERIFY batch.
  const bool verify = batch.mode == serving::ForwardMode::target_verify;
  std::vector<int32_t> last(static_cast<size_t>(verify ? T : batch.row_count()));
  std::vector<int32_t> c4_ctx, c4_bt, c128_idx, c128_len;
  if (has_c4_) {
    c4_ctx.assign(static_cast<size_t>(T), 0);
    c4_bt.assign(static_cast<size_t>(T * c4_pages_), 0);
  }
  if (c128_ratio_ > 0) {
    c128_idx.assign(static_cast<size_t>(T * c128_width_), -1);
    c128_len.assign(static_cast<size_t>(T), 1);
  }
  // The rows' requests for the compress plans, with their state rows.
  std::vector<std::vector<int64_t>> rows4, rows128;

  auto full_row = [&](int64_t slot) { return slot == 0 ? slots_.null_row() : slots_.row(slot); };
  int64_t token = 0;
  for (int64_t r = 0; r < batch.row_count(); ++r) {
    const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
    const std::span<const int32_t> locs = full_row(row.req_slot);
    for (int64_t i = 0; i < row.extend_len(); ++i, ++token) {
      const auto t = static_cast<size_t>(token);
      const int64_t p = up.positions[t];
      pos[t] = static_cast<int32_t>(p);
      int64_t n = 0;
      for (int64_t q = std::max<int64_t>(0, p - W + 1); q <= p; ++q) {
        swa_idx[t * static_cast<size_t>(W) + static_cast<size_t>(n++)] =
            static_cast<int32_t>(swa_.full_to_swa(locs[static_cast<size_t>(q)]));
      }
      swa_len[t] = static_cast<int32_t>(std::max<int64_t>(1, n));
      if (has_c4_) {
        const int64_t ctx = (p + 1) / kC4;
        c4_ctx[t] = static_cast<int32_t>(ctx);
        for (int64_t j = 0; j * kernels::kIndexerPageKeys < ctx; ++j) {
          const int64_t c4 = serving::compressed_loc(locs[static_cast<size_t>(j * kernels::kIndexerPageKeys * kC4)], kC4);
          c4_bt[t * static_cast<size_t>(c4_pages_) + static_cast<size_t>(j)] =
              static_cast<int32_t>(c4 / kernels::kIndexerPageKeys);
        }
      }
      if (c128_ratio_ > 0) {
        const int64_t visible = (p + 1) / c128_ratio_;
        for (int64_t e = 0; e < visible; ++e) {
          c128_idx[t * static_cast<size_t>(c128_width_) + static_cast<size_t>(e)] = static_cast<int32_t>(
              serving::compressed_loc(locs[static_cast<size_t>(e * c128_ratio_)], c128_ratio_));
        }
        c128_len[t] = static_cast<int32_t>(std::max<int64_t>(1, visible));
      }
    }
    if (verify) {
      for (int64_t i = 0; i < row.extend_len(); ++i) {
        last[static_cast<size_t>(token - row.extend_len() + i)] = static_cast<int32_t>(token - row.extend_len() + i);
      }
    } else {
      last[static_cast<size_t>(r)] = static_cast<int32_t>(token - 1);
    }
    // State rows from the start of the unfinished block (one more block on ratio 4).
    auto add_plan_row = [&](int64_t ratio, const serving::CompressStatePool& pool, std::vector<std::vector<int64_t>>& rows) {
      const int64_t hist = kernels::compress_history_start(row.seq_len_before, ratio);
      std::vector<int64_t> state(static_cast<size_t>(row.seq_len_after - hist), -1);
      for (int64_t q = hist; q < row.seq_len_after; ++q) {
        DSV4_ASSERT(q < max_seq, "position past max_seq_len");
        state[static_cast<size_t>(q - hist)] = pool.translate_swa_loc_to_state_row(swa_.full_to_swa(locs[static_cast<size_t>(q)]));
      }
      rows.push_back(std::move(state));
    };
    if (has_c4_) add_plan_row(kC4, *c4_pool_, rows4);
    if (c128_ratio_ > 0) add_plan_row(c128_ratio_, *c128_pool_, rows128);
  }
  auto build = [&](int64_t ratio, const serving::CompressStatePool& pool, const std::vector<std::vector<int64_t>>& rows,
                   ScrubCandidates& scrub) {
    std::vector<kernels::CompressRequestBatch> reqs;
    for (int64_t r = 0; r < batch.row_count(); ++r) {
      const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
      reqs.push_back({row.seq_len_before, row.extend_len(), rows[static_cast<size_t>(r)]});
    }
    // Verify rows may lose their tail: every token then stores its row (the speculative rings keep
    // these writes off rows that committed positions still need).
    const kernels::CompressPlan plan = kernels::build_compress_plan(reqs, ratio, pool.used_row_count(), verify);
    std::vector<int64_t> dest;
    for (const auto& b : plan.blocks) {
      const serving::ForwardRow& row = batch.rows[static_cast<size_t>(b.request)];
      const std::span<const int32_t> locs = full_row(row.req_slot);
      dest.push_back(serving::compressed_loc(locs[static_cast<size_t>(b.block * ratio)], ratio));
    }
    // What the drafts (every token of a verify row but its first, the committed newest token) write:
    // the entries of the blocks they complete and their state rows. The batch saves those bytes
    // first, and scrub_rejected() puts back the ones whose token is rejected.
    scrub = ScrubCandidates{};
    if (verify && engine_options_.draft_tokens > 0) {
      for (size_t b = 0; b < plan.blocks.size(); ++b) {
        const serving::ForwardRow& row = batch.rows[static_cast<size_t>(plan.blocks[b].request)];
        const int64_t i = plan.blocks[b].block * ratio + ratio - 1 - row.seq_len_before;
        if (row.is_padding() || i < 1) continue;
        scrub.entries.push_back({plan.blocks[b].request, i});
        scrub.entry_dest.push_back(dest[b]);
      }
      int64_t t = 0;
      for (int64_t r = 0; r < batch.row_count(); ++r) {
        const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
        for (int64_t i = 0; i < row.extend_len(); ++i, ++t) {
          const int64_t w = plan.write_rows[static_cast<size_t>(t)];
          if (row.is_padding() || i < 1 || w < 0) continue;
          scrub.rows.push_back({r, i});
          scrub.state_row.push_back(w);
        }
      }
      DSV4_ASSERT(static_cast<int64_t>(scrub.entries.size()) <= scrub_capacity_ &&
                      static_cast<int64_t>(scrub.rows.size()) <= scrub_capacity_,
                  "a verify batch backs up at most one entry and one state row per draft");
    }
    std::vector<int64_t> words = kernels::encode_compress_plan(plan, dest);
    DSV4_ASSERT(static_cast<int64_t>(words.size()) <= plan_capacity_, "compress plan larger than its buffer");
    return words;
  };
  std::vector<int64_t> words4, words128;
  if (has_c4_) words4 = build(kC4, *c4_pool_, rows4, c4_scrub_);
  if (c128_ratio_ > 0) words128 = build(c128_ratio_, *c128_pool_, rows128, c128_scrub_);
  if (verify && scrub_capacity_ > 0) {
    auto backup_words = [](const ScrubCandidates& c) {
      std::vector<int64_t> w = {static_cast<int64_t>(c.entry_dest.size())};
      w.insert(w.end(), c.entry_dest.begin(), c.entry_dest.end());
      w.push_back(static_cast<int64_t>(c.state_row.size()));
      w.insert(w.end(), c.state_row.begin(), c.state_row.end());
      return w;
    };
    if (has_c4_) upload_vec(rt_, m_c4_backup_, backup_words(c4_scrub_));
    if (c128_ratio_ > 0) upload_vec(rt_, m_c128_backup_, backup_words(c128_scrub_));
  }

  int64_t T_local = T;
  if (cp_active_) {
    // Per-query arrays hold this rank's tokens; locations, plans and last-token rows stay global.
    const int64_t n = cp_size_, r = cp_rank_;
    T_local = cp_local_tokens(T, n);
    ids = cp_slice(ids, T, 1, r, n, {0});
    pos = cp_slice(pos, T, 1, r, n, {0});
    std::vector<int32_t> swa_pad(static_cast<size_t>(W), -1);
    swa_pad[0] = 0;
    swa_idx = cp_slice(swa_idx, T, W, r, n, swa_pad);
    swa_len = cp_slice(swa_len, T, 1, r, n, {1});
    if (has_c4_) {
      c4_ctx = cp_slice(c4_ctx, T, 1, r, n, {0});
      c4_bt = cp_slice(c4_bt, T, c4_pages_, r, n, std::vector<int32_t>(static_cast<size_t>(c4_pages_), 0));
    }
    if (c128_ratio_ > 0) {
      c128_idx = cp_slice(c128_idx, T, c128_width_, r, n, std::vector<int32_t>(static_cast<size_t>(c128_width_), -1));
      c128_len = cp_slice(c128_len, T, 1, r, n, {1});
    }
  }
  if (mtp_layer_ && in_batch_mtp()) {
    // Verify batches take every token's next id from the target's own prediction (the hints stay -1).
    std::vector<int32_t> hint(last.size(), -1);
    if (!verify) {
      for (size_t r = 0; r < row_next_ids_.size() && r < hint.size(); ++r) hint[r] = row_next_ids_[r];
    }
    upload_vec(rt_, m_row_next_, hint);
    plan_draft_extend(verify, pos, swa_loc, swa_idx, swa_len);
  }
  // The raw metadata, then the upgraded form (bug class A2: on the host, before any launch, unless
  // the fault defers it to its first consumer).
  upload_vec(rt_, m_ids_, ids);
  upload_vec(rt_, m_pos_, pos);
  upload_vec(rt_, m_swa_loc_, swa_loc);
  upload_vec(rt_, m_last_, last);
  staged_.clear();
  upgrade_pending_ = faults::enabled(faults::Fault::lazy_upgrade_on_alt_stream);
  auto upgraded = [&](const DeviceTensor& d, const auto& v) {
    if (!upgrade_pending_) return upload_vec(rt_, d, v);
    const auto* bytes = reinterpret_cast<const uint8_t*>(v.data());
    staged_.push_back({d, std::vector<uint8_t>(bytes, bytes + v.size() * sizeof(v[0]))});
  };
  upgraded(m_swa_idx_, swa_idx);
  upgraded(m_swa_len_, swa_len);
  if (has_c4_) {
    upgraded(m_c4_plan_, words4);
    upgraded(m_c4_ctx_, c4_ctx);
    upgraded(m_c4_block_table_, c4_bt);
    Tensor ctx = Tensor::empty({T_local, 1}, DType::i32, "c4_context_lens");
    if (T_local > 0) std::memcpy(ctx.data_ptr(), c4_ctx.data(), c4_ctx.size() * 4);
    // Fault indexer-schedule-layout-mismatch (seed bug A3): a verify batch's schedule built from
    // its (bs, next_n) context lengths while the kernel runs them as (N_total, 1).
    const int64_t next_n = 1 + engine_options_.draft_tokens;
    if (verify && next_n > 1 && faults::enabled(faults::Fault::indexer_schedule_layout_mismatch)) {
      ctx = ctx.view({T_local / next_n, next_n});
    }
    const Tensor sched = kernels::build_indexer_schedule(ctx, kernels::kIndexerPageKeys, engine_options_.indexer_sms);
    const std::vector<int32_t> schedule(sched.data<int32_t>(), sched.data<int32_t>() + sched.numel());
    if (replay_ && faults::enabled(faults::Fault::frozen_metadata_not_refreshed)) {
      // Fault frozen-metadata-not-refreshed (seed bug A3): the refresh rebinds the schedule on the
      // frozen metadata, which refuses; the error is swallowed and the captured schedule stays.
      try {
        metadata.set_raw(metadata.raw());
        upgraded(m_c4_schedule_, schedule);
      } catch (const ContractError&) {
        ++refresh_errors_swallowed_;
      }
    } else {
      upgraded(m_c4_schedule_, schedule);
    }
  }
  if (c128_ratio_ > 0) {
    upgraded(m_c128_plan_, words128);
    upgraded(m_c128_idx_, c128_idx);
    upgraded(m_c128_len_, c128_len);
  }
}

void ModelRunner::plan_draft_extend(bool verify, const std::vector<int32_t>& pos, const std::vector<int64_t>& swa_loc,
                                    const std::vector<int32_t>& swa_idx, const std::vector<int32_t>& swa_len) {
  // The MTP block attends over the same positions as the batch (DRAFT_EXTEND_V2 runs it over every
  // verified token). Fault draft-extend-v2-not-planned (seed bug A3): V2 skips this planning and the
  // draft attends with the previous step's positions and window.
  if (verify && faults::enabled(faults::Fault::draft_extend_v2_not_planned)) return;
  upload_vec(rt_, m_mtp_pos_, pos);
  upload_vec(rt_, m_mtp_swa_loc_, swa_loc);
  upload_vec(rt_, m_mtp_swa_idx_, swa_idx);
  upload_vec(rt_, m_mtp_swa_len_, swa_len);
}

void ModelRunner::upgrade_on_first_use(rt::StreamId stream) {
  // Fault lazy-upgrade-on-alt-stream (seed bug A2): whichever stream reaches the metadata first
  // writes it there; the others find it "upgraded" and read it with no event.
  if (!upgrade_pending_) return;
  upgrade_pending_ = false;
  std::vector<DeviceTensor> writes;
  for (const auto& s : staged_) writes.push_back(s.target);
  op(stream, "metadata.upgrade", {}, writes, [this] {
    for (const auto& s : staged_) {
      Tensor target = s.target.t;
      kernels::copy_from_host(target, s.bytes.data(), static_cast<int64_t>(s.bytes.size()));
    }
  });
}

// ---- the forward --------------------------------------------------------------------------------

void ModelRunner::issue_linear(rt::StreamId stream, const std::string& weight, const DeviceTensor& x,
                               const DeviceTensor& out_ref) {
  DeviceTensor out = out_ref;
  const std::string scale = weight.substr(0, weight.size() - std::string(".weight").size()) + ".scale";
  DeviceTensor w{weights_.buffer(weight), weights_.get(weight)};
  std::vector<DeviceTensor> reads = {x, w};
  Tensor s;
  if (weights_.has(scale)) {
    reads.push_back(DeviceTensor{weights_.buffer(scale), weights_.get(scale)});
    s = reads.back().t;
  }
  const int64_t block = config_.weight_block_size;
  op(stream, weight, reads, {out}, [x, w, s, out, block]() mutable { project(x.t, w.t, s, out.t, block); });
}

void ModelRunner::issue_compressor(rt::StreamId stream, Layer& L, bool indexer, int64_t T) {
  upgrade_on_first_use(stream);
  const int64_t ratio = L.ratio;
  const int64_t coff = ratio == kC4 ? 2 : 1;
  const int64_t dims = indexer ? config_.index_head_dim : config_.head_dim;
  const std::string p = L.prefix + (indexer ? ".attn.indexer.compressor" : ".attn.compressor");
  DeviceTensor kv = view(indexer ? ikv_ : ckv_, {T, coff * dims});
  DeviceTensor score = view(indexer ? iscore_ : cscore_, {T, coff * dims});
  DeviceTensor xn = rows(xn_, T);
  DeviceTensor wkv{weights_.buffer(p + ".wkv.weight"), weights_.get(p + ".wkv.weight")};
  DeviceTensor wgate{weights_.buffer(p + ".wgate.weight"), weights_.get(p + ".wgate.weight")};
  DeviceTensor ape{weights_.buffer(p + ".ape"), weights_.get(p + ".ape")};
  DeviceTensor norm{weights_.buffer(p + ".norm.weight"), weights_.get(p + ".norm.weight")};
  DeviceTensor pos = rows(m_pos_, T);
  DeviceTensor plan_buf = ratio == kC4 ? m_c4_plan_ : m_c128_plan_;
  DeviceTensor state = indexer ? L.idx_state : L.comp_state;
  const kernels::CompressStateLayout layout = indexer ? L.idx_state_layout : L.comp_state_layout;
  DeviceTensor entries = indexer ? ientries_ : centries_;
  DeviceTensor cache = indexer ? L.idx_keys : L.comp_cache;

  // Under CP the projections are the rank's rows, gathered into global order before pooling.
  DeviceTensor kv_global = kv, score_global = score;
  if (cp_active_) {
    kv_global = view(indexer ? ikv_ : ckv_, {cp_global_tokens_, coff * dims});
    score_global = view(indexer ? iscore_ : cscore_, {cp_global_tokens_, coff * dims});
    kv = view(cp_c_local_kv_, {T, coff * dims});
    score = view(cp_c_local_score_, {T, coff * dims});
  }
  op(stream, p + ".wkv", {xn, wkv}, {kv}, [xn, wkv, kv]() mutable { kernels::moe_gate_logits(xn.t, wkv.t, kv.t); });
  op(stream, p + ".wgate", {xn, wgate, ape, pos}, {score}, [xn, wgate, ape, pos, score, ratio]() mutable {
    kernels::moe_gate_logits(xn.t, wgate.t, score.t);
    kernels::add_position_bias(score.t, ape.t, pos.t, ratio);
  });
  probe(stream, p + ".kv", kv, coff * dims);
  probe(stream, p + ".score", score, coff * dims);
  if (cp_active_) {
    cp_gather(kv, kv_global);
    cp_gather(score, score_global);
    kv = kv_global;
    score = score_global;
  }

  kernels::CompressPostprocess post;
  post.bf16_act = true;
  post.norm_eps = config_.norm_eps;
  if (indexer) {
    post.rotate = true;
    if (config_.indexer_quant == "fp8") {
      post.quant = kernels::CompressQuant::fp8_vector;
      post.quant_block = dims;
    } else {
      post.quant = kernels::CompressQuant::fp4;
      post.quant_block = config_.fp4_block_size;
    }
  } else {
    post.quant = kernels::CompressQuant::fp8_nope;
    post.quant_block = config_.kv_block_size;
  }
  const Tensor freqs = L.freqs;
  const kernels::Model1Layout kv_layout = L.kv_layout;
  const int64_t page_entries = L.comp_page_entries;
  // Pool every block completed in this batch, then store the new rows (a long batch may recycle a
  // ring row that a block of the same batch still reads), then write the entries to the cache.
  op(stream, p + ".pool", {kv, score, state, plan_buf, norm}, {entries},
     [kv, score, state, plan_buf, norm, entries, layout, freqs, post, ratio]() mutable {
       kernels::compressor_pool(plan_buf.t, ratio, kv.t, score.t, state.t, layout, norm.t, freqs, post, entries.t);
     });
  // Speculative verify batches: the state rows and entries the drafts are about to overwrite, saved
  // for scrub_rejected() (candidates from the plan, ScrubCandidates).
  const bool backup = batch_mode_ == serving::ForwardMode::target_verify && scrub_capacity_ > 0;
  DeviceTensor backup_meta = ratio == kC4 ? m_c4_backup_ : m_c128_backup_;
  if (backup) {
    DeviceTensor saved = indexer ? L.idx_state_backup : L.state_backup;
    op(stream, p + ".backup_state", {state, backup_meta}, {saved}, [state, backup_meta, saved]() mutable {
      kernels::backup_state_rows(state.t, backup_meta.t, saved.t);
    });
  }
  op(stream, p + ".write_state", {kv, score, plan_buf}, {state}, [kv, score, state, plan_buf, layout, ratio]() mutable {
    kernels::compressor_write_state(plan_buf.t, ratio, kv.t, score.t, state.t, layout);
  });
  if (backup) {
    DeviceTensor saved = indexer ? L.idx_keys_backup : L.comp_backup;
    const kernels::EntrySpans spans = kernels::entry_spans(indexer, dims, kv_layout, page_entries);
    op(stream, p + ".backup_entries", {cache, backup_meta}, {saved}, [cache, backup_meta, saved, spans]() mutable {
      kernels::backup_entries(cache.t, backup_meta.t, spans, saved.t);
    });
  }
  op(stream, p + ".store", {entries, plan_buf}, {cache},
     [entries, plan_buf, cache, ratio, indexer, kv_layout, page_entries]() mutable {
       if (indexer) {
         kernels::compressor_store(plan_buf.t, ratio, entries.t, cache.t);
       } else {
         kernels::compressor_store(plan_buf.t, ratio, entries.t, cache.t, kv_layout, page_entries);
       }
     });
}

void ModelRunner::issue_indexer(Layer& L, int64_t T, rt::EventId q_lora_ready) {
  const std::string p = L.prefix + ".attn.indexer";
  const int64_t Hi = config_.index_n_heads, Di = config_.index_head_dim;
  const rt::StreamId s_idx = streams_->indexer, s_q = streams_->indexer_q, s_w = streams_->indexer_w;
  issue_compressor(s_idx, L, /*indexer=*/true, T);

  // weights_proj(x) * (Di^-0.5 * Hi^-0.5), rounded to bf16, on the weights stream.
  DeviceTensor xn = rows(xn_, T);
  DeviceTensor wraw = rows(iw_bf16_, T), w = rows(iw_, T);
  issue_linear(s_w, p + ".weights_proj.weight", xn, wraw);
  const float w_scale = static_cast<float>(std::pow(static_cast<double>(Di), -0.5) * std::pow(static_cast<double>(Hi), -0.5));
  op(s_w, p + ".weights_scale", {wraw}, {w}, [wraw, w, w_scale]() mutable { kernels::scale_bf16(wraw.t, w_scale, w.t); });
  probe(s_w, p + ".weights", w, Hi);

  // The query on its own stream once q_lora and the weights are ready.
  if (s_q != main_) rt_.wait(s_q, q_lora_ready);
  wait_on(s_q, s_w, p + ".weights_ready");
  DeviceTensor qr = rows(qr_, T), iq = rows(iq_, T), iq32 = rows(iq32_, T), pos = rows(m_pos_, T);
  issue_linear(s_q, p + ".wq_b.weight", qr, iq);
  const Tensor freqs = L.freqs;
  const kernels::IndexerQuant quant = config_.indexer_quant == "fp8" ? kernels::IndexerQuant::fp8 : kernels::IndexerQuant::fp4;
  const int64_t qblock = quant == kernels::IndexerQuant::fp8 ? Di : config_.fp4_block_size;
  op(s_q, kernels::kIndexerQOp, {iq, pos}, {iq}, [iq, pos, Hi, Di, freqs, quant, qblock]() mutable {
    kernels::indexer_q(iq.t, Hi, Di, freqs, pos.t, quant, qblock);
  });
  op(s_q, p + ".q_f32", {iq}, {iq32}, [iq, iq32]() mutable { kernels::cast(iq.t, iq32.t); });
  probe(s_q, p + ".q", iq, Hi * Di);
  wait_on(s_idx, s_q, p + ".q_ready");

  // Logits: the persistent kernel over the (N_total, 1) layout, then the top-k.
  kernels::IndexerLogitsArgs args;
  args.q = iq32.t.view({T, 1, Hi, Di});
  args.kv_pages = L.idx_keys.t;
  args.block_table = rows(m_c4_block_table_, T).t;
  args.weights = w.t;
  args.context_lens = rows(m_c4_ctx_, T).t;
  args.schedule = m_c4_schedule_.t;
  args.logits = rows(ilogits_, T).t;
  args.block_kv = kernels::kIndexerPageKeys;
  args.num_sms = engine_options_.indexer_sms;
  rt::Launch launch;
  launch.op = kernels::kIndexerLogitsOp;
  for (const DeviceTensor& r : {iq32, L.idx_keys, rows(m_c4_block_table_, T), w, rows(m_c4_ctx_, T), m_c4_schedule_}) {
    launch.accesses.push_back({range_of(r), rt::AccessKind::read});
  }
  launch.accesses.push_back({range_of(rows(ilogits_, T)), rt::AccessKind::write});
  launch.blocks = static_cast<int>(engine_options_.indexer_sms);
  // sim runs the blocks as coroutines (a wait that can never end is a HangError); cuda runs the
  // persistent kernel, whose waits are bounded on the device.
  if (rt_.kind() == rt::BackendKind::sim) launch.cooperative = kernels::make_indexer_logits_launch(args);
  launch.cuda = [args](void* cuda_stream) {
    kernels::StreamScope scope(cuda_stream);
    kernels::indexer_logits(args);
  };
  rt_.launch(s_idx, std::move(launch));

  DeviceTensor logits = rows(ilogits_, T), topk = rows(itopk_, T), bt = rows(m_c4_block_table_, T);
  probe(s_idx, p + ".scores", logits, max_context_);
  DeviceTensor idx = rows(m_c4_idx_, T), len = rows(m_c4_len_, T);
  const int64_t K = config_.index_topk;
  op(s_idx, p + ".topk", {logits, bt}, {topk, idx, len}, [logits, bt, topk, idx, len, K]() mutable {
    kernels::indexer_topk(logits.t, bt.t, K, topk.t, idx.t, len.t);
  });
  probe(s_idx, p + ".topk", topk, K);
}

void ModelRunner::issue_attention(Layer& L, int64_t T) {
  const std::string p = L.prefix + ".attn";
  const int64_t H = config_.n_heads, D = config_.head_dim, ql = config_.q_lora_rank;
  DeviceTensor xn = rows(xn_, T), qkv = rows(qkv_a_, T), qr = rows(qr_, T), q = rows(q_, T);
  // The MTP block attends with its own planned metadata (plan_draft_extend, or the draft forward's).
  const bool mtp = &L == mtp_layer_.get();
  DeviceTensor pos = mtp ? mtp_meta_.pos : rows(m_pos_, T);
  DeviceTensor swa_idx = mtp ? mtp_meta_.swa_idx : rows(m_swa_idx_, T);
  DeviceTensor swa_len = mtp ? mtp_meta_.swa_len : rows(m_swa_len_, T);
  DSV4_ASSERT(pos.t.size(0) == T && swa_idx.t.size(0) == T && swa_len.t.size(0) == T, "one metadata row per token");

  // Fork the alt streams from main (each waits for attn_norm's output).
  const bool ms = multi_stream_now();
  const std::string tag = L.prefix + ".";
  if (ms) {
    wait_on(streams_->kv, main_, tag + "fork");
    if (L.ratio > 0) rt_.wait(streams_->compressor, events_.at(tag + "fork"));
    if (L.ratio == kC4) {
      rt_.wait(streams_->indexer, events_.at(tag + "fork"));
      rt_.wait(streams_->indexer_w, events_.at(tag + "fork"));
    }
  }
  // main: qkv_a = [wq_a(x) | wkv(x)], then q_lora = q_norm(qkv_a[:, :q_lora]).
  DeviceTensor qa{qkv.buffer, qkv.t.narrow(1, 0, ql)}, kva{qkv.buffer, qkv.t.narrow(1, ql, D)};
  issue_linear(main_, p + ".wq_a.weight", xn, qa);
  issue_linear(main_, p + ".wkv.weight", xn, kva);
  wait_on(streams_->kv, main_, tag + "qkv_a_ready");
  DeviceTensor qnorm{weights_.buffer(p + ".q_norm.weight"), weights_.get(p + ".q_norm.weight")};
  const double eps = config_.norm_eps;
  op(main_, kernels::kRmsNormOp, {qa, qnorm}, {qr}, [qa, qnorm, qr, eps]() mutable { kernels::rms_norm(qa.t, qnorm.t, eps, qr.t); });
  probe(main_, p + ".qr", qr, ql);
  rt::EventId q_lora_ready;
  if (ms) {
    const std::string name = tag + "q_lora_ready";
    auto it = events_.find(name);
    if (it == events_.end()) it = events_.emplace(name, rt_.create_event(name)).first;
    q_lora_ready = it->second;
    rt_.record(q_lora_ready, main_);
  }

  // indexer streams (ratio 4).
  if (L.ratio == kC4) issue_indexer(L, T, q_lora_ready);

  // kv stream: norm + RoPE + FP8 store into the SWA cache.
  DeviceTensor kvnorm{weights_.buffer(p + ".kv_norm.weight"), weights_.get(p + ".kv_norm.weight")};
  DeviceTensor swa_loc = mtp ? mtp_meta_.swa_loc : rows(m_swa_loc_, T);
  const Tensor freqs = L.freqs;
  const int64_t swa_ps = options_.swa_page_size, kvb = config_.kv_block_size;
  DeviceTensor swa_cache = L.swa_cache;
  if (cp_active_) {
    // Prefill CP: the slice qkv_a[:, q_lora:] made contiguous, normed and rotated in place (the
    // in-place kernel refuses the strided slice itself), gathered in global order, and stored whole.
    DeviceTensor kvc = rows(cp_kv_local_, T), kvg = rows(cp_kv_global_, cp_global_tokens_);
    auto make_contiguous = [&] {
      op(main_, "contiguous", {kva}, {kvc}, [kva, kvc]() mutable { kernels::copy_rows(kva.t, kvc.t); });
    };
    // Fault kv-slice-noncontiguous (seed bug A1): the slice itself goes to the contiguous-only
    // kernel, and only the all-gather's input is made contiguous. One token per rank hides it.
    const bool slice_fault = faults::enabled(faults::Fault::kv_slice_noncontiguous);
    if (!slice_fault) make_contiguous();
    DeviceTensor normed = slice_fault ? kva : kvc;
    op(main_, kernels::kNormRopeOp, {normed, kvnorm, pos}, {normed}, [normed, kvnorm, eps, freqs, pos]() mutable {
      kernels::fused_norm_rope_inplace(normed.t, kvnorm.t, eps, freqs, pos.t);
    });
    if (slice_fault) make_contiguous();
    cp_gather(kvc, kvg);
    DeviceTensor gloc = rows(m_swa_loc_, cp_global_tokens_);
    const kernels::Model1Layout lay = L.kv_layout;
    op(main_, "store_kv", {kvg, gloc}, {swa_cache}, [kvg, gloc, swa_cache, lay, swa_ps]() mutable {
      kernels::store_kv_model1(kvg.t, lay.rope_dim, gloc.t, swa_cache.t, swa_ps, lay.scale_block);
    });
  } else {
    op(streams_->kv, kernels::kNormRopeStoreOp, {kva, kvnorm, pos, swa_loc}, {swa_cache},
       [kva, kvnorm, eps, freqs, pos, swa_loc, swa_cache, swa_ps, kvb]() mutable {
         kernels::fused_norm_rope_store_kv(kva.t, kvnorm.t, eps, freqs, pos.t, swa_loc.t, swa_cache.t, swa_ps, kvb);
       });
  }
  if (engine_options_.probes && !cp_active_ && !suppress_probes_) {
    const kernels::Model1Layout lay = L.kv_layout;
    probe_with(streams_->kv, p + ".kv", {swa_cache, swa_loc}, [lay, swa_ps, T, D](const std::vector<Tensor>& v) {
      ref::Mat m(T, D);
      for (int64_t t = 0; t < T; ++t) kernels::model1_unpack(lay, swa_ps, v[0].data<uint8_t>(), v[1].data<int64_t>()[t], m.row(t));
      return m;
    });
  }

  // compressor stream.
  if (L.ratio > 0) issue_compressor(streams_->compressor, L, /*indexer=*/false, T);

  // main: q = wq_b(q_lora), per-head norm + RoPE; then join and attend.
  issue_linear(main_, p + ".wq_b.weight", qr, q);
  op(main_, kernels::kQNormRopeOp, {q, pos}, {q}, [q, H, D, eps, freqs, pos]() mutable {
    kernels::q_norm_rope_inplace(q.t, H, D, eps, freqs, pos.t);
  });
  probe(main_, p + ".q", q, H * D);
  if (ms) {
    wait_on(main_, streams_->kv, tag + "kv_done");
    if (L.ratio > 0) wait_on(main_, streams_->compressor, tag + "compressor_done");
    if (L.ratio == kC4) wait_on(main_, streams_->indexer, tag + "indexer_done");
  }

  upgrade_on_first_use(main_);
  kernels::SparseAttentionArgs a;
  a.q = q.t.view({T, H, D});
  a.swa_cache = L.swa_cache.t;
  a.swa_page_size = swa_ps;
  a.swa_indices = swa_idx.t;
  a.swa_lens = swa_len.t;
  std::vector<DeviceTensor> reads = {q, L.swa_cache, swa_idx, swa_len};
  if (L.ratio > 0) {
    DeviceTensor ei = L.ratio == kC4 ? rows(m_c4_idx_, T) : rows(m_c128_idx_, T);
    DeviceTensor el = L.ratio == kC4 ? rows(m_c4_len_, T) : rows(m_c128_len_, T);
    a.extra_cache = L.comp_cache.t;
    a.extra_page_size = L.comp_page_entries;
    a.extra_indices = ei.t;
    a.extra_lens = el.t;
    reads.push_back(L.comp_cache);
    reads.push_back(ei);
    reads.push_back(el);
  }
  DeviceTensor sink{weights_.buffer(p + ".attn_sink"), weights_.get(p + ".attn_sink")};
  reads.push_back(sink);
  a.attn_sink = sink.t;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.rope_dim = config_.rope_head_dim;
  a.kv_block = kvb;
  DeviceTensor o = rows(o_, T);
  a.out = o.t.view({T, H, D});
  // The kernel checks its contract when it runs: the c4 indices come from the top-k launch before it.
  op(main_, kernels::kSparseAttentionOp, reads, {o}, [a]() { kernels::sparse_attention(a); });
  op(main_, kernels::kInverseRopeOp, {o, pos}, {o}, [o, H, D, freqs, pos]() mutable {
    kernels::inverse_rope_inplace(o.t, H, D, freqs, pos.t);
  });
  probe(main_, p + ".o", o, H * D);
  DeviceTensor u = rows(u_, T), out = rows(attn_out_, T);
  DeviceTensor wo_a{weights_.buffer(p + ".wo_a.weight"), weights_.get(p + ".wo_a.weight")};
  const int64_t G = config_.o_groups;
  op(main_, kernels::kGroupedWoAOp, {o, wo_a}, {u}, [o, wo_a, G, u]() mutable { kernels::grouped_wo_a(o.t, wo_a.t, G, u.t); });
  issue_linear(main_, p + ".wo_b.weight", u, out);
  probe(main_, p + ".out", out, config_.dim);
}

void ModelRunner::issue_moe(Layer& L, int64_t T) {
  const std::string p = L.prefix + ".ffn";
  const int64_t d = config_.dim, E = config_.n_routed_experts, k = config_.n_activated_experts;
  DeviceTensor xn = rows(xn_, T), logits = rows(gate_logits_, T), experts = rows(experts_, T);
  // The MTP block routes by its next ids (the reference's token_ids of the block), the layers by the batch's.
  DeviceTensor ew = rows(expert_weights_, T), ids = &L == mtp_layer_.get() ? mtp_meta_.ids : rows(m_ids_, T);
  DeviceTensor gw{weights_.buffer(p + ".gate.weight"), weights_.get(p + ".gate.weight")};
  op(main_, p + ".gate.logits", {xn, gw}, {logits}, [xn, gw, logits]() mutable { kernels::moe_gate_logits(xn.t, gw.t, logits.t); });
  std::vector<DeviceTensor> gate_reads = {logits, ids};
  Tensor bias, tid2eid;
  if (L.hash) {
    DeviceTensor tb{weights_.buffer(p + ".gate.tid2eid"), weights_.get(p + ".gate.tid2eid")};
    gate_reads.push_back(tb);
    tid2eid = tb.t;
  } else {
    DeviceTensor bb{weights_.buffer(p + ".gate.bias"), weights_.get(p + ".gate.bias")};
    gate_reads.push_back(bb);
    bias = bb.t;
  }
  const float route_scale = static_cast<float>(config_.route_scale);
  op(main_, p + ".gate", gate_reads, {experts, ew}, [logits, bias, tid2eid, ids, k, route_scale, experts, ew]() mutable {
    kernels::moe_gate(logits.t, bias, tid2eid, ids.t, k, route_scale, experts.t, ew.t);
  });
  probe(main_, p + ".gate.experts", experts, k);
  probe(main_, p + ".gate.weights", ew, k);

  // The shared expert on alt stream 0, overlapping the routed experts on main.
  const bool ms = multi_stream_now();
  const rt::StreamId s_shared = streams_->kv;
  if (ms) wait_on(s_shared, main_, L.prefix + ".moe_fork");
  DeviceTensor g = rows(sg_, T), u = rows(su_, T), h = rows(sh_, T), so = rows(shared_out_, T);
  issue_linear(s_shared, p + ".shared_experts.w1.weight", xn, g);
  issue_linear(s_shared, p + ".shared_experts.w3.weight", xn, u);
  const float limit = config_.clamp_shared_expert ? static_cast<float>(config_.swiglu_limit) : 0.0f;
  op(s_shared, p + ".shared_experts.swiglu", {g, u}, {h}, [g, u, h, limit]() mutable {
    kernels::swiglu_clamp(g.t, u.t, limit, Tensor(), h.t);
  });
  issue_linear(s_shared, p + ".shared_experts.w2.weight", h, so);

  // Routed experts: the rows of each expert gathered, FP4 (or FP8) GEMMs, SwiGLU with the routing
  // weight, and scattered back to routed[t, j].
  DeviceTensor routed = rows(routed_, T);
  std::vector<DeviceTensor> reads = {xn, experts, ew, L.expert_table};
  for (int64_t e = 0; e < E; ++e) {
    const std::string ep = p + ".experts." + std::to_string(e) + ".";
    for (const char* n : {"w1.weight", "w1.scale", "w2.weight", "w2.scale", "w3.weight", "w3.scale"}) {
      reads.push_back(DeviceTensor{weights_.buffer(ep + n), weights_.get(ep + n)});
    }
  }
  kernels::MoeExpertsConfig mc;
  mc.format = engine_options_.w8a8_int8          ? kernels::ExpertFormat::int8
              : config_.expert_dtype == "fp4" ? kernels::ExpertFormat::fp4
                                              : kernels::ExpertFormat::fp8;
  mc.act_block = config_.act_block_size;
  mc.fp4_block = config_.fp4_block_size;
  mc.weight_block = config_.weight_block_size;
  mc.swiglu_limit = static_cast<float>(config_.swiglu_limit);
  const std::vector<kernels::ExpertWeights>* ws = &L.experts;
  const DeviceTensor table = L.expert_table;
  op(main_, p + ".experts", reads, {routed}, [xn, experts, ew, ws, table, mc, routed]() mutable {
    kernels::moe_experts(xn.t, experts.t, ew.t, *ws, table.t, mc, routed.t);
  });
  if (ms) wait_on(main_, s_shared, L.prefix + ".shared_done");
  DeviceTensor out = rows(ffn_out_, T);
  op(main_, p + ".combine", {routed, so}, {out}, [routed, so, out]() mutable { kernels::moe_combine(routed.t, so.t, out.t); });
  probe(main_, p + ".out", out, d);
}

// One block (attention and MoE between their mHC mixes): R -> Rout, with Rm in between.
void ModelRunner::issue_block(Layer& L, int64_t T, const DeviceTensor& R, const DeviceTensor& Rout) {
  const int64_t d = config_.dim, hc = config_.hc_mult;
  const double eps = config_.norm_eps, hc_eps = config_.hc_eps;
  const int64_t iters = config_.hc_sinkhorn_iters;
  DeviceTensor Rm = rows(R_mid_, T), x = rows(x_, T), xn = rows(xn_, T), post = rows(post_, T), comb = rows(comb_, T);
  const std::string& p = L.prefix;
  auto pre = [&](const std::string& which, const DeviceTensor& Rin, const std::string& norm, const std::string& key) {
    DeviceTensor fn = weight(p + ".hc_" + which + "_fn"), base = weight(p + ".hc_" + which + "_base");
    DeviceTensor scale = weight(p + ".hc_" + which + "_scale"), nw = weight(p + "." + norm + ".weight");
    op(main_, kernels::kHcPreOp, {Rin, fn, base, scale}, {x, post, comb},
       [Rin, fn, base, scale, hc_eps, eps, iters, x, post, comb]() mutable {
         kernels::hc_pre(Rin.t, fn.t, base.t, scale.t, hc_eps, eps, iters, x.t, post.t, comb.t);
       });
    op(main_, kernels::kRmsNormOp, {x, nw}, {xn}, [x, nw, eps, xn]() mutable { kernels::rms_norm(x.t, nw.t, eps, xn.t); });
    probe(main_, p + "." + key, xn, d);
  };
  auto hc_post = [&](DeviceTensor F, DeviceTensor Rin, DeviceTensor Rnext) {
    op(main_, kernels::kHcPostOp, {F, Rin, post, comb}, {Rnext}, [F, Rin, post, comb, Rnext]() mutable {
      kernels::hc_post(F.t, Rin.t, post.t, comb.t, Rnext.t);
    });
  };
  pre("attn", R, "attn_norm", "attn_norm");
  issue_attention(L, T);
  hc_post(rows(attn_out_, T), R, Rm);
  pre("ffn", Rm, "ffn_norm", "ffn_norm");
  issue_moe(L, T);
  hc_post(rows(ffn_out_, T), Rm, Rout);
  probe(main_, p + ".residual", Rout, hc * d);
}

// hc_head (of `prefix`: "" or "mtp.0."), the final norm and the shared f32 head on each row's last
// token of R, into logits [nrows, vocab].
void ModelRunner::issue_head(const DeviceTensor& R, const DeviceTensor& last, const std::string& prefix,
                             const std::string& norm, const DeviceTensor& logits) {
  const double eps = config_.norm_eps, hc_eps = config_.hc_eps;
  const int64_t nrows = last.t.size(0);
  DeviceTensor lR = rows(last_R_, nrows), y = rows(head_y_, nrows);
  DeviceTensor yn = rows(head_yn_, nrows);
  op(main_, "gather_last", {R, last}, {lR}, [R, last, lR]() mutable { kernels::gather_rows(R.t, last.t, lR.t); });
  DeviceTensor fn = weight(prefix + "hc_head_fn"), base = weight(prefix + "hc_head_base");
  DeviceTensor scale = weight(prefix + "hc_head_scale"), nw = weight(norm), head = weight("head.weight");
  op(main_, kernels::kHcHeadOp, {lR, fn, base, scale}, {y}, [lR, fn, base, scale, hc_eps, eps, y]() mutable {
    kernels::hc_head(lR.t, fn.t, base.t, scale.t, hc_eps, eps, y.t);
  });
  op(main_, kernels::kRmsNormOp, {y, nw}, {yn}, [y, nw, eps, yn]() mutable { kernels::rms_norm(y.t, nw.t, eps, yn.t); });
  DeviceTensor out = logits;
  op(main_, "head", {yn, head}, {out}, [yn, head, out]() mutable { kernels::moe_gate_logits(yn.t, head.t, out.t); });
}

// The MTP block (dsv4-model §4.3) drafting from this batch: position p takes the target's final
// residual at p and the token at p + 1 (the row's next input, or for its last token the token just
// sampled, or the next prompt token for a chunk inside the prompt); e_proj(enorm(embed)) is added
// to h_proj(hnorm(copy c)) for every copy, the SWA-only block runs on its own cache, and its
// hc_head, norm and the shared head give the draft logits of each row's last token.
void ModelRunner::issue_mtp(const DeviceTensor& R_final, int64_t T, int64_t nrows) {
  DeviceTensor logits = rows(logits_, nrows), sampled = rows(m_sampled_, nrows), last = rows(m_last_, nrows);
  DeviceTensor hint = rows(m_row_next_, nrows), ids = rows(m_ids_, T), next = rows(m_next_ids_, T);
  op(main_, "greedy", {logits}, {sampled}, [logits, sampled]() mutable { kernels::argmax_rows(logits.t, sampled.t); });
  op(main_, "mtp_next_ids", {ids, last, hint, sampled}, {next}, [ids, last, hint, sampled, next]() mutable {
    kernels::mtp_next_ids(ids.t, last.t, hint.t, sampled.t, next.t);
  });
  mtp_meta_ = {rows(m_mtp_pos_, T), rows(m_mtp_swa_loc_, T), rows(m_mtp_swa_idx_, T), rows(m_mtp_swa_len_, T), next};
  issue_mtp_block(R_final, T, next, last, rows(draft_logits_, nrows), rows(mtp_R_out_, T));
}

void ModelRunner::issue_mtp_block(const DeviceTensor& hidden, int64_t T, const DeviceTensor& next,
                                  const DeviceTensor& last, const DeviceTensor& draft, const DeviceTensor& Rout) {
  const int64_t d = config_.dim, hc = config_.hc_mult, V = config_.vocab_size;
  const double eps = config_.norm_eps;
  Layer& L = *mtp_layer_;
  DeviceTensor embed = weight("embed.weight"), e = rows(mtp_e_, T), en = rows(mtp_en_, T), ep = rows(mtp_ep_, T);
  op(main_, "mtp.embed", {next, embed}, {e}, [next, embed, e]() mutable { kernels::embed_rows(next.t, embed.t, 1, e.t); });
  DeviceTensor enorm = weight("mtp.0.enorm.weight"), hnorm = weight("mtp.0.hnorm.weight");
  op(main_, kernels::kRmsNormOp, {e, enorm}, {en}, [e, enorm, eps, en]() mutable { kernels::rms_norm(e.t, enorm.t, eps, en.t); });
  issue_linear(main_, "mtp.0.e_proj.weight", en, ep);
  DeviceTensor R = rows(mtp_R_, T), hn = rows(mtp_hn_, T), hp = rows(mtp_hp_, T);
  for (int64_t c = 0; c < hc; ++c) {
    DeviceTensor copy{hidden.buffer, hidden.t.narrow(1, c * d, d)};
    op(main_, kernels::kRmsNormOp, {copy, hnorm}, {hn}, [copy, hnorm, eps, hn]() mutable {
      kernels::rms_norm(copy.t, hnorm.t, eps, hn.t);
    });
    issue_linear(main_, "mtp.0.h_proj.weight", hn, hp);
    DeviceTensor Rc{R.buffer, R.t.narrow(1, c * d, d)};
    op(main_, "mtp.combine", {ep, hp}, {Rc}, [ep, hp, Rc]() mutable { kernels::add_bf16(ep.t, hp.t, Rc.t); });
  }
  issue_block(L, T, R, Rout);
  issue_head(Rout, last, "mtp.0.", "mtp.0.norm.weight", draft);
  if (engine_options_.probes && !suppress_probes_) {
    probe_with(main_, "mtp.logits", {draft, last}, [T, V](const std::vector<Tensor>& v) {
      // One row per token; a row's draft logits sit at its last token (the oracle reads those).
      ref::Mat m(T, V, std::numeric_limits<float>::quiet_NaN());
      for (int64_t r = 0; r < v[0].size(0); ++r) {
        const int32_t t = v[1].data<int32_t>()[r];
        std::memcpy(m.row(t), v[0].data<float>() + r * V, static_cast<size_t>(V) * 4);
      }
      return m;
    });
  }
}

void ModelRunner::issue_forward(int64_t T, int64_t nrows) {
  const int64_t hc = config_.hc_mult;
  DeviceTensor ids = rows(m_ids_, T);
  DeviceTensor R = rows(R_a_, T), Rn = rows(R_b_, T);
  if (is_first_stage()) {
    DeviceTensor embed = weight("embed.weight");
    op(main_, "embed", {ids, embed}, {R}, [ids, embed, R, hc]() mutable { kernels::embed_rows(ids.t, embed.t, hc, R.t); });
  }
  for (auto& layer : layers_) {
    issue_block(*layer, T, R, Rn);
    std::swap(R, Rn);
  }
  if (!is_last_stage()) return;
  if (cp_active_) {
    DeviceTensor Rg = rows(cp_R_global_, cp_global_tokens_);
    cp_gather(R, Rg);
    R = Rg;
  }
  issue_head(R, rows(m_last_, nrows), "", "norm.weight", rows(logits_, nrows));
  if (mtp_layer_ && in_batch_mtp()) issue_mtp(R, cp_active_ ? cp_global_tokens_ : T, nrows);
}

void ModelRunner::set_context_parallel(int comm, int rank, int size) {
  DSV4_ASSERT(size >= 1 && rank >= 0 && rank < size, "a CP rank of the group");
  cp_comm_ = comm;
  cp_rank_ = rank;
  cp_size_ = size;
  if (size == 1) return;
  const int64_t T = max_tokens_, D = config_.head_dim, Di = has_c4_ ? config_.index_head_dim : 0;
  const int64_t w = std::max(D, Di) * 2;  // widest compressor projection (f32)
  const int64_t row_bytes = std::max({2 * D, 4 * w, 2 * config_.hc_mult * config_.dim});
  cp_gather_buf_ = alloc("cp.gather", DType::u8, {(T + size) * row_bytes});
  cp_kv_local_ = alloc("cp.kv_local", DType::bf16, {T, D});
  cp_kv_global_ = alloc("cp.kv_global", DType::bf16, {T, D});
  cp_c_local_kv_ = alloc("cp.compressor_kv_local", DType::f32, {T, w});
  cp_c_local_score_ = alloc("cp.compressor_score_local", DType::f32, {T, w});
  cp_R_global_ = alloc("cp.R_global", DType::bf16, {T, config_.hc_mult * config_.dim});
}

void ModelRunner::cp_gather(const DeviceTensor& local, const DeviceTensor& global) {
  const int64_t L = local.t.size(0), W = local.t.size(1);
  const int64_t esize = dtype_storage_bytes(local.t.dtype(), 1);
  const uint64_t part = static_cast<uint64_t>(L * W * esize);
  const uint64_t begin = static_cast<uint64_t>(local.t.offset() * esize);
  rt_.all_gather(cp_comm_, cp_rank_, rt_.range(local.buffer, begin, begin + part),
                 rt_.range(cp_gather_buf_.buffer, 0, part * static_cast<uint64_t>(cp_size_)));
  const int64_t n = cp_size_;
  DeviceTensor gathered{cp_gather_buf_.buffer, rt_.tensor(cp_gather_buf_.buffer, local.t.dtype(), {n * L, W})};
  DeviceTensor out = global;
  op(main_, "cp_reorder", {gathered}, {out},
     [gathered, out, n]() mutable { kernels::unshard_rows(gathered.t, n, out.t); });
}

void ModelRunner::begin_cp(const serving::ForwardBatch& batch, StepRecord* record) {
  DSV4_ASSERT(cp_size_ > 1 && batch.mode == serving::ForwardMode::extend, "CP runs EXTEND batches");
  cp_active_ = true;
  cp_global_tokens_ = batch.token_count();
  streams_saved_ = std::make_unique<Streams>(*streams_);
  streams_->kv = streams_->compressor = streams_->indexer = streams_->indexer_q = streams_->indexer_w = main_;
  begin(batch, record);
}

DeviceTensor ModelRunner::stage_input(int64_t tokens) const { return rows(R_a_, tokens); }

DeviceTensor ModelRunner::stage_output(int64_t tokens) const {
  // Each layer swaps the two residual buffers.
  return rows((layer_end_ - layer_begin_) % 2 == 0 ? R_a_ : R_b_, tokens);
}

void ModelRunner::begin(const serving::ForwardBatch& batch, StepRecord* record) {
  serving::check_forward_batch(batch);
  const int64_t T = batch.token_count(), nrows = batch.row_count();
  DSV4_ASSERT(T <= max_tokens_ && nrows <= max_rows_, "batch larger than the engine's buffers");
  batch_mode_ = batch.mode;
  graph_batch_ = engine_options_.graphs && (batch.mode == serving::ForwardMode::decode ||
                                            batch.mode == serving::ForwardMode::target_verify);
  // Graphs and their frozen metadata per (mode, bucket).
  const int64_t key = nrows * 2 + (batch.mode == serving::ForwardMode::target_verify ? 1 : 0);
  const serving::RawForwardMetadata raw = serving::raw_forward_metadata(batch);
  serving::ForwardMetadata* meta = eager_metadata_.get();
  if (graph_batch_) {
    auto it = bucket_metadata_.find(key);
    if (it == bucket_metadata_.end()) {
      std::vector<const serving::CompressStatePool*> pools;
      if (c4_pool_) pools.push_back(c4_pool_.get());
      if (c128_pool_) pools.push_back(c128_pool_.get());
      it = bucket_metadata_.emplace(key, std::make_unique<serving::ForwardMetadata>(swa_, pools)).first;
      it->second->set_raw(raw);
    } else {
      it->second->assign_from(raw);
    }
    meta = it->second.get();
  } else {
    meta->set_raw(raw);
  }
  batch_metadata_ = meta;
  record_ = record;
  pending_probes_.clear();
  replay_ = graph_batch_ && graphs_.count(key) > 0;
  prepare_metadata(batch, *meta);
}

void ModelRunner::launch(const serving::ForwardBatch& batch) {
  const bool verify = batch.mode == serving::ForwardMode::target_verify;
  const int64_t T = cp_active_ ? cp_local_tokens(batch.token_count(), cp_size_) : batch.token_count();
  const int64_t head_rows = verify ? batch.token_count() : batch.row_count();
  if (!graph_batch_) {
    issue_forward(T, head_rows);
    return;
  }
  const int64_t key = batch.row_count() * 2 + (verify ? 1 : 0);
  auto g = graphs_.find(key);
  if (g == graphs_.end()) {
    batch_metadata_->freeze();
    g = graphs_.emplace(key, capture(key + 1, [&] { issue_forward(T, head_rows); })).first;
    graph_probes_[key] = pending_probes_;
  }
  pending_probes_ = graph_probes_[key];
  rt_.replay(g->second, main_);
  ++graph_replays_;
  if (record_ != nullptr) record_->graph_replay = true;
}

rt::GraphId ModelRunner::capture(int64_t scope, const std::function<void()>& issue) {
  staging_scope_ = scope;
  rt_.begin_capture(main_);
  try {
    issue();
  } catch (...) {
    staging_scope_ = 0;
    throw;
  }
  staging_scope_ = 0;
  return rt_.end_capture(main_);
}

void ModelRunner::end() {
  pending_probes_.clear();
  record_ = nullptr;
  batch_metadata_ = nullptr;
  if (streams_saved_) {
    *streams_ = *streams_saved_;
    streams_saved_.reset();
  }
  cp_active_ = false;
}

std::vector<StepRow> ModelRunner::sample(const serving::ForwardBatch& batch) {
  DSV4_ASSERT(is_last_stage(), "the last stage samples");
  const bool verify = batch.mode == serving::ForwardMode::target_verify;
  const int64_t V = config_.vocab_size;
  const int64_t head_rows = verify ? batch.token_count() : batch.row_count();
  std::vector<float> logits(static_cast<size_t>(head_rows * V)), drafts;
  rt_.download(logits_.buffer, 0, logits.data(), logits.size() * 4);
  batch_mode_ = batch.mode;
  const bool mtp_ran = mtp_layer_ && in_batch_mtp();  // else DRAFT_EXTEND (draft()) drafts
  if (mtp_ran) {
    drafts.resize(logits.size());
    rt_.download(draft_logits_.buffer, 0, drafts.data(), drafts.size() * 4);
  }
  auto argmax = [V](const float* row) { return static_cast<int32_t>(std::max_element(row, row + V) - row); };
  std::vector<StepRow> out_rows;
  int64_t token = 0;
  for (int64_t r = 0; r < batch.real_row_count(); ++r) {
    const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
    StepRow out;
    out.request_id = row.request_id;
    out.start_pos = row.seq_len_before;
    out.num_tokens = row.extend_len();
    out.first_token = token;
    out.input_ids.assign(batch.input_ids.begin() + token, batch.input_ids.begin() + token + row.extend_len());
    // The head row that decides: the row's last token, or in a verify row the first token whose
    // prediction differs from the next draft (greedy acceptance).
    int64_t head = r;
    if (verify) {
      int64_t j = 0;
      out.new_tokens.push_back(argmax(logits.data() + (token + j) * V));
      while (j + 1 < row.extend_len() && out.input_ids[static_cast<size_t>(j + 1)] == out.new_tokens.back()) {
        ++j;
        out.new_tokens.push_back(argmax(logits.data() + (token + j) * V));
      }
      out.accepted_tokens = j + 1;
      head = token + j;
    }
    token += row.extend_len();
    out.samples = true;
    out.logits.assign(logits.begin() + head * V, logits.begin() + (head + 1) * V);
    out.sampled_id = argmax(out.logits.data());
    if (!verify) out.new_tokens = {out.sampled_id};
    if (mtp_ran) {
      out.draft_logits.assign(drafts.begin() + head * V, drafts.begin() + (head + 1) * V);
      out.draft_id = argmax(out.draft_logits.data());
      if (engine_options_.draft_tokens > 0) out.draft_ids = {out.draft_id};
    }
    out_rows.push_back(std::move(out));
  }
  return out_rows;
}

// ---- speculative decoding: the draft forward and the scrub ---------------------------------------

bool ModelRunner::in_batch_mtp() const {
  return !(batch_mode_ == serving::ForwardMode::target_verify && engine_options_.draft_extend == DraftExtend::v1);
}

DeviceTensor ModelRunner::final_residual(int64_t tokens) const {
  return rows(layers_.size() % 2 == 0 ? R_a_ : R_b_, tokens);  // each layer swaps the two buffers
}

bool ModelRunner::needs_draft_forward(const serving::ForwardBatch& batch) const {
  if (!mtp_layer_ || engine_options_.draft_tokens == 0 || batch.real_row_count() == 0) return false;
  if (batch.mode == serving::ForwardMode::target_verify) {
    return engine_options_.draft_extend == DraftExtend::v1 || engine_options_.draft_tokens > 1;
  }
  return batch.mode == serving::ForwardMode::extend && engine_options_.draft_tokens > 1;
}

void ModelRunner::draft(const serving::ForwardBatch& batch, StepRecord& rec) {
  DSV4_ASSERT(is_last_stage() && needs_draft_forward(batch), "the draft forward runs on the last stage, when needed");
  DSV4_ASSERT(static_cast<int64_t>(rec.rows.size()) == batch.real_row_count(), "one record row per real row");
  const bool verify = batch.mode == serving::ForwardMode::target_verify;
  const bool extend = verify && engine_options_.draft_extend == DraftExtend::v1;  // DRAFT_EXTEND first
  const bool graph = engine_options_.graphs && verify;
  const int64_t k = engine_options_.draft_tokens, R = batch.row_count(), W = swa_width_, V = config_.vocab_size;
  const int64_t max_seq = slots_.max_seq_len();

  // The metadata: DRAFT_EXTEND's tokens (each row's accepted ones, packed; a graph pads them to
  // rows x (1 + k) with null tokens), then chain step j's row r at A + (j - 1) * R + r.
  std::vector<int32_t> pos, src, next, idx, len;
  std::vector<int64_t> loc;
  auto add_token = [&](int64_t p, int64_t swa_loc, const std::function<int64_t(int64_t)>& window_loc) {
    pos.push_back(static_cast<int32_t>(p));
    loc.push_back(swa_loc);
    const size_t at = idx.size();
    idx.resize(at + static_cast<size_t>(W), -1);
    int64_t m = 0;
    for (int64_t q = std::max<int64_t>(0, p - W + 1); q <= p; ++q) {
      const int64_t l = window_loc(q);
      DSV4_ASSERT(l >= 0, "a drafted position's window is in the SWA cache");
      idx[at + static_cast<size_t>(m++)] = static_cast<int32_t>(l);
    }
    len.push_back(static_cast<int32_t>(std::max<int64_t>(1, m)));
  };
  auto add_null = [&] {  // the null row: position 0 at SWA location 0, which no request owns
    pos.push_back(0);
    loc.push_back(0);
    idx.resize(idx.size() + static_cast<size_t>(W), -1);
    idx[idx.size() - static_cast<size_t>(W)] = 0;
    len.push_back(1);
  };
  // Per row: the last kept position (-1: the row drafts nothing) and the rows the first draft's
  // hidden state and logits come from.
  std::vector<int64_t> last_pos(static_cast<size_t>(R), -1), ext_off(static_cast<size_t>(R), 0), first_token(static_cast<size_t>(R), 0);
  std::vector<int32_t> src1(static_cast<size_t>(R), 0), head(static_cast<size_t>(R), 0), ext_last(static_cast<size_t>(R), 0);
  int64_t token = 0;
  for (int64_t r = 0; r < R; ++r) {
    const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
    const auto ru = static_cast<size_t>(r);
    first_token[ru] = token;
    token += row.extend_len();
    if (row.is_padding() || !rec.rows[ru].samples) continue;
    const StepRow& out = rec.rows[ru];
    const int64_t kept = verify ? out.accepted_tokens : row.extend_len();
    DSV4_ASSERT(kept >= 1 && kept <= row.extend_len(), "a sampling row keeps 1 to extend_len tokens");
    last_pos[ru] = row.seq_len_before + kept - 1;
    if (extend) {
      const std::span<const int32_t> locs = slots_.row(row.req_slot);
      ext_off[ru] = static_cast<int64_t>(pos.size());
      for (int64_t i = 0; i < kept; ++i) {
        const int64_t p = row.seq_len_before + i;
        src.push_back(static_cast<int32_t>(first_token[ru] + i));
        next.push_back(out.new_tokens[static_cast<size_t>(i)]);
        add_token(p, swa_.full_to_swa(locs[static_cast<size_t>(p)]),
                  [&](int64_t q) { return swa_.full_to_swa(locs[static_cast<size_t>(q)]); });
      }
      ext_last[ru] = static_cast<int32_t>(pos.size() - 1);
      src1[ru] = ext_last[ru];
    } else {
      src1[ru] = static_cast<int32_t>(first_token[ru] + kept - 1);
      head[ru] = static_cast<int32_t>(verify ? first_token[ru] + kept - 1 : r);  // the batch's head rows
    }
  }
  if (std::all_of(last_pos.begin(), last_pos.end(), [](int64_t p) { return p < 0; })) return;
  if (extend && graph) {
    while (static_cast<int64_t>(pos.size()) < R * (1 + k)) {
      add_null();
      src.push_back(0);
      next.push_back(0);
    }
  }
  const int64_t A = extend ? static_cast<int64_t>(pos.size()) : 0;
  // A chain past max_seq_len belongs to a request that finishes in this step (one that goes on
  // has room for its next verify): it drafts its first token only.
  auto chains = [&](size_t ru) { return last_pos[ru] >= 0 && last_pos[ru] + k <= max_seq; };
  for (int64_t j = 1; j < k; ++j) {
    for (int64_t r = 0; r < R; ++r) {
      const auto ru = static_cast<size_t>(r);
      src.push_back(j == 1 ? src1[ru] : static_cast<int32_t>(r));
      if (!chains(ru)) {
        add_null();
        continue;
      }
      const int64_t L = last_pos[ru];
      const std::span<const int32_t> locs = slots_.row(batch.rows[ru].req_slot);
      // Position L + i of the chain lives in scratch slot (r, i), past the allocator's pages.
      auto scratch = [&](int64_t q) { return chain_scratch_base_ + r * (k - 1) + (q - L - 1); };
      add_token(L + j, scratch(L + j), [&](int64_t q) {
        return q <= L ? swa_.full_to_swa(locs[static_cast<size_t>(q)]) : scratch(q);
      });
    }
  }
  upload_vec(rt_, m_dx_pos_, pos);
  upload_vec(rt_, m_dx_swa_loc_, loc);
  upload_vec(rt_, m_dx_swa_idx_, idx);
  upload_vec(rt_, m_dx_swa_len_, len);
  upload_vec(rt_, m_dx_src_, src);
  upload_vec(rt_, m_dx_next_, next);
  upload_vec(rt_, m_dx_last_, ext_last);
  upload_vec(rt_, m_dx_head_, head);

  draft_record_ = StepRecord{};
  record_ = engine_options_.probes ? &draft_record_ : nullptr;
  pending_probes_.clear();
  try {
    if (graph) {
      auto g = draft_graphs_.find(R);
      if (g == draft_graphs_.end()) {
        g = draft_graphs_.emplace(R, capture(-(R + 1), [&] { issue_draft(R, A, extend, batch.token_count()); })).first;
        draft_graph_probes_[R] = pending_probes_;
      }
      pending_probes_ = draft_graph_probes_[R];
      rt_.replay(g->second, main_);
      ++graph_replays_;
    } else {
      issue_draft(R, A, extend, batch.token_count());
    }
    rt_.synchronize(main_);
    finish_probes();
  } catch (...) {
    staging_scope_ = 0;
    pending_probes_.clear();
    record_ = nullptr;
    suppress_probes_ = false;
    throw;
  }
  record_ = nullptr;

  std::vector<float> logits(static_cast<size_t>(k * R * V));
  rt_.download(chain_logits_.buffer, 0, logits.data(), logits.size() * 4);
  for (int64_t r = 0; r < batch.real_row_count(); ++r) {
    const auto ru = static_cast<size_t>(r);
    if (last_pos[ru] < 0) continue;
    StepRow& out = rec.rows[ru];
    out.draft_ids.clear();
    out.chain_logits.clear();
    for (int64_t j = 0; j < (chains(ru) ? k : 1); ++j) {
      const float* l = logits.data() + (j * R + r) * V;
      out.draft_ids.push_back(argmax_row(l, V));
      if (j > 0) out.chain_logits.emplace_back(l, l + V);
    }
    if (extend) {
      const float* l = logits.data() + r * V;
      out.draft_logits.assign(l, l + V);
      out.draft_id = out.draft_ids.front();
    }
  }
  // DRAFT_EXTEND's probes, put at the verify batch's tokens (the rejected ones stay NaN).
  for (auto& [key, m] : draft_record_.values) {
    if (m.rows != A) continue;
    ref::Mat placed(batch.real_token_count(), m.cols, std::numeric_limits<float>::quiet_NaN());
    for (int64_t r = 0; r < batch.real_row_count(); ++r) {
      const auto ru = static_cast<size_t>(r);
      if (last_pos[ru] < 0) continue;
      for (int64_t i = 0; i <= last_pos[ru] - batch.rows[ru].seq_len_before; ++i) {
        std::copy(m.row(ext_off[ru] + i), m.row(ext_off[ru] + i) + m.cols, placed.row(first_token[ru] + i));
      }
    }
    rec.values[key] = std::move(placed);
  }
  draft_record_ = StepRecord{};
}

void ModelRunner::issue_draft(int64_t R, int64_t A, bool extend, int64_t batch_tokens) {
  const int64_t k = engine_options_.draft_tokens;
  if (extend) {
    // DRAFT_EXTEND: the verify batch's final residuals of the accepted tokens, the target's tokens.
    DeviceTensor Rf = final_residual(batch_tokens), src = rows(m_dx_src_, A), hidden = rows(mtp_hidden_, A);
    op(main_, "draft_extend.hidden", {Rf, src}, {hidden},
       [Rf, src, hidden]() mutable { kernels::gather_rows(Rf.t, src.t, hidden.t); });
    DeviceTensor next = rows(m_dx_next_, A);
    mtp_meta_ = {rows(m_dx_pos_, A), rows(m_dx_swa_loc_, A), rows(m_dx_swa_idx_, A), rows(m_dx_swa_len_, A), next};
    issue_mtp_block(hidden, A, next, rows(m_dx_last_, R), rows(chain_logits_, R), rows(mtp_R_out_, A));
  } else {
    // The batch's own MTP block drafted: its logits at each row's last kept token.
    DeviceTensor all = draft_logits_, head = rows(m_dx_head_, R), first = rows(chain_logits_, R);
    op(main_, "draft.first", {all, head}, {first},
       [all, head, first]() mutable { kernels::gather_rows(all.t, head.t, first.t); });
  }
  // The chain records nothing: its positions are scratch, and the next verify batch redoes them.
  suppress_probes_ = true;
  for (int64_t j = 1; j < k; ++j) {
    const int64_t base = A + (j - 1) * R;
    DeviceTensor prev = rows(chain_logits_, (j - 1) * R, R), ids = rows(chain_ids_, R);
    DeviceTensor src = rows(m_dx_src_, base, R), hidden = rows(mtp_hidden_, R), out = mtp_R_out_;
    op(main_, "draft.chain_input", {prev, src, out}, {ids, hidden}, [prev, src, out, ids, hidden]() mutable {
      kernels::argmax_rows(prev.t, ids.t);
      kernels::gather_rows(out.t, src.t, hidden.t);
    });
    mtp_meta_ = {rows(m_dx_pos_, base, R), rows(m_dx_swa_loc_, base, R), rows(m_dx_swa_idx_, base, R),
                 rows(m_dx_swa_len_, base, R), ids};
    issue_mtp_block(hidden, R, ids, rows(m_dx_ident_, R), rows(chain_logits_, j * R, R), rows(mtp_R_out_, R));
  }
  suppress_probes_ = false;
}

void ModelRunner::scrub_rejected(const serving::ForwardBatch& batch, const std::vector<int64_t>& kept) {
  if (batch.mode != serving::ForwardMode::target_verify || scrub_capacity_ == 0 || !engine_options_.scrub_rejected) return;
  DSV4_ASSERT(static_cast<int64_t>(kept.size()) == batch.real_row_count(), "one count per real row");
  // [E, (slot, dest)[E], S, (slot, row)[S]]: the candidates whose token was rejected.
  auto words_for = [&](const ScrubCandidates& c) {
    auto rejected = [&](const std::pair<int64_t, int64_t>& owner) {
      return owner.second >= kept[static_cast<size_t>(owner.first)];
    };
    std::vector<int64_t> w = {0};
    for (size_t j = 0; j < c.entries.size(); ++j) {
      if (!rejected(c.entries[j])) continue;
      w.insert(w.end(), {static_cast<int64_t>(j), c.entry_dest[j]});
      ++w[0];
    }
    const size_t s = w.size();
    w.push_back(0);
    for (size_t j = 0; j < c.rows.size(); ++j) {
      if (!rejected(c.rows[j])) continue;
      w.insert(w.end(), {static_cast<int64_t>(j), c.state_row[j]});
      ++w[s];
    }
    return w;
  };
  std::vector<int64_t> w4, w128;
  if (has_c4_) w4 = words_for(c4_scrub_);
  if (c128_ratio_ > 0) w128 = words_for(c128_scrub_);
  auto empty = [](const std::vector<int64_t>& w) { return w.empty() || (w[0] == 0 && w[1 + 2 * w[0]] == 0); };
  if (empty(w4) && empty(w128)) return;
  if (!empty(w4)) upload_vec(rt_, m_c4_scrub_, w4);
  if (!empty(w128)) upload_vec(rt_, m_c128_scrub_, w128);
  for (auto& layer : layers_) {
    Layer& L = *layer;
    if (L.ratio == 0 || empty(L.ratio == kC4 ? w4 : w128)) continue;
    DeviceTensor meta = L.ratio == kC4 ? m_c4_scrub_ : m_c128_scrub_;
    for (const bool indexer : {false, true}) {
      if (indexer && L.ratio != kC4) continue;
      DeviceTensor cache = indexer ? L.idx_keys : L.comp_cache, state = indexer ? L.idx_state : L.comp_state;
      DeviceTensor saved_entries = indexer ? L.idx_keys_backup : L.comp_backup;
      DeviceTensor saved_rows = indexer ? L.idx_state_backup : L.state_backup;
      const int64_t dims = indexer ? config_.index_head_dim : config_.head_dim, page_entries = L.comp_page_entries;
      const kernels::Model1Layout kv_layout = L.kv_layout;
      const std::string p = L.prefix + (indexer ? ".attn.indexer.compressor" : ".attn.compressor");
      const kernels::EntrySpans spans = kernels::entry_spans(indexer, dims, kv_layout, page_entries);
      op(main_, p + ".scrub", {saved_entries, saved_rows, meta}, {cache, state},
         [saved_entries, saved_rows, meta, cache, state, spans]() mutable {
           kernels::scrub_restore(saved_entries.t, saved_rows.t, meta.t, spans, cache.t, state.t);
         });
    }
  }
}

ModelRunner::CompressedBytes ModelRunner::compressed_bytes(int64_t layer) {
  rt_.synchronize(main_);
  auto bytes_of = [&](const DeviceTensor& d) {
    std::vector<uint8_t> v(static_cast<size_t>(rt_.bytes(d.buffer)));
    rt_.download(d.buffer, 0, v.data(), v.size());
    return v;
  };
  for (auto& l : layers_) {
    if (l->id != layer || l->ratio == 0) continue;
    CompressedBytes out;
    out.cache = bytes_of(l->comp_cache);
    out.state = bytes_of(l->comp_state);
    if (l->ratio == kC4) {
      out.indexer_keys = bytes_of(l->idx_keys);
      out.indexer_state = bytes_of(l->idx_state);
    }
    return out;
  }
  throw ContractError("ModelRunner::compressed_bytes", "layer",
                      "layer " + std::to_string(layer) + " is not a compressed layer of this stage");
}

// Probes hold every computed row; the oracle sees the real tokens only.
void trim_probes(StepRecord& rec, int64_t real_tokens) {
  for (auto& [key, m] : rec.values) {
    if (m.rows > real_tokens) m = ref::rows_of(m, 0, real_tokens);
  }
}

StepRecord ModelRunner::forward(const serving::ForwardBatch& batch) {
  DSV4_ASSERT(is_first_stage() && is_last_stage(), "forward() runs a single-stage model");
  StepRecord rec;
  rec.step = batch.step;
  rec.mode = batch.mode;
  if (batch.mode == serving::ForwardMode::idle || batch.real_row_count() == 0) return rec;
  try {
    begin(batch, &rec);
    launch(batch);
    rt_.synchronize(main_);
    finish_probes();
  } catch (...) {
    end();
    throw;
  }
  end();
  rec.rows = sample(batch);
  trim_probes(rec, batch.real_token_count());
  return rec;
}

}  // namespace dsv4::engine
