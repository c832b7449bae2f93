// The reference MoE (dsv4-model §3, §8 items 7-8): routing (hash table by the current token id,
// top-k of s + bias with weights from s only, the MTP layer never hashed), forcing, the SwiGLU clamp
// (up on both sides, gate from above only), and the whole layer against a plain fp64 recomputation.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/checkpoint/synthetic_weights.h"
#include "engine/config/model_config.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "reference/moe.h"

namespace dsv4::ref {
namespace {

namespace fs = std::filesystem;

const ModelConfig& tiny() {
  static const ModelConfig c = load_model_config("tiny");
  return c;
}
const Weights& tiny_weights() {
  static const Weights w = Weights::synthetic(tiny(), 3);
  return w;
}

// ffn_norm-like input: O(1) values, bf16-representable so both modes see the same x.
Mat random_input(int64_t T, int64_t dim, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Mat x(T, dim);
  for (float& v : x.data) v = round_bf16(normal(rng));
  return x;
}

std::vector<int64_t> token_ids(int64_t T, int64_t first, int64_t stride, int64_t vocab) {
  std::vector<int64_t> ids;
  for (int64_t t = 0; t < T; ++t) ids.push_back((first + t * stride) % vocab);
  return ids;
}

std::vector<int64_t> row_ints(const Mat& m, int64_t r) {
  std::vector<int64_t> out;
  for (int64_t j = 0; j < m.cols; ++j) out.push_back(static_cast<int64_t>(m.at(r, j)));
  return out;
}

double max_abs_diff(const Mat& a, const Mat& b) {
  double d = 0.0;
  for (size_t i = 0; i < a.data.size(); ++i) d = std::max(d, std::abs(static_cast<double>(a.data[i]) - b.data[i]));
  return d;
}

// ---- a plain fp64 recomputation of §3, written independently of reference/moe.cpp ----------------

struct Gate {
  std::vector<double> s;         // sqrt(softplus(logits)) for every expert
  std::vector<int64_t> experts;  // the k chosen
  std::vector<double> weights;   // s[chosen] / Σ s[chosen] · route_scale
};

Gate recompute_gate(const ModelConfig& c, const Weights& w, const std::string& p, bool hash, const float* x,
                    int64_t token) {
  Gate g;
  const Mat& Wg = w.get(p + ".gate.weight");
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    double logit = 0.0;
    for (int64_t i = 0; i < c.dim; ++i) logit += static_cast<double>(Wg.at(e, i)) * x[i];
    g.s.push_back(std::sqrt(std::log1p(std::exp(logit))));
  }
  if (hash) {
    const Mat& table = w.get(p + ".gate.tid2eid");
    for (int64_t j = 0; j < c.n_activated_experts; ++j) g.experts.push_back(static_cast<int64_t>(table.at(token, j)));
  } else {
    const Mat& bias = w.get(p + ".gate.bias");
    std::vector<bool> taken(static_cast<size_t>(c.n_routed_experts), false);
    for (int64_t j = 0; j < c.n_activated_experts; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        if (taken[static_cast<size_t>(e)]) continue;
        const double key = g.s[static_cast<size_t>(e)] + bias.data[static_cast<size_t>(e)];
        if (best < 0 || key > g.s[static_cast<size_t>(best)] + bias.data[static_cast<size_t>(best)]) best = e;
      }
      taken[static_cast<size_t>(best)] = true;
      g.experts.push_back(best);
    }
  }
  double sum = 0.0;
  for (int64_t e : g.experts) sum += g.s[static_cast<size_t>(e)];
  for (int64_t e : g.experts) g.weights.push_back(g.s[static_cast<size_t>(e)] / sum * c.route_scale);
  return g;
}

// How the recomputation clamps: `correct` is §3; the others are the plausible mistakes.
enum class Clamp { correct, none, gate_both_sides, up_above_only };

struct ExpertStats {
  int64_t gate_above = 0, gate_below = 0, up_above = 0, up_below = 0;  // entries past ±L
};

