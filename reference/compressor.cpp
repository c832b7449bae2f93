#include "reference/compressor.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "reference/hadamard.h"
#include "reference/linear.h"
#include "reference/norm.h"
#include "reference/quant.h"

namespace dsv4::ref {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void act_span(const Context& ctx, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = ctx.act(x[i]);
}

}  // namespace

void simulate_indexer_quant(const Context& ctx, float* x, int64_t n) {
  if (!ctx.numerics.quant()) return;
  if (ctx.config.indexer_quant == "fp8") {
    // sglang's default indexer cache: FP8 with one scale per token-head vector.
    fp8_quant_dequant(x, n, n);
  } else {
    // The official QAT: FP4 in blocks of fp4_block_size.
    fp4_quant_dequant(x, n, ctx.config.fp4_block_size);
  }
  act_span(ctx, x, n);
}

Compressor::Compressor(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t ratio,
                       int64_t head_dim, bool rotate, RopeTable rope)
    : config_(&config),
      prefix_(std::move(prefix)),
      ratio_(ratio),
      head_dim_(head_dim),
      coff_(ratio == 4 ? 2 : 1),
      rotate_(rotate),
      rope_(std::move(rope)),
      wkv_(&weights.get(prefix_ + ".wkv.weight")),
      wgate_(&weights.get(prefix_ + ".wgate.weight")),
      ape_(&weights.get(prefix_ + ".ape")),
      norm_(&weights.get(prefix_ + ".norm.weight")) {
  DSV4_ASSERT(ratio_ > 0, prefix_ + ": compress ratio must be positive");
  DSV4_ASSERT(rope_.rope_dim > 0 && rope_.rope_dim < head_dim_, prefix_ + ": rope dims must fit in head_dim");
  DSV4_ASSERT(wkv_->rows == coff_ * head_dim_, prefix_ + ".wkv: rows != coff * head_dim");
  DSV4_ASSERT(wkv_->cols == config.dim, prefix_ + ".wkv: cols != dim");
  DSV4_ASSERT(wgate_->rows == coff_ * head_dim_, prefix_ + ".wgate: rows != coff * head_dim");
  DSV4_ASSERT(wgate_->cols == config.dim, prefix_ + ".wgate: cols != dim");
  DSV4_ASSERT(ape_->rows == ratio_, prefix_ + ".ape: rows != ratio");
  DSV4_ASSERT(ape_->cols == coff_ * head_dim_, prefix_ + ".ape: cols != coff * head_dim");
  DSV4_ASSERT(norm_->size() == head_dim_, prefix_ + ".norm: size != head_dim");
  if (!rotate_) {
    DSV4_ASSERT((head_dim_ - rope_.rope_dim) % config.kv_block_size == 0,
                prefix_ + ": nope dims must be whole kv FP8 blocks");
  }
  reset();
}

void Compressor::reset() {
  kv_state_ = Mat(coff_ * ratio_, coff_ * head_dim_, 0.0f);
  score_state_ = Mat(coff_ * ratio_, coff_ * head_dim_, kNegInf);
  next_pos_ = 0;
}

