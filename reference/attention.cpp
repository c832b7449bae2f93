#include "reference/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/core/formats.h"
#include "reference/linear.h"
#include "reference/norm.h"
#include "reference/quant.h"

namespace dsv4::ref {

void attention_head(const Context& ctx, const float* q, const std::vector<const float*>& keys, int64_t dim,
                    float sink, float scale, float* out) {
  std::fill(out, out + dim, 0.0f);
  if (keys.empty()) return;
  std::vector<float> logits(keys.size());
  float m = -std::numeric_limits<float>::infinity();
  for (size_t j = 0; j < keys.size(); ++j) {
    logits[j] = scale * static_cast<float>(dot(q, keys[j], dim));
    m = std::max(m, logits[j]);
  }
  double denominator = 0.0;
  std::vector<double> acc(static_cast<size_t>(dim), 0.0);
  for (size_t j = 0; j < keys.size(); ++j) {
    const float p = std::exp(logits[j] - m);
    denominator += p;
    const float weight = ctx.numerics.quant() ? round_bf16(p) : p;  // P is bf16 before P.V
    for (int64_t i = 0; i < dim; ++i) acc[static_cast<size_t>(i)] += static_cast<double>(weight) * keys[j][i];
  }
  // The sink is a raw logit that only enlarges the denominator (a null value of 0).
  denominator += std::exp(static_cast<double>(sink) - m);
  for (int64_t i = 0; i < dim; ++i) out[i] = ctx.act(static_cast<float>(acc[static_cast<size_t>(i)] / denominator));
}

Attention::Attention(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id)
    : config_(config),
      weights_(weights),
      prefix_(std::move(prefix)),
      layer_id_(layer_id),
      ratio_(config.ratio(layer_id)),
      rope_(make_rope_table(config, ratio_)),
      window_kv_(config.window_size, config.head_dim),
      window_pos_(static_cast<size_t>(config.window_size), -1) {
  if (ratio_ > 0) {
    compressor_ = std::make_unique<Compressor>(config, weights, prefix_ + ".compressor", ratio_, config.head_dim,
                                               /*rotate=*/false, rope_);
  }
  if (ratio_ == 4) indexer_ = std::make_unique<Indexer>(config, weights, prefix_ + ".indexer", rope_);
}

void Attention::reset() {
  std::fill(window_pos_.begin(), window_pos_.end(), -1);
  compressed_.clear();
  if (compressor_) compressor_->reset();
  if (indexer_) indexer_->reset();
}

void Attention::restore_window(WindowState state) {
  DSV4_ASSERT(ratio_ == 0, "only a window-only layer's state is its window");
  DSV4_ASSERT(state.kv.rows == window_kv_.rows && state.kv.cols == window_kv_.cols && state.pos.size() == window_pos_.size(),
              "a window state of this layer");
  window_kv_ = std::move(state.kv);
  window_pos_ = std::move(state.pos);
}

void Attention::query(const Context& ctx, const Mat& x, int64_t start_pos, Mat& q, Mat& qr) const {
  qr = rms_norm(ctx, linear(ctx, x, weights_.get(prefix_ + ".wq_a.weight"), LinearKind::fp8),
                weights_.get(prefix_ + ".q_norm.weight"));
  q = linear(ctx, qr, weights_.get(prefix_ + ".wq_b.weight"), LinearKind::fp8);
  head_rms_norm_inplace(ctx, q, config_.n_heads, config_.head_dim);
  for (int64_t t = 0; t < q.rows; ++t) {
    for (int64_t h = 0; h < config_.n_heads; ++h) {
      float* rope_part = q.row(t) + h * config_.head_dim + config_.nope_head_dim();
      apply_rope(rope_part, start_pos + t, rope_, /*inverse=*/false);
      for (int64_t i = 0; i < config_.rope_head_dim; ++i) rope_part[i] = ctx.act(rope_part[i]);
    }
  }
}

Mat Attention::key_value(const Context& ctx, const Mat& x, int64_t start_pos) const {
  Mat kv = rms_norm(ctx, linear(ctx, x, weights_.get(prefix_ + ".wkv.weight"), LinearKind::fp8),
                    weights_.get(prefix_ + ".kv_norm.weight"));
  for (int64_t t = 0; t < kv.rows; ++t) {
    float* rope_part = kv.row(t) + config_.nope_head_dim();
    apply_rope(rope_part, start_pos + t, rope_, /*inverse=*/false);
    for (int64_t i = 0; i < config_.rope_head_dim; ++i) rope_part[i] = ctx.act(rope_part[i]);
    if (ctx.numerics.quant()) {
      // QAT simulation of the FP8 cache: the nope dims only, in kv_block_size blocks.
      fp8_quant_dequant(kv.row(t), config_.nope_head_dim(), config_.kv_block_size, ctx.numerics.kv_fp8_rounding);
      for (int64_t i = 0; i < config_.nope_head_dim(); ++i) kv.at(t, i) = ctx.act(kv.at(t, i));
    }
  }
  return kv;
}

Mat Attention::output(const Context& ctx, const Mat& o) const {
  const int64_t groups = config_.o_groups;
  const int64_t group_width = config_.n_heads * config_.head_dim / groups;
  const Mat& wo_a = weights_.get(prefix_ + ".wo_a.weight");  // [groups * o_lora, group_width]
  Mat u(o.rows, groups * config_.o_lora_rank);
  for (int64_t g = 0; g < groups; ++g) {
    const Mat u_g = linear(ctx, cols_of(o, g * group_width, group_width),
                           rows_of(wo_a, g * config_.o_lora_rank, config_.o_lora_rank), LinearKind::bf16);
    for (int64_t t = 0; t < o.rows; ++t) {
      std::copy(u_g.row(t), u_g.row(t) + config_.o_lora_rank, u.row(t) + g * config_.o_lora_rank);
    }
  }
  return linear(ctx, u, weights_.get(prefix_ + ".wo_b.weight"), LinearKind::fp8);
}

Mat Attention::forward(const Context& ctx, const Mat& x, int64_t start_pos) {
  const int64_t T = x.rows;
  const int64_t D = config_.head_dim;
  const int64_t window = config_.window_size;
  Mat q, qr;
  query(ctx, x, start_pos, q, qr);
  const Mat kv = key_value(ctx, x, start_pos);
  ctx.record(prefix_ + ".qr", qr);
  ctx.record(prefix_ + ".q", q);
  ctx.record(prefix_ + ".kv", kv);

  // Compressors run before the attention, so an entry is visible to the token that completes it.
  if (compressor_) {
    const Compressor::Output emitted = compressor_->forward(ctx, x, start_pos);
    DSV4_ASSERT(emitted.first_block == static_cast<int64_t>(compressed_.size()) || emitted.entries.rows == 0,
                "compressed entries out of order");
    for (int64_t b = 0; b < emitted.entries.rows; ++b) {
      compressed_.emplace_back(emitted.entries.row(b), emitted.entries.row(b) + D);
    }
  }
  std::vector<std::vector<int64_t>> selected;
  if (indexer_) selected = indexer_->forward(ctx, x, qr, start_pos, layer_id_);

  const Mat& sink = weights_.get(prefix_ + ".attn_sink");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Mat o(T, config_.n_heads * D);
  Mat compressed_used(T, 1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = start_pos + t;
    // The window: positions max(0, p - window + 1) .. p, fresh rows first, older ones from the ring.
    std::vector<const float*> keys;
    for (int64_t pos = std::max<int64_t>(0, p - window + 1); pos <= p; ++pos) {
      if (pos >= start_pos) {
        keys.push_back(kv.row(pos - start_pos));
      } else {
        const int64_t slot = pos % window;
        DSV4_ASSERT(window_pos_[static_cast<size_t>(slot)] == pos, "window ring lost position " + std::to_string(pos));
        keys.push_back(window_kv_.row(slot));
      }
    }
    // Compressed entries: all visible ones (non-overlapping) or the indexer's choice (ratio 4).
    const int64_t visible = ratio_ > 0 ? (p + 1) / ratio_ : 0;
    if (ratio_ == 4) {
      for (int64_t e : selected[static_cast<size_t>(t)]) {
        DSV4_ASSERT(e >= 0 && e < visible, "indexer selected an invisible entry");
        keys.push_back(compressed_[static_cast<size_t>(e)].data());
      }
    } else if (ratio_ > 0) {
      for (int64_t e = 0; e < visible; ++e) keys.push_back(compressed_[static_cast<size_t>(e)].data());
    }
    compressed_used.at(t, 0) = static_cast<float>(keys.size());
    for (int64_t h = 0; h < config_.n_heads; ++h) {
      attention_head(ctx, q.row(t) + h * D, keys, D, sink.data[static_cast<size_t>(h)], scale, o.row(t) + h * D);
      // V carries rotated rope dims: undo the rotation at the query's position.
      float* rope_part = o.row(t) + h * D + config_.nope_head_dim();
      apply_rope(rope_part, p, rope_, /*inverse=*/true);
      for (int64_t i = 0; i < config_.rope_head_dim; ++i) rope_part[i] = ctx.act(rope_part[i]);
    }
  }
  // Keep the last window of raw entries for the following calls.
  for (int64_t t = std::max<int64_t>(0, T - window); t < T; ++t) {
    const int64_t slot = (start_pos + t) % window;
    std::copy(kv.row(t), kv.row(t) + D, window_kv_.row(slot));
    window_pos_[static_cast<size_t>(slot)] = start_pos + t;
  }
  ctx.record(prefix_ + ".keys_attended", compressed_used);
  ctx.record(prefix_ + ".o", o);
  Mat y = output(ctx, o);
  ctx.record(prefix_ + ".out", y);
  return y;
}

}  // namespace dsv4::ref