// y = w2 (silu(g) · u · weight) with g = w1 x, u = w3 x; weight < 0: the shared expert (no weight).
void recompute_expert(const ModelConfig& c, const Weights& w, const std::string& ep, const float* x, double weight,
                      bool clamp_this, Clamp how, std::vector<double>& y, ExpertStats* stats) {
  const Mat& w1 = w.get(ep + "w1.weight");
  const Mat& w2 = w.get(ep + "w2.weight");
  const Mat& w3 = w.get(ep + "w3.weight");
  const double L = c.swiglu_limit;
  std::vector<double> h(static_cast<size_t>(w1.rows));
  for (int64_t o = 0; o < w1.rows; ++o) {
    double g = 0.0, u = 0.0;
    for (int64_t i = 0; i < c.dim; ++i) {
      g += static_cast<double>(w1.at(o, i)) * x[i];
      u += static_cast<double>(w3.at(o, i)) * x[i];
    }
    if (stats != nullptr) {
      stats->gate_above += g > L;
      stats->gate_below += g < -L;
      stats->up_above += u > L;
      stats->up_below += u < -L;
    }
    if (clamp_this && L > 0 && how != Clamp::none) {
      u = how == Clamp::up_above_only ? std::min(u, L) : std::clamp(u, -L, L);
      g = how == Clamp::gate_both_sides ? std::clamp(g, -L, L) : std::min(g, L);
    }
    h[static_cast<size_t>(o)] = g / (1.0 + std::exp(-g)) * u * (weight < 0 ? 1.0 : weight);
  }
  for (int64_t d = 0; d < c.dim; ++d) {
    double acc = 0.0;
    for (int64_t o = 0; o < w2.cols; ++o) acc += static_cast<double>(w2.at(d, o)) * h[static_cast<size_t>(o)];
    y[static_cast<size_t>(d)] += acc;
  }
}

std::vector<double> recompute_moe(const ModelConfig& c, const Weights& w, const std::string& p, const Gate& g,
                                  const float* x, Clamp how, ExpertStats* stats = nullptr) {
  std::vector<double> y(static_cast<size_t>(c.dim), 0.0);
  for (size_t j = 0; j < g.experts.size(); ++j) {
    recompute_expert(c, w, p + ".experts." + std::to_string(g.experts[j]) + ".", x, g.weights[j], true, how, y, stats);
  }
  recompute_expert(c, w, p + ".shared_experts.", x, -1.0, c.clamp_shared_expert, how, y, stats);
  return y;
}

// max |out - ref| / (1 + |ref|) over one token's row.
double rel_diff(const float* out, const std::vector<double>& ref) {
  double d = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) d = std::max(d, std::abs(out[i] - ref[i]) / (1.0 + std::abs(ref[i])));
  return d;
}

// ---- routing ---------------------------------------------------------------------------------------

TEST(ReferenceMoE, HashLayersAreTheFirstNHashLayersAndNeverMtp) {
  const ModelConfig& c = tiny();
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const MoE moe(c, tiny_weights(), "layers." + std::to_string(l) + ".ffn", l);
    EXPECT_EQ(moe.hash_routed(), l < c.n_hash_layers) << "layer " << l;
  }
  const MoE mtp(c, tiny_weights(), "mtp.0.ffn", c.n_layers);
  EXPECT_FALSE(mtp.hash_routed());
}

