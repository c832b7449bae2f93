#include "reference/indexer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "reference/hadamard.h"
#include "reference/linear.h"

namespace dsv4::ref {

namespace {

// The indexer always pools overlapping ratio-4 blocks.
constexpr int64_t kIndexerRatio = 4;

}  // namespace

Indexer::Indexer(const ModelConfig& config, const Weights& weights, std::string prefix, RopeTable rope)
    : config_(&config),
      prefix_(std::move(prefix)),
      heads_(config.index_n_heads),
      head_dim_(config.index_head_dim),
      rope_(rope),
      wq_b_(&weights.get(prefix_ + ".wq_b.weight")),
      weights_proj_(&weights.get(prefix_ + ".weights_proj.weight")),
      compressor_(config, weights, prefix_ + ".compressor", kIndexerRatio, config.index_head_dim, true,
                  std::move(rope)) {
  DSV4_ASSERT(wq_b_->rows == heads_ * head_dim_, prefix_ + ".wq_b: rows != index_n_heads * index_head_dim");
  DSV4_ASSERT(wq_b_->cols == config.q_lora_rank, prefix_ + ".wq_b: cols != q_lora_rank");
  DSV4_ASSERT(weights_proj_->rows == heads_, prefix_ + ".weights_proj: rows != index_n_heads");
  DSV4_ASSERT(weights_proj_->cols == config.dim, prefix_ + ".weights_proj: cols != dim");
  DSV4_ASSERT(rope_.rope_dim > 0 && rope_.rope_dim < head_dim_, prefix_ + ": rope dims must fit in index_head_dim");
  reset();
}

void Indexer::reset() {
  compressor_.reset();
  keys_ = Mat(0, head_dim_);
}

std::vector<std::vector<int64_t>> Indexer::forward(const Context& ctx, const Mat& x, const Mat& qr, int64_t start_pos,
                                                    int64_t layer_id) {
  const int64_t T = x.rows, H = heads_, D = head_dim_, rd = rope_.rope_dim;
  DSV4_ASSERT(qr.rows == T, prefix_ + ": qr rows != x rows");
  DSV4_ASSERT(qr.cols == config_->q_lora_rank, prefix_ + ": qr width != q_lora_rank");

  // Keys first: the entry a token completes is scored for that token.
  const Compressor::Output fresh = compressor_.forward(ctx, x, start_pos);
  DSV4_ASSERT(fresh.first_block == keys_.rows, prefix_ + ": compressor entries do not continue the key cache");
  keys_.data.insert(keys_.data.end(), fresh.entries.data.begin(), fresh.entries.data.end());
  keys_.rows += fresh.entries.rows;

  // Queries: wq_b(qr) per head, rope on the last rd dims at the token's position, Hadamard, quant sim.
  Mat q = linear(ctx, qr, *wq_b_, LinearKind::fp8);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float* qh = q.row(t) + h * D;
      apply_rope(qh + D - rd, start_pos + t, rope_, false);
      for (int64_t i = D - rd; i < D; ++i) qh[i] = ctx.act(qh[i]);
      hadamard_inplace(qh, D);
      for (int64_t i = 0; i < D; ++i) qh[i] = ctx.act(qh[i]);
      simulate_indexer_quant(ctx, qh, D);
    }
  }
  ctx.record(prefix_ + ".q", q);

  // Head weights: weights_proj(x) * (D^-0.5 * H^-0.5), the scale a double folded to fp32 as torch does.
  Mat w = linear(ctx, x, *weights_proj_, LinearKind::bf16);
  const float w_scale = static_cast<float>(std::pow(static_cast<double>(D), -0.5) * std::pow(static_cast<double>(H), -0.5));
  for (float& v : w.data) v = ctx.act(v * w_scale);
  ctx.record(prefix_ + ".weights", w);

  // I(p, t) = Σ_h w_h · ReLU(q_h · k_t) for every visible entry t < floor((p+1)/4). The official code
  // does this on bf16 tensors: the dot, the product with w and the head sum each round to bf16.
  const int64_t n_max = keys_.rows;
  Mat scores(T, n_max, -std::numeric_limits<float>::infinity());
  Mat topk(T, config_->index_topk, -1.0f);
  std::vector<std::vector<int64_t>> selected(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = start_pos + t;
    const int64_t visible = (p + 1) / kIndexerRatio;
    DSV4_ASSERT(visible <= n_max, prefix_ + ": a token sees more entries than exist");
    for (int64_t e = 0; e < visible; ++e) {
      double sum = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const float logit = ctx.act(static_cast<float>(dot(q.row(t) + h * D, keys_.row(e), D)));
        sum += static_cast<double>(ctx.act(w.at(t, h) * std::max(logit, 0.0f)));
      }
      scores.at(t, e) = ctx.act(static_cast<float>(sum));
      DSV4_ASSERT(!std::isnan(scores.at(t, e)), prefix_ + ": NaN score at position " + std::to_string(p));
    }

    std::vector<int64_t>& pick = selected[static_cast<size_t>(t)];
    std::optional<std::vector<int64_t>> forced;
    if (ctx.forcing != nullptr && ctx.forcing->indexer_topk) forced = ctx.forcing->indexer_topk(layer_id, p);
    if (forced) {
      pick = *forced;
      std::sort(pick.begin(), pick.end());
      DSV4_ASSERT(static_cast<int64_t>(pick.size()) <= config_->index_topk,
                  prefix_ + ": forced selection larger than index_topk at position " + std::to_string(p));
      DSV4_ASSERT(std::adjacent_find(pick.begin(), pick.end()) == pick.end(),
                  prefix_ + ": forced selection repeats an entry at position " + std::to_string(p));
      DSV4_ASSERT(pick.empty() || (pick.front() >= 0 && pick.back() < visible),
                  prefix_ + ": forced selection names an entry not visible at position " + std::to_string(p));
    } else {
      // The best min(index_topk, visible) by score, ties to the lower index; all of them when fewer.
      pick.resize(static_cast<size_t>(visible));
      for (int64_t e = 0; e < visible; ++e) pick[static_cast<size_t>(e)] = e;
      const int64_t k = std::min(config_->index_topk, visible);
      const float* row = scores.row(t);
      std::stable_sort(pick.begin(), pick.end(), [row](int64_t a, int64_t b) { return row[a] > row[b]; });
      pick.resize(static_cast<size_t>(k));
      std::sort(pick.begin(), pick.end());
    }
    for (size_t i = 0; i < pick.size(); ++i) topk.at(t, static_cast<int64_t>(i)) = static_cast<float>(pick[i]);
  }
  ctx.record(prefix_ + ".scores", scores);
  ctx.record(prefix_ + ".topk", topk);
  return selected;
}

}  // namespace dsv4::ref
