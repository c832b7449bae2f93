#include "reference/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "engine/core/error.h"
#include "reference/linear.h"

namespace dsv4::ref {

namespace {

// sqrt(softplus(z)) with softplus(z) = max(z, 0) + log1p(e^-|z|): no overflow for large |z|, and
// no threshold switch (torch's switch at z > 20 agrees to within fp32 rounding).
float sqrt_softplus(float z) {
  const double zd = z;
  const double softplus = std::max(zd, 0.0) + std::log1p(std::exp(-std::abs(zd)));
  return std::sqrt(static_cast<float>(softplus));
}

// Throws ContractError unless `experts` holds k distinct indices in [0, E).
void check_expert_set(const std::vector<int64_t>& experts, int64_t k, int64_t E, const std::string& what) {
  if (static_cast<int64_t>(experts.size()) != k) {
    throw ContractError("MoE::forward", what, "needs " + std::to_string(k) + " experts, got " + std::to_string(experts.size()));
  }
  for (size_t j = 0; j < experts.size(); ++j) {
    if (experts[j] < 0 || experts[j] >= E) {
      throw ContractError("MoE::forward", what, "expert " + std::to_string(experts[j]) + " outside [0, " + std::to_string(E) + ")");
    }
    // Two equal experts would be summed twice here but scatter-added once by the official code.
    for (size_t i = 0; i < j; ++i) {
      if (experts[i] == experts[j]) throw ContractError("MoE::forward", what, "expert " + std::to_string(experts[j]) + " repeated");
    }
  }
}

}  // namespace

MoE::MoE(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id)
    : config_(config), prefix_(std::move(prefix)), layer_id_(layer_id), hash_(config.is_hash_layer(layer_id)) {
  DSV4_ASSERT(layer_id >= 0, "MoE: negative layer id");
  DSV4_ASSERT(layer_id < config.n_layers + config.n_mtp_layers, "MoE: layer id past the MTP layers");
  const int64_t E = config.n_routed_experts;
  const int64_t k = config.n_activated_experts;
  DSV4_ASSERT(k >= 1, "MoE: at least one activated expert");
  DSV4_ASSERT(k <= E, "MoE: more activated experts than routed ones");
  const std::string p = prefix_ + ".";
  gate_weight_ = &weights.get(p + "gate.weight");
  DSV4_ASSERT(gate_weight_->rows == E, "MoE: gate.weight must have n_routed_experts rows");
  DSV4_ASSERT(gate_weight_->cols == config.dim, "MoE: gate.weight width != dim");
  if (hash_) {
    tid2eid_ = &weights.get(p + "gate.tid2eid");
    DSV4_ASSERT(tid2eid_->rows == config.vocab_size, "MoE: tid2eid must have vocab_size rows");
    DSV4_ASSERT(tid2eid_->cols == k, "MoE: tid2eid must have n_activated_experts columns");
    for (int64_t r = 0; r < tid2eid_->rows; ++r) {
      std::vector<int64_t> row(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) {
        const float v = tid2eid_->at(r, j);
        if (v != std::floor(v)) throw InputError(p + "gate.tid2eid", "row " + std::to_string(r), "entries must be integers");
        row[static_cast<size_t>(j)] = static_cast<int64_t>(v);
      }
      try {
        check_expert_set(row, k, E, "tid2eid");
      } catch (const ContractError& e) {
        throw InputError(p + "gate.tid2eid", "row " + std::to_string(r), e.rule());
      }
    }
  } else {
    gate_bias_ = &weights.get(p + "gate.bias");
    DSV4_ASSERT(gate_bias_->size() == E, "MoE: gate.bias must hold n_routed_experts values");
  }
  auto expert = [&](const std::string& ep) {
    Expert e{&weights.get(ep + "w1.weight"), &weights.get(ep + "w2.weight"), &weights.get(ep + "w3.weight")};
    DSV4_ASSERT(e.w1->cols == config.dim && e.w3->cols == config.dim, "MoE: w1 / w3 width != dim");
    DSV4_ASSERT(e.w1->rows == e.w3->rows, "MoE: w1 and w3 have different inner widths");
    DSV4_ASSERT(e.w2->rows == config.dim, "MoE: w2 must have dim rows");
    DSV4_ASSERT(e.w2->cols == e.w1->rows, "MoE: w2 width != inner width");
    return e;
  };
  for (int64_t e = 0; e < E; ++e) experts_.push_back(expert(p + "experts." + std::to_string(e) + "."));
  shared_ = expert(p + "shared_experts.");
}

std::vector<int64_t> MoE::route(const Context& ctx, const float* s, int64_t token_id, int64_t position) const {
  const int64_t E = config_.n_routed_experts;
  const int64_t k = config_.n_activated_experts;
  if (ctx.forcing != nullptr && ctx.forcing->experts) {
    if (std::optional<std::vector<int64_t>> forced = ctx.forcing->experts(layer_id_, position)) {
      check_expert_set(*forced, k, E, "forcing.experts");
      return *forced;
    }
  }
  std::vector<int64_t> experts(static_cast<size_t>(k));
  if (hash_) {
    // The table row of the current token id; nothing is hashed at runtime.
    for (int64_t j = 0; j < k; ++j) experts[static_cast<size_t>(j)] = static_cast<int64_t>(tid2eid_->at(token_id, j));
    return experts;
  }
  // Top-k of s + bias (the bias only selects), descending; a stable sort keeps lower indices first on ties.
  std::vector<float> key(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) key[static_cast<size_t>(e)] = s[e] + gate_bias_->data[static_cast<size_t>(e)];
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return key[static_cast<size_t>(a)] > key[static_cast<size_t>(b)]; });
  std::copy(order.begin(), order.begin() + k, experts.begin());
  return experts;
}