TEST(ReferenceMoE, HashLayerTakesTheTableRowOfTheCurrentTokenId) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "layers.1.ffn", 1);
  Trace trace;
  const Context ctx{c, Numerics{Mode::exact}, &trace, nullptr};
  const int64_t T = 12;
  const Mat x = random_input(T, c.dim, 1);
  const std::vector<int64_t> ids = token_ids(T, 5, 77, c.vocab_size);
  moe.forward(ctx, x, ids, 40);
  const Mat& experts = trace.values.at("layers.1.ffn.gate.experts");
  const Mat& table = w.get("layers.1.ffn.gate.tid2eid");
  for (int64_t t = 0; t < T; ++t) EXPECT_EQ(row_ints(experts, t), row_ints(table, ids[static_cast<size_t>(t)])) << t;

  // Another input (other gate logits) with the same ids: the same experts, other weights.
  Trace trace2;
  const Context ctx2{c, Numerics{Mode::exact}, &trace2, nullptr};
  moe.forward(ctx2, random_input(T, c.dim, 2), ids, 0);
  EXPECT_EQ(trace2.values.at("layers.1.ffn.gate.experts").data, experts.data);
  EXPECT_NE(trace2.values.at("layers.1.ffn.gate.weights").data, trace.values.at("layers.1.ffn.gate.weights").data);
}

// A micro checkpoint equal to Weights::synthetic(c, 7) except for the gate weights named in `other`,
// which come from seed 8.
class ReplacedGateFile {
 public:
  ReplacedGateFile(const ModelConfig& c, const std::set<std::string>& other)
      : path_(fs::temp_directory_path() / ("dsv4_ref_moe_gate_" + std::to_string(getpid()) + ".safetensors")) {
    SafetensorsWriter writer;
    for (const TensorSpec& spec : checkpoint_layout(c)) {
      writer.add(spec.name, spec.dtype, spec.shape, synthetic_tensor_bytes(c, spec, other.count(spec.name) ? 8 : 7));
    }
    writer.write(path_.string());
  }
  ~ReplacedGateFile() { fs::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

TEST(ReferenceMoE, HashLayerIgnoresTheGateChoiceButScoreLayerDoesNot) {
  const ModelConfig c = load_model_config("micro");
  const Weights a = Weights::synthetic(c, 7);
  const ReplacedGateFile file(c, {"layers.0.ffn.gate.weight", "layers.3.ffn.gate.weight", "layers.3.ffn.gate.bias"});
  const Weights b = Weights::from_file(c, file.path());
  const int64_t T = 16;
  const Mat x = random_input(T, c.dim, 3);
  const std::vector<int64_t> ids = token_ids(T, 1, 13, c.vocab_size);
  auto run = [&](const Weights& w, const std::string& p, int64_t layer, Trace& trace) {
    const Context ctx{c, Numerics{Mode::exact}, &trace, nullptr};
    return MoE(c, w, p, layer).forward(ctx, x, ids, 0);
  };

  Trace ha, hb;
  run(a, "layers.0.ffn", 0, ha);
  run(b, "layers.0.ffn", 0, hb);
  EXPECT_EQ(hb.values.at("layers.0.ffn.gate.experts").data, ha.values.at("layers.0.ffn.gate.experts").data);
  EXPECT_NE(hb.values.at("layers.0.ffn.gate.scores").data, ha.values.at("layers.0.ffn.gate.scores").data);
  EXPECT_NE(hb.values.at("layers.0.ffn.gate.weights").data, ha.values.at("layers.0.ffn.gate.weights").data);

  // The same replacement on a score-routed layer changes the experts picked for some tokens.
  Trace sa, sb;
  run(a, "layers.3.ffn", 3, sa);
  run(b, "layers.3.ffn", 3, sb);
  EXPECT_NE(sb.values.at("layers.3.ffn.gate.experts").data, sa.values.at("layers.3.ffn.gate.experts").data);
}

TEST(ReferenceMoE, MtpLayerIsScoreRoutedAndIgnoresTokenIds) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "mtp.0.ffn", c.n_layers);
  const int64_t T = 8;
  const Mat x = random_input(T, c.dim, 4);
  Trace t1, t2;
  const Mat y1 = moe.forward(Context{c, Numerics{Mode::exact}, &t1, nullptr}, x, token_ids(T, 0, 1, c.vocab_size), 0);
  const Mat y2 = moe.forward(Context{c, Numerics{Mode::exact}, &t2, nullptr}, x, token_ids(T, 500, 37, c.vocab_size), 0);
  EXPECT_EQ(y1.data, y2.data);
  const Mat& experts = t1.values.at("mtp.0.ffn.gate.experts");
  for (int64_t t = 0; t < T; ++t) {
    const Gate g = recompute_gate(c, w, "mtp.0.ffn", false, x.row(t), 0);
    EXPECT_EQ(row_ints(experts, t), g.experts) << t;
  }
}

