#include "reference/model.h"

#include "reference/linear.h"
#include "reference/norm.h"

namespace dsv4::ref {

Block::Block(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id)
    : weights_(weights),
      prefix_(std::move(prefix)),
      attn_(config, weights, prefix_ + ".attn", layer_id),
      ffn_(config, weights, prefix_ + ".ffn", layer_id) {}

void Block::reset() { attn_.reset(); }

Mat Block::forward(const Context& ctx, const Mat& R, const std::vector<int64_t>& token_ids, int64_t start_pos) {
  const std::string& p = prefix_;
  HcMix mix;
  Mat x = hc_pre(ctx, R, weights_.get(p + ".hc_attn_fn"), weights_.get(p + ".hc_attn_base"),
                 weights_.get(p + ".hc_attn_scale"), &mix);
  x = rms_norm(ctx, x, weights_.get(p + ".attn_norm.weight"));
  ctx.record(p + ".attn_norm", x);
  const Mat a = attn_.forward(ctx, x, start_pos);
  Mat R1 = hc_post(ctx, a, R, mix);

  x = hc_pre(ctx, R1, weights_.get(p + ".hc_ffn_fn"), weights_.get(p + ".hc_ffn_base"),
             weights_.get(p + ".hc_ffn_scale"), &mix);
  x = rms_norm(ctx, x, weights_.get(p + ".ffn_norm.weight"));
  ctx.record(p + ".ffn_norm", x);
  const Mat m = ffn_.forward(ctx, x, token_ids, start_pos);
  Mat R2 = hc_post(ctx, m, R1, mix);
  ctx.record(p + ".residual", R2);
  return R2;
}

Model::Model(const ModelConfig& config, const Weights& weights) : config_(config), weights_(weights) {
  for (int64_t l = 0; l < config.n_layers; ++l) {
    layers_.push_back(std::make_unique<Block>(config, weights, "layers." + std::to_string(l), l));
  }
  if (config.n_mtp_layers > 0) mtp_ = std::make_unique<Block>(config, weights, "mtp.0", config.n_layers);
}

void Model::reset() {
  for (auto& b : layers_) b->reset();
  if (mtp_) mtp_->reset();
}

Mat Model::embed(const std::vector<int64_t>& tokens) const {
  const Mat& table = weights_.get("embed.weight");  // bf16 values, exact in either mode
  const int64_t d = config_.dim;
  Mat R(static_cast<int64_t>(tokens.size()), config_.hc_mult * d);
  for (size_t t = 0; t < tokens.size(); ++t) {
    DSV4_ASSERT(tokens[t] >= 0 && tokens[t] < config_.vocab_size, "token id outside the vocabulary");
    for (int64_t c = 0; c < config_.hc_mult; ++c) {
      std::copy(table.row(tokens[t]), table.row(tokens[t]) + d, R.row(static_cast<int64_t>(t)) + c * d);
    }
  }
  return R;
}

Mat Model::head(const Context& ctx, const Mat& R, const std::string& hc_prefix, const std::string& norm_name) const {
  const Mat last = rows_of(R, R.rows - 1, 1);
  Mat y = hc_head(ctx, last, weights_.get(hc_prefix + "hc_head_fn"), weights_.get(hc_prefix + "hc_head_base"),
                  weights_.get(hc_prefix + "hc_head_scale"));
  y = rms_norm(ctx, y, weights_.get(norm_name));
  return linear(ctx, y, weights_.get("head.weight"), LinearKind::f32);
}

Block& Model::block(int64_t i) {
  DSV4_ASSERT(i >= 0 && i < n_blocks(), "block index outside [0, n_layers)");
  return *layers_[static_cast<size_t>(i)];
}

Mat Model::head_logits(const Context& ctx, const Mat& R) const {
  DSV4_ASSERT(R.rows > 0 && R.cols == config_.hc_mult * config_.dim, "the head needs [T >= 1, hc_mult * dim]");
  Mat logits = head(ctx, R, "", "norm.weight");
  ctx.record("logits", logits);
  return logits;
}

Model::Output Model::forward(const Context& ctx, const std::vector<int64_t>& tokens, int64_t start_pos) {
  DSV4_ASSERT(!tokens.empty(), "a forward call needs at least one token");
  DSV4_ASSERT(start_pos + static_cast<int64_t>(tokens.size()) <= config_.max_seq_len, "position past max_seq_len");
  Mat R = embed(tokens);
  for (int64_t i = 0; i < n_blocks(); ++i) R = block(i).forward(ctx, R, tokens, start_pos);
  Output out;
  out.logits = head_logits(ctx, R);
  out.final_residual = std::move(R);
  return out;
}

Mat Model::mtp_forward(const Context& ctx, const Mat& hidden, const std::vector<int64_t>& next_tokens,
                       int64_t start_pos, Mat* residual_out) {
  DSV4_ASSERT(mtp_ != nullptr, "the config has no MTP block");
  DSV4_ASSERT(hidden.rows == static_cast<int64_t>(next_tokens.size()), "one next token per hidden row");
  const int64_t d = config_.dim;
  const int64_t hc = config_.hc_mult;
  // e = enorm(embed(id)), projected once and broadcast to every copy.
  Mat e = rms_norm(ctx, cols_of(embed(next_tokens), 0, d), weights_.get("mtp.0.enorm.weight"));
  const Mat e_proj = linear(ctx, e, weights_.get("mtp.0.e_proj.weight"), LinearKind::fp8);
  Mat R(hidden.rows, hc * d);
  for (int64_t c = 0; c < hc; ++c) {
    // h = hnorm(hidden copy c), then h_proj per copy.
    const Mat h = rms_norm(ctx, cols_of(hidden, c * d, d), weights_.get("mtp.0.hnorm.weight"));
    const Mat h_proj = linear(ctx, h, weights_.get("mtp.0.h_proj.weight"), LinearKind::fp8);
    for (int64_t t = 0; t < hidden.rows; ++t) {
      for (int64_t i = 0; i < d; ++i) R.at(t, c * d + i) = ctx.act(e_proj.at(t, i) + h_proj.at(t, i));
    }
  }
  R = mtp_->forward(ctx, R, next_tokens, start_pos);
  Mat logits = head(ctx, R, "mtp.0.", "mtp.0.norm.weight");
  ctx.record("mtp.logits", logits);
  if (residual_out != nullptr) *residual_out = std::move(R);
  return logits;
}

std::vector<Mat> Model::mtp_chain(const Context& ctx, const Mat& hidden, const std::vector<int64_t>& tokens,
                                  int64_t start_pos) {
  DSV4_ASSERT(mtp_ != nullptr, "the config has no MTP block");
  DSV4_ASSERT(hidden.rows == 1, "the chain starts from one residual row");
  Attention::WindowState saved = mtp_->window_state();
  std::vector<Mat> out;
  Mat h = hidden;
  for (size_t i = 0; i < tokens.size(); ++i) {
    Mat R;
    out.push_back(mtp_forward(ctx, h, {tokens[i]}, start_pos + static_cast<int64_t>(i), &R));
    h = std::move(R);
  }
  mtp_->restore_window(std::move(saved));
  return out;
}

}  // namespace dsv4::ref