Compressor::Output Compressor::forward(const Context& ctx, const Mat& x, int64_t start_pos) {
  DSV4_ASSERT(x.cols == config_->dim, prefix_ + ": input width != dim");
  DSV4_ASSERT(start_pos == next_pos_,
              prefix_ + ": start_pos " + std::to_string(start_pos) + " does not continue the sequence at " +
                  std::to_string(next_pos_) + " (reset() starts a new one)");
  const int64_t r = ratio_, T = x.rows;

  // Both projections are fp32 GEMMs on the upcast input; the score carries its slot's ape bias.
  const Mat kv = linear(ctx, x, *wkv_, LinearKind::f32);
  Mat score = linear(ctx, x, *wgate_, LinearKind::f32);
  for (int64_t t = 0; t < T; ++t) {
    const float* ape = ape_->row((start_pos + t) % r);
    for (int64_t c = 0; c < score.cols; ++c) score.at(t, c) += ape[c];
  }
  ctx.record(prefix_ + ".kv", kv);
  ctx.record(prefix_ + ".score", score);

  // Entries emitted before this call: one per completed block.
  Output out;
  out.first_block = start_pos / r;
  out.entries = Mat((start_pos + T) / r - out.first_block, head_dim_);

  // One token at a time over the carried state, as the official decode path does; its prefill path
  // computes the same pools from the same rows.
  int64_t emitted = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = start_pos + t;
    const int64_t row = coff_ == 2 ? r + pos % r : pos % r;
    std::copy(kv.row(t), kv.row(t) + kv.cols, kv_state_.row(row));
    std::copy(score.row(t), score.row(t) + score.cols, score_state_.row(row));
    if ((pos + 1) % r != 0) continue;
    compress(ctx, pos / r, out.entries.row(emitted++));
    if (coff_ == 2) {
      // The block just completed becomes the previous block, whose A half the next entry pools.
      std::copy(kv_state_.row(r), kv_state_.row(2 * r), kv_state_.row(0));
      std::copy(score_state_.row(r), score_state_.row(2 * r), score_state_.row(0));
    }
  }
  DSV4_ASSERT(emitted == out.entries.rows, prefix_ + ": emitted entry count mismatch");
  next_pos_ = start_pos + T;
  ctx.record(prefix_ + ".entries", out.entries);
  return out;
}

void Compressor::compress(const Context& ctx, int64_t b, float* out) const {
  const int64_t r = ratio_, hd = head_dim_, rd = rope_.rope_dim, rows = coff_ * r;

  // c[j] = sum_i softmax_i(s[i][j]) kv[i][j] over the pooled rows, separately per channel j, in fp32.
  // Overlapping: rows 0..r-1 contribute their A half (channel j), rows r..2r-1 their B half (hd + j);
  // for block 0 the A rows are still the reset state (kv 0, score -inf) and contribute nothing.
  std::vector<float> s(static_cast<size_t>(rows)), v(static_cast<size_t>(rows));
  for (int64_t j = 0; j < hd; ++j) {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t col = (coff_ == 2 && i >= r) ? hd + j : j;
      s[static_cast<size_t>(i)] = score_state_.at(i, col);
      v[static_cast<size_t>(i)] = kv_state_.at(i, col);
    }
    const float m = *std::max_element(s.begin(), s.end());
    DSV4_ASSERT(std::isfinite(m), prefix_ + ": a pooled channel has no finite score");
    double denom = 0.0;
    for (int64_t i = 0; i < rows; ++i) denom += static_cast<double>(std::exp(s[static_cast<size_t>(i)] - m));
    const float sum = static_cast<float>(denom);
    double c = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
      const float p = std::exp(s[static_cast<size_t>(i)] - m) / sum;
      c += static_cast<double>(p * v[static_cast<size_t>(i)]);
    }
    out[j] = ctx.act(static_cast<float>(c));  // the pooled vector is cast to the activation dtype
  }

  // norm, then rope at the block's first position.
  Mat pooled(1, hd);
  std::copy(out, out + hd, pooled.row(0));
  const Mat normed = rms_norm(ctx, pooled, *norm_);
  std::copy(normed.row(0), normed.row(0) + hd, out);
  apply_rope(out + hd - rd, b * r, rope_, false);
  act_span(ctx, out + hd - rd, rd);

  if (rotate_) {
    // The indexer's keys: Hadamard-rotated (part of the model), then the indexer's quant simulation.
    hadamard_inplace(out, hd);
    act_span(ctx, out, hd);
    simulate_indexer_quant(ctx, out, hd);
  } else if (ctx.numerics.quant()) {
    // The attention's entries: FP8 simulation of the nope dims only, like the window KV.
    fp8_quant_dequant(out, hd - rd, ctx.config.kv_block_size, ctx.numerics.kv_fp8_rounding);
    act_span(ctx, out, hd - rd);
  }
}

}  // namespace dsv4::ref