TEST(ReferenceMoE, ScoreLayerPicksTopKOfScorePlusBiasAndWeighsByScoreOnly) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "layers.3.ffn", 3);
  Trace trace;
  const int64_t T = 64;
  const Mat x = random_input(T, c.dim, 5);
  moe.forward(Context{c, Numerics{Mode::exact}, &trace, nullptr}, x, token_ids(T, 0, 1, c.vocab_size), 0);
  const Mat& s = trace.values.at("layers.3.ffn.gate.scores");
  const Mat& experts = trace.values.at("layers.3.ffn.gate.experts");
  const Mat& weights = trace.values.at("layers.3.ffn.gate.weights");
  const Mat& bias = w.get("layers.3.ffn.gate.bias");
  ASSERT_EQ(s.cols, c.n_routed_experts);
  ASSERT_EQ(experts.cols, c.n_activated_experts);
  auto top_k = [&](int64_t t, bool with_bias) {
    std::vector<int64_t> order(static_cast<size_t>(c.n_routed_experts));
    for (size_t e = 0; e < order.size(); ++e) order[e] = static_cast<int64_t>(e);
    auto key = [&](int64_t e) { return s.at(t, e) + (with_bias ? bias.data[static_cast<size_t>(e)] : 0.0f); };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
    order.resize(static_cast<size_t>(c.n_activated_experts));
    return order;
  };
  int64_t bias_changed_choice = 0;
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int64_t> chosen = row_ints(experts, t);
    EXPECT_EQ(chosen, top_k(t, true)) << t;
    bias_changed_choice += chosen != top_k(t, false);
    double sum = 0.0;
    for (int64_t e : chosen) sum += s.at(t, e);
    for (int64_t j = 0; j < c.n_activated_experts; ++j) {
      EXPECT_NEAR(weights.at(t, j), s.at(t, chosen[static_cast<size_t>(j)]) / sum * c.route_scale, 1e-6) << t;
    }
    // The scores are sqrt(softplus(x · Wg)).
    const Gate g = recompute_gate(c, w, "layers.3.ffn", false, x.row(t), 0);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) EXPECT_NEAR(s.at(t, e), g.s[static_cast<size_t>(e)], 1e-6);
  }
  EXPECT_GT(bias_changed_choice, 0) << "the bias never mattered: the test does not tell s from s + bias";
}

// ---- the whole layer ------------------------------------------------------------------------------

TEST(ReferenceMoE, MatchesAPlainRecomputationPerToken) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  struct Layer {
    std::string prefix;
    int64_t id;
  };
  for (const Layer& l : {Layer{"layers.0.ffn", 0}, Layer{"layers.4.ffn", 4}, Layer{"mtp.0.ffn", c.n_layers}}) {
    const MoE moe(c, w, l.prefix, l.id);
    const int64_t T = 3;
    const Mat x = random_input(T, c.dim, 6);
    const std::vector<int64_t> ids = token_ids(T, 9, 101, c.vocab_size);
    Trace trace;
    const Mat y = moe.forward(Context{c, Numerics{Mode::exact}, &trace, nullptr}, x, ids, 17);
    ASSERT_EQ(y.rows, T);
    ASSERT_EQ(y.cols, c.dim);
    EXPECT_EQ(trace.values.at(l.prefix + ".out").data, y.data);
    for (int64_t t = 0; t < T; ++t) {
      const Gate g = recompute_gate(c, w, l.prefix, moe.hash_routed(), x.row(t), ids[static_cast<size_t>(t)]);
      EXPECT_EQ(row_ints(trace.values.at(l.prefix + ".gate.experts"), t), g.experts);
      // The layer's output for one token alone equals its row of the batch.
      const Mat alone = moe.forward(Context{c, Numerics{Mode::exact}, nullptr, nullptr}, rows_of(x, t, 1),
                                    {ids[static_cast<size_t>(t)]}, 17 + t);
      EXPECT_EQ(alone.data, rows_of(y, t, 1).data);
      EXPECT_LT(rel_diff(y.row(t), recompute_moe(c, w, l.prefix, g, x.row(t), Clamp::correct)), 1e-5)
          << l.prefix << " token " << t;
    }
  }
}