Mat MoE::expert_forward(const Context& ctx, const Expert& e, const Mat& x, bool routed, float route_weight) const {
  const LinearKind kind = routed && config_.expert_dtype == "fp4" ? LinearKind::fp4 : LinearKind::fp8;
  const Mat g = linear(ctx, x, *e.w1, kind);  // bf16 outputs in quant-sim, used as fp32 below
  const Mat u = linear(ctx, x, *e.w3, kind);
  const float L = static_cast<float>(config_.swiglu_limit);
  const bool clamp = L > 0.0f && (routed || config_.clamp_shared_expert);
  Mat h(x.rows, g.cols);
  for (int64_t t = 0; t < x.rows; ++t) {
    for (int64_t i = 0; i < g.cols; ++i) {
      float gi = g.at(t, i);
      float ui = u.at(t, i);
      if (clamp) {
        ui = std::clamp(ui, -L, L);  // up: both sides
        gi = std::min(gi, L);        // gate: from above only
      }
      float hi = gi / (1.0f + std::exp(-gi)) * ui;  // silu(g) · u
      if (routed) hi *= route_weight;                // before w2 and its input quantization
      h.at(t, i) = ctx.act(hi);
    }
  }
  return linear(ctx, h, *e.w2, kind);
}

Mat MoE::forward(const Context& ctx, const Mat& x, const std::vector<int64_t>& token_ids, int64_t start_pos) const {
  const int64_t T = x.rows;
  const int64_t E = config_.n_routed_experts;
  const int64_t k = config_.n_activated_experts;
  const int64_t dim = config_.dim;
  DSV4_ASSERT(x.cols == dim, "MoE: input width != dim");
  DSV4_ASSERT(static_cast<int64_t>(token_ids.size()) == T, "MoE: one token id per input row");
  DSV4_ASSERT(start_pos >= 0, "MoE: negative start position");

  // Gate: an fp32 GEMM on the upcast input, s = sqrt(softplus(logits)) in fp32.
  const Mat logits = linear(ctx, x, *gate_weight_, LinearKind::f32);
  Mat scores(T, E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) scores.at(t, e) = sqrt_softplus(logits.at(t, e));
  }

  Mat chosen(T, k);
  Mat weights(T, k);
  Mat out(T, dim);
  const float route_scale = static_cast<float>(config_.route_scale);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t token = token_ids[static_cast<size_t>(t)];
    if (hash_ && (token < 0 || token >= config_.vocab_size)) {
      throw ContractError("MoE::forward", "token_ids", "token id " + std::to_string(token) + " outside the vocabulary");
    }
    const float* s = scores.row(t);
    const std::vector<int64_t> experts = route(ctx, s, token, start_pos + t);

    // w = s[chosen] / Σ s[chosen] · route_scale, in fp32 as the official code (hash layers too).
    float sum = 0.0f;
    for (int64_t e : experts) sum += s[e];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = experts[static_cast<size_t>(j)];
      chosen.at(t, j) = static_cast<float>(e);
      weights.at(t, j) = s[e] / sum * route_scale;
    }

    // Combine: routed experts in the order chosen, the shared expert last, one rounding.
    const Mat xt = rows_of(x, t, 1);
    std::vector<double> acc(static_cast<size_t>(dim), 0.0);
    auto add = [&](const Mat& y) {
      for (int64_t i = 0; i < dim; ++i) acc[static_cast<size_t>(i)] += y.data[static_cast<size_t>(i)];
    };
    for (int64_t j = 0; j < k; ++j) {
      add(expert_forward(ctx, experts_[static_cast<size_t>(experts[static_cast<size_t>(j)])], xt, true, weights.at(t, j)));
    }
    add(expert_forward(ctx, shared_, xt, false, 1.0f));
    for (int64_t i = 0; i < dim; ++i) out.at(t, i) = ctx.act(static_cast<float>(acc[static_cast<size_t>(i)]));
  }

  ctx.record(prefix_ + ".gate.scores", scores);
  ctx.record(prefix_ + ".gate.experts", chosen);
  ctx.record(prefix_ + ".gate.weights", weights);
  ctx.record(prefix_ + ".out", out);
  return out;
}

}  // namespace dsv4::ref