// tiny with a small limit, so the clamp fires on random weights.
ModelConfig small_limit(bool clamp_shared) {
  ModelConfig c = tiny();
  c.swiglu_limit = 0.5;
  c.clamp_shared_expert = clamp_shared;
  return c;
}

TEST(ReferenceMoE, SmallLimitClampsUpBothSidesAndGateFromAboveOnly) {
  const ModelConfig c = small_limit(true);
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "layers.3.ffn", 3);
  const int64_t T = 4;
  const Mat x = random_input(T, c.dim, 7);
  const Mat y = moe.forward(Context{c, Numerics{Mode::exact}, nullptr, nullptr}, x, token_ids(T, 0, 1, c.vocab_size), 0);
  for (int64_t t = 0; t < T; ++t) {
    const Gate g = recompute_gate(c, w, "layers.3.ffn", false, x.row(t), 0);
    ExpertStats stats;
    const std::vector<double> correct = recompute_moe(c, w, "layers.3.ffn", g, x.row(t), Clamp::correct, &stats);
    // Every side of the clamp has something to act on.
    EXPECT_GT(stats.gate_above, 0);
    EXPECT_GT(stats.gate_below, 0);
    EXPECT_GT(stats.up_above, 0);
    EXPECT_GT(stats.up_below, 0);
    EXPECT_LT(rel_diff(y.row(t), correct), 1e-5) << t;
    for (Clamp wrong : {Clamp::none, Clamp::gate_both_sides, Clamp::up_above_only}) {
      EXPECT_GT(rel_diff(y.row(t), recompute_moe(c, w, "layers.3.ffn", g, x.row(t), wrong)), 1e-3)
          << "token " << t << " matches clamp variant " << static_cast<int>(wrong);
    }
  }
}

TEST(ReferenceMoE, SharedExpertClampFollowsTheConfig) {
  const ModelConfig clamped = small_limit(true);
  const ModelConfig unclamped = small_limit(false);
  const Weights& w = tiny_weights();
  const int64_t T = 2;
  const Mat x = random_input(T, clamped.dim, 8);
  const std::vector<int64_t> ids = token_ids(T, 0, 1, clamped.vocab_size);
  const Mat yc = MoE(clamped, w, "layers.4.ffn", 4).forward(Context{clamped, Numerics{Mode::exact}, nullptr, nullptr}, x, ids, 0);
  const Mat yu = MoE(unclamped, w, "layers.4.ffn", 4).forward(Context{unclamped, Numerics{Mode::exact}, nullptr, nullptr}, x, ids, 0);
  EXPECT_GT(max_abs_diff(yc, yu), 1e-3);
  for (int64_t t = 0; t < T; ++t) {
    const Gate g = recompute_gate(unclamped, w, "layers.4.ffn", false, x.row(t), 0);
    EXPECT_LT(rel_diff(yu.row(t), recompute_moe(unclamped, w, "layers.4.ffn", g, x.row(t), Clamp::correct)), 1e-5);
    EXPECT_LT(rel_diff(yc.row(t), recompute_moe(clamped, w, "layers.4.ffn", g, x.row(t), Clamp::correct)), 1e-5);
  }
}

TEST(ReferenceMoE, DefaultLimitDoesNotFire) {
  const ModelConfig& c = tiny();
  ASSERT_EQ(c.swiglu_limit, 10.0);
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "layers.3.ffn", 3);
  const int64_t T = 8;
  const Mat x = random_input(T, c.dim, 9);
  const Mat y = moe.forward(Context{c, Numerics{Mode::exact}, nullptr, nullptr}, x, token_ids(T, 0, 1, c.vocab_size), 0);
  for (int64_t t = 0; t < T; ++t) {
    const Gate g = recompute_gate(c, w, "layers.3.ffn", false, x.row(t), 0);
    ExpertStats stats;
    const std::vector<double> unclamped = recompute_moe(c, w, "layers.3.ffn", g, x.row(t), Clamp::none, &stats);
    EXPECT_EQ(stats.gate_above + stats.up_above + stats.up_below, 0);
    EXPECT_LT(rel_diff(y.row(t), unclamped), 1e-5);
  }
}

// ---- forcing --------------------------------------------------------------------------------------

TEST(ReferenceMoE, ForcedExpertsAreUsedAndRecorded) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  const MoE moe(c, w, "layers.3.ffn", 3);
  const int64_t T = 4, start = 100;
  const Mat x = random_input(T, c.dim, 10);
  const std::vector<int64_t> ids = token_ids(T, 0, 1, c.vocab_size);
  Trace natural;
  const Mat yn = moe.forward(Context{c, Numerics{Mode::exact}, &natural, nullptr}, x, ids, start);
  const std::vector<int64_t> chosen = row_ints(natural.values.at("layers.3.ffn.gate.experts"), 1);
  // Two experts the gate did not pick for position start + 1, in descending index order.
  std::vector<int64_t> other;
  for (int64_t e = c.n_routed_experts - 1; e >= 0 && static_cast<int64_t>(other.size()) < c.n_activated_experts; --e) {
    if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) other.push_back(e);
  }
  std::vector<std::pair<int64_t, int64_t>> asked;
  Forcing forcing;
  forcing.experts = [&](int64_t layer, int64_t position) -> std::optional<std::vector<int64_t>> {
    asked.emplace_back(layer, position);
    if (position == start + 1) return other;
    return std::nullopt;
  };
  Trace forced;
  const Mat yf = moe.forward(Context{c, Numerics{Mode::exact}, &forced, &forcing}, x, ids, start);
  ASSERT_EQ(asked.size(), static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) EXPECT_EQ(asked[static_cast<size_t>(t)], std::make_pair(int64_t{3}, start + t));

  const Mat& fe = forced.values.at("layers.3.ffn.gate.experts");
  EXPECT_EQ(row_ints(fe, 1), other);
  // Other tokens are untouched; the forced one changes, with weights still from s.
  for (int64_t t : {0, 2, 3}) EXPECT_EQ(rows_of(yf, t, 1).data, rows_of(yn, t, 1).data);
  EXPECT_GT(max_abs_diff(rows_of(yf, 1, 1), rows_of(yn, 1, 1)), 1e-3);
  const Mat& s = forced.values.at("layers.3.ffn.gate.scores");
  const double sum = s.at(1, other[0]) + s.at(1, other[1]);
  EXPECT_NEAR(forced.values.at("layers.3.ffn.gate.weights").at(1, 0), s.at(1, other[0]) / sum * c.route_scale, 1e-6);
  Gate g = recompute_gate(c, w, "layers.3.ffn", false, x.row(1), 0);
  g.experts = other;
  g.weights = {g.s[static_cast<size_t>(other[0])] / (g.s[static_cast<size_t>(other[0])] + g.s[static_cast<size_t>(other[1])]) * c.route_scale,
               g.s[static_cast<size_t>(other[1])] / (g.s[static_cast<size_t>(other[0])] + g.s[static_cast<size_t>(other[1])]) * c.route_scale};
  EXPECT_LT(rel_diff(yf.row(1), recompute_moe(c, w, "layers.3.ffn", g, x.row(1), Clamp::correct)), 1e-5);

  // Forcing the gate's own choice changes nothing.
  forcing.experts = [&](int64_t, int64_t position) -> std::optional<std::vector<int64_t>> {
    return row_ints(natural.values.at("layers.3.ffn.gate.experts"), position - start);
  };
  EXPECT_EQ(moe.forward(Context{c, Numerics{Mode::exact}, nullptr, &forcing}, x, ids, start).data, yn.data);
}

TEST(ReferenceMoE, ForcingOverridesTheHashTableAndRejectsBadSets) {
  const ModelConfig& c = tiny();
  const MoE moe(c, tiny_weights(), "layers.2.ffn", 2);
  const Mat x = random_input(1, c.dim, 11);
  std::vector<int64_t> set = {6, 3};
  Forcing forcing;
  forcing.experts = [&](int64_t layer, int64_t) -> std::optional<std::vector<int64_t>> {
    EXPECT_EQ(layer, 2);
    return set;
  };
  Trace trace;
  moe.forward(Context{c, Numerics{Mode::exact}, &trace, &forcing}, x, {5}, 0);
  EXPECT_EQ(row_ints(trace.values.at("layers.2.ffn.gate.experts"), 0), set);

  const Context ctx{c, Numerics{Mode::exact}, nullptr, &forcing};
  set = {3, 3};
  EXPECT_THROW(moe.forward(ctx, x, {5}, 0), ContractError);
  set = {3};
  EXPECT_THROW(moe.forward(ctx, x, {5}, 0), ContractError);
  set = {3, 8};
  EXPECT_THROW(moe.forward(ctx, x, {5}, 0), ContractError);
  const Context plain{c, Numerics{Mode::exact}, nullptr, nullptr};
  EXPECT_THROW(moe.forward(plain, x, {c.vocab_size}, 0), ContractError);
}

// ---- numerics -------------------------------------------------------------------------------------

TEST(ReferenceMoE, QuantSimDiffersFromExactAtQuantizationNoiseLevel) {
  const ModelConfig& c = tiny();
  const Weights& w = tiny_weights();
  for (int64_t layer : {1, 3}) {
    const std::string p = "layers." + std::to_string(layer) + ".ffn";
    const MoE moe(c, w, p, layer);
    const int64_t T = 16;
    const Mat x = random_input(T, c.dim, 12);
    const std::vector<int64_t> ids = token_ids(T, 3, 29, c.vocab_size);
    Trace te;
    const Mat ye = moe.forward(Context{c, Numerics{Mode::exact}, &te, nullptr}, x, ids, 0);
    // Same experts in both modes (a near-tie could flip otherwise), so only the numerics differ.
    Forcing same;
    same.experts = [&](int64_t, int64_t position) -> std::optional<std::vector<int64_t>> {
      return row_ints(te.values.at(p + ".gate.experts"), position);
    };
    Trace tq;
    const Mat yq = moe.forward(Context{c, Numerics{Mode::quant_sim}, &tq, &same}, x, ids, 0);
    // The gate is an fp32 GEMM in both modes: identical scores on the same bf16 input.
    EXPECT_EQ(tq.values.at(p + ".gate.scores").data, te.values.at(p + ".gate.scores").data);
    double err = 0.0, norm = 0.0;
    for (size_t i = 0; i < ye.data.size(); ++i) {
      EXPECT_EQ(yq.data[i], round_bf16(yq.data[i])) << "quant-sim output is not bf16";
      err += std::pow(static_cast<double>(yq.data[i]) - ye.data[i], 2);
      norm += std::pow(static_cast<double>(ye.data[i]), 2);
    }
    const double rel = std::sqrt(err / norm);
    // Two FP8 e4m3 activation quantizations in series (x before w1/w3, h before w2; 3 mantissa bits,
    // about 2.7% rms each) give about 4.7% on tiny. bf16 rounding alone would be about 0.2%, a wrong
    // routing weight or expert far more than 10%.
    EXPECT_GT(rel, 1e-2) << p;
    EXPECT_LT(rel, 8e-2) << p;
  }
}

}  // namespace
}  // namespace dsv4::ref
