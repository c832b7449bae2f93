// The reference oracle (engine/oracle) against StepRecords built by a second reference model playing
// the engine: a clean run passes; a perturbed activation, a malformed or clearly worse decision, a
// wrong greedy token, a width or mask mismatch are named as the first divergence; near-ties pass as
// forced decisions exactly up to the decision tolerance, and the replay continues with the engine's
// choice; chunked prefill and the MTP block are replayed.
#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include <gtest/gtest.h>

#include "engine/oracle/oracle.h"
#include "reference/generate.h"
#include "reference/model.h"
#include "reference/weights.h"

namespace dsv4::engine {
namespace {

struct Fixture {
  ModelConfig config;
  ref::Weights weights;
};

const Fixture& micro() {
  static const std::unique_ptr<Fixture> f = [] {
    ModelConfig c = load_model_config("micro");
    ref::Weights w = ref::Weights::synthetic(c, 11);
    return std::make_unique<Fixture>(Fixture{std::move(c), std::move(w)});
  }();
  return *f;
}

constexpr ref::Numerics kQuant{ref::Mode::quant_sim};

std::vector<int32_t> prompt_of(uint64_t seed, int64_t length) {
  std::vector<int32_t> out;
  for (int64_t id : ref::synthetic_prompt(micro().config, seed, length)) out.push_back(static_cast<int32_t>(id));
  return out;
}

// A second reference model per request, playing the engine: each step runs its rows in batch order
// and records every per-token intermediate, the decisions included, as the engine's probes would.
class FakeEngine {
 public:
  using Decision = std::function<std::optional<std::vector<int64_t>>(int64_t request, int64_t layer, int64_t pos)>;
  using Sample = std::function<void(int64_t request, int64_t step, std::vector<float>& logits, int32_t& sampled)>;

  Decision indexer_tweak;  // an engine decision different from its own (nullopt: its own)
  Decision experts_tweak;
  Sample sample_tweak;
  // Changes the residual after block `layer` of a row (tokens from `start_pos`); returns whether it
  // did. The engine's later blocks, its head and its caches then run on the changed residual, and
  // the probe "layers.{layer}.residual" shows it.
  std::function<bool(int64_t request, int64_t layer, int64_t start_pos, ref::Mat& residual)> residual_tweak;
  bool mtp = false;        // run and probe the MTP block on every row

  void add(int64_t id, std::vector<int32_t> prompt) {
    Req& r = reqs_[id];
    r.prompt = std::move(prompt);
    r.model = std::make_unique<ref::Model>(micro().config, micro().weights);
  }

  // rows: (request, new tokens); prompt tokens while in the prompt, then the last sampled token.
  StepRecord step(const std::vector<std::pair<int64_t, int64_t>>& rows) {
    const ModelConfig& cfg = micro().config;
    StepRecord rec;
    rec.step = step_++;
    rec.mode = serving::ForwardMode::extend;
    std::vector<ref::Trace> traces;
    int64_t first = 0;
    for (const auto& [id, n] : rows) {
      Req& r = reqs_.at(id);
      StepRow row;
      row.request_id = id;
      row.start_pos = r.pos;
      row.num_tokens = n;
      row.first_token = first;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = r.pos + t;
        row.input_ids.push_back(p < static_cast<int64_t>(r.prompt.size()) ? r.prompt[static_cast<size_t>(p)] : r.last);
      }
      row.samples = r.pos + n >= static_cast<int64_t>(r.prompt.size());

      ref::Forcing forcing;
      if (indexer_tweak) forcing.indexer_topk = [&, id = id](int64_t l, int64_t p) { return indexer_tweak(id, l, p); };
      if (experts_tweak) forcing.experts = [&, id = id](int64_t l, int64_t p) { return experts_tweak(id, l, p); };
      ref::Trace trace;
      const ref::Context ctx{cfg, kQuant, &trace, &forcing};
      const std::vector<int64_t> tokens(row.input_ids.begin(), row.input_ids.end());
      // Model::forward, block by block, with the residual tweak between blocks.
      ref::Mat R = r.model->embed(tokens);
      for (int64_t l = 0; l < r.model->n_blocks(); ++l) {
        R = r.model->block(l).forward(ctx, R, tokens, r.pos);
        if (residual_tweak && residual_tweak(id, l, r.pos, R)) ctx.record("layers." + std::to_string(l) + ".residual", R);
      }
      const ref::Mat logits = r.model->head_logits(ctx, R);
      if (row.samples) {
        row.logits = logits.data;
        row.sampled_id = static_cast<int32_t>(ref::argmax(logits));
        if (sample_tweak) sample_tweak(id, rec.step, row.logits, row.sampled_id);
        r.last = row.sampled_id;
      }
      // The MTP block on every row, as the engine runs it: the token after the row's last is the
      // sampled one, or the next prompt token for a chunk inside the prompt.
      if (mtp && r.mtp_pos == r.pos) {
        std::vector<int64_t> next(tokens.begin() + 1, tokens.end());
        next.push_back(row.samples ? row.sampled_id : r.prompt[static_cast<size_t>(r.pos + n)]);
        r.model->mtp_forward(ctx, R, next, r.pos);
        r.mtp_pos = r.pos + n;
      }
      r.pos += n;
      first += n;
      traces.push_back(std::move(trace));
      rec.rows.push_back(std::move(row));
    }

    // Merge the per-token keys into [batch tokens, width]: the indexer scores pad with -inf, rows
    // that did not compute a key (MTP on a row that does not sample) hold NaN.
    const int64_t total = first;
    std::set<std::string> keys;
    for (const auto& tr : traces) {
      for (const auto& [k, v] : tr.values) keys.insert(k);
    }
    for (const std::string& key : keys) {
      bool per_token = true;
      int64_t width = 0;
      for (size_t i = 0; i < traces.size(); ++i) {
        auto it = traces[i].values.find(key);
        if (it == traces[i].values.end()) continue;
        if (it->second.rows != rec.rows[i].num_tokens) per_token = false;
        width = std::max(width, it->second.cols);
      }
      if (!per_token || key == "logits") continue;
      const bool scores = split_key(key).second == "attn.indexer.scores";
      ref::Mat m(total, width, scores ? -std::numeric_limits<float>::infinity() : std::nanf(""));
      for (size_t i = 0; i < traces.size(); ++i) {
        auto it = traces[i].values.find(key);
        if (it == traces[i].values.end()) continue;
        const ref::Mat& v = it->second;
        for (int64_t t = 0; t < v.rows; ++t) std::copy(v.row(t), v.row(t) + v.cols, m.row(rec.rows[i].first_token + t));
      }
      rec.values[key] = std::move(m);
    }
    return rec;
  }

 private:
  struct Req {
    std::vector<int32_t> prompt;
    std::unique_ptr<ref::Model> model;
    int64_t pos = 0;
    int64_t mtp_pos = 0;
    int32_t last = -1;
  };
  std::map<int64_t, Req> reqs_;
  int64_t step_ = 0;
};

// Request 7: a 24-token prompt in one step; request 9: a 30-token prompt in chunks of 16 and 14.
// Then `decodes` decode steps of both.
constexpr int64_t kA = 7, kB = 9;

void add_both(FakeEngine& engine, ReferenceOracle* oracle) {
  engine.add(kA, prompt_of(1, 24));
  engine.add(kB, prompt_of(2, 30));
  if (oracle != nullptr) {
    oracle->add_request(kA, prompt_of(1, 24));
    oracle->add_request(kB, prompt_of(2, 30));
  }
}

std::vector<StepRecord> run_both(FakeEngine& engine, int64_t decodes) {
  add_both(engine, nullptr);
  std::vector<StepRecord> steps;
  steps.push_back(engine.step({{kA, 24}, {kB, 16}}));
  steps.push_back(engine.step({{kA, 1}, {kB, 14}}));
  for (int64_t i = 0; i < decodes; ++i) steps.push_back(engine.step({{kA, 1}, {kB, 1}}));
  return steps;
}

// The oracle tests run in both modes: per-layer resync (the default) and one chained reference
// forward per row. The FakeEngine is the reference itself, so both see the same values.
bool g_resync = true;

OracleTolerances base_tol() {
  OracleTolerances tol;
  tol.resync_layers = g_resync;
  return tol;
}

class Oracle : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { g_resync = GetParam(); }
  void TearDown() override { g_resync = true; }
};

ReferenceOracle check_all(const std::vector<StepRecord>& steps, OracleTolerances tol = base_tol()) {
  ReferenceOracle oracle(micro().config, micro().weights, kQuant, std::move(tol));
  oracle.add_request(kA, prompt_of(1, 24));
  oracle.add_request(kB, prompt_of(2, 30));
  for (const StepRecord& s : steps) oracle.check(s);
  return oracle;
}

// The row of `request`'s token at `pos` in a step's values.
int64_t batch_row(const StepRecord& s, int64_t request, int64_t pos) {
  for (const StepRow& r : s.rows) {
    if (r.request_id == request && pos >= r.start_pos && pos < r.start_pos + r.num_tokens) {
      return r.first_token + pos - r.start_pos;
    }
  }
  return -1;
}

// A swap of one decision of a clean run: at (step, request, layer, pos), the reference set `own`
// becomes `swapped`, whose replaced candidate scores `gap` below the one it replaces.
struct Swap {
  int64_t step = -1, request = -1, layer = -1, pos = -1;
  std::vector<int64_t> own, swapped;
  double gap = 0.0;
};

// Every one-for-one swap of a decision key in the clean steps, scored by the reference's own
// (key) scores; `pick` chooses among candidate swaps (true: replace the current best).
Swap find_swap(const std::vector<StepRecord>& steps, bool indexer, const std::function<bool(double, double)>& better) {
  const ModelConfig& cfg = micro().config;
  Swap best;
  bool have = false;
  for (const StepRecord& s : steps) {
    for (const StepRow& row : s.rows) {
      for (int64_t layer = 0; layer < cfg.n_layers; ++layer) {
        const std::string prefix = "layers." + std::to_string(layer);
        if (!indexer && cfg.is_hash_layer(layer)) continue;
        const std::string dkey = prefix + (indexer ? ".attn.indexer.topk" : ".ffn.gate.experts");
        const std::string skey = prefix + (indexer ? ".attn.indexer.scores" : ".ffn.gate.scores");
        if (s.values.count(dkey) == 0) continue;
        for (int64_t t = 0; t < row.num_tokens; ++t) {
          const int64_t p = row.start_pos + t, r = row.first_token + t;
          std::vector<double> score;
          const ref::Mat& S = s.values.at(skey);
          const int64_t n = indexer ? (p + 1) / 4 : S.cols;
          for (int64_t e = 0; e < n; ++e) score.push_back(S.at(r, e));
          if (!indexer) {
            const ref::Mat& bias = micro().weights.get(prefix + ".ffn.gate.bias");
            for (int64_t e = 0; e < n; ++e) score[static_cast<size_t>(e)] += bias.data[static_cast<size_t>(e)];
          }
          std::vector<int64_t> own;
          const ref::Mat& D = s.values.at(dkey);
          for (int64_t j = 0; j < D.cols; ++j) {
            if (D.at(r, j) >= 0) own.push_back(static_cast<int64_t>(D.at(r, j)));
          }
          for (size_t i = 0; i < own.size(); ++i) {
            for (int64_t b = 0; b < n; ++b) {
              if (std::find(own.begin(), own.end(), b) != own.end()) continue;
              const double gap = score[static_cast<size_t>(own[i])] - score[static_cast<size_t>(b)];
              if (have && !better(gap, best.gap)) continue;
              have = true;
              best = Swap{s.step, row.request_id, layer, p, own, own, gap};
              best.swapped[i] = b;
            }
          }
        }
      }
    }
  }
  EXPECT_TRUE(have);
  return best;
}

FakeEngine::Decision decide(const Swap& sw) {
  return [sw](int64_t request, int64_t layer, int64_t pos) -> std::optional<std::vector<int64_t>> {
    if (request == sw.request && layer == sw.layer && pos == sw.pos) return sw.swapped;
    return std::nullopt;
  };
}

std::string decision_key(const Swap& sw, bool indexer) {
  return "layers." + std::to_string(sw.layer) + (indexer ? ".attn.indexer.topk" : ".ffn.gate.experts");
}

// ------------------------------------------------------------------------------------------------

TEST(OracleCompare, CalcDiffMasksAndGrossElements) {
  const std::vector<float> a = {1.0f, -2.0f, 3.0f, 0.5f};
  EXPECT_EQ(calc_diff(a.data(), a.data(), 4), 0.0);
  std::vector<float> neg = a;
  for (float& v : neg) v = -v;
  EXPECT_DOUBLE_EQ(calc_diff(neg.data(), a.data(), 4), 2.0);

  const ValueTolerance tol{1.0 / 32, 1.0 / 64, 1e-3, 16.0};
  std::vector<float> e = a;
  e[1] = -2.0078125f;  // one bf16 ulp
  ValueComparison c = compare_values(e.data(), a.data(), 4, tol);
  EXPECT_FALSE(c.failed) << c.reason;
  EXPECT_NEAR(c.max_abs, 0.0078125, 1e-9);

  std::vector<float> inf_r = a, inf_e = a;
  inf_r[2] = -std::numeric_limits<float>::infinity();
  inf_e[2] = -std::numeric_limits<float>::infinity();
  EXPECT_FALSE(compare_values(inf_e.data(), inf_r.data(), 4, tol).failed);  // same mask
  inf_e[2] = std::numeric_limits<float>::infinity();
  c = compare_values(inf_e.data(), inf_r.data(), 4, tol);
  EXPECT_TRUE(c.failed);
  EXPECT_NE(c.reason.find("mask"), std::string::npos);
  inf_e[2] = std::nanf("");
  EXPECT_TRUE(compare_values(inf_e.data(), inf_r.data(), 4, tol).failed);

  // One grossly wrong element of a long tensor: calc_diff barely moves, the elementwise rule fires.
  std::vector<float> big(4096, 1.0f), big_e(4096, 1.0f);
  big_e[100] = 3.0f;
  c = compare_values(big_e.data(), big.data(), 4096, tol);
  EXPECT_LT(c.calc_diff, 1e-3);
  EXPECT_TRUE(c.failed);
  EXPECT_NE(c.reason.find("elementwise"), std::string::npos);
  ValueTolerance no_gross = tol;
  no_gross.gross_factor = std::numeric_limits<double>::infinity();
  EXPECT_FALSE(compare_values(big_e.data(), big.data(), 4096, no_gross).failed);

  // A block whose values are all below atol (a ReLU'd indexer score row, micro): calc_diff's
  // denominator is floored at 2·n·atol², so it is judged by its absolute error.
  const std::vector<float> small_r = {0.0f, 0.001953125f, 0.0f, 0.0f}, small_e = {0.0f, 0.00265503f, 0.0f, 0.0f};
  EXPECT_NEAR(calc_diff(small_e.data(), small_r.data(), 4), 0.0453, 1e-4);  // unfloored
  const ValueTolerance scores{1.0 / 16, 1.0 / 16, 1e-2, 16.0};
  c = compare_values(small_e.data(), small_r.data(), 4, scores);
  EXPECT_FALSE(c.failed) << c.reason;
  EXPECT_NEAR(c.calc_diff, 4.9e-7 / (8.0 / 256.0), 1e-7);
  ValueTolerance no_floor = scores;
  no_floor.atol = 0.0;
  c = compare_values(small_e.data(), small_r.data(), 4, no_floor);
  EXPECT_TRUE(c.failed);
  EXPECT_NEAR(c.calc_diff, 0.0453, 1e-4);
  // Above atol the floor does not act: a 1 % error on O(1) values reads the plain calc_diff.
  const std::vector<float> one = {1.0f, -1.0f, 1.0f, -1.0f}, off = {1.01f, -1.01f, 1.01f, -1.01f};
  EXPECT_DOUBLE_EQ(compare_values(off.data(), one.data(), 4, tol).calc_diff, calc_diff(off.data(), one.data(), 4));
}

TEST(OracleCompare, DecisionToleranceAndKeyOrder) {
  const DecisionTolerance d{0.01, 0.1};
  EXPECT_TRUE(d.accepts(1.0, 1.0));
  EXPECT_TRUE(d.accepts(1.0, 2.0));    // the engine's pick is better
  EXPECT_TRUE(d.accepts(1.0, 0.895));  // 0.105 <= 0.01 + 0.1
  EXPECT_FALSE(d.accepts(1.0, 0.88));
  EXPECT_FALSE(DecisionTolerance{}.accepts(1.0, 0.999));
  // On the decision's row scale: a gap near 0 (ReLU'd indexer scores) judged against the row's magnitude.
  EXPECT_TRUE(d.accepts(0.1, 0.0, 2.0));  // 0.1 <= 0.01 + 0.1 * 2
  EXPECT_FALSE(d.accepts(0.1, 0.0));      // pair scale 0.1: 0.1 > 0.01 + 0.01
  EXPECT_FALSE(d.accepts(0.5, 0.0, 2.0));
  EXPECT_FALSE(d.accepts(1.0, -std::numeric_limits<double>::infinity(), 1e300));
  EXPECT_FALSE(d.accepts(std::nan(""), 0.0, 1.0));

  const int64_t L = 5;
  const std::vector<std::string> ordered = {
      "input",
      "layers.0.attn_norm",
      "layers.0.ffn.out",
      "layers.1.attn_norm",
      "layers.1.attn.qr",
      "layers.1.attn.q",
      "layers.1.attn.kv",
      "layers.1.attn.indexer.compressor.kv",
      "layers.1.attn.indexer.q",
      "layers.1.attn.indexer.scores",
      "layers.1.attn.indexer.topk",
      "layers.1.attn.o",
      "layers.1.attn.out",
      "layers.1.ffn_norm",
      "layers.1.ffn.gate.scores",
      "layers.1.ffn.gate.experts",
      "layers.1.ffn.gate.weights",
      "layers.1.ffn.out",
      "layers.1.residual",
      "layers.2.attn.compressor.kv",
      "layers.4.residual",
      "mtp.0.attn_norm",
      "mtp.0.residual",
      "mtp.logits",
      "logits",
      "sample",
  };
  for (size_t i = 1; i < ordered.size(); ++i) {
    EXPECT_LT(key_order(ordered[i - 1], L), key_order(ordered[i], L)) << ordered[i - 1] << " vs " << ordered[i];
  }
  EXPECT_EQ(split_key("layers.12.attn.o"), (std::pair<std::string, std::string>{"layers.12", "attn.o"}));
  EXPECT_EQ(split_key("mtp.0.ffn.gate.experts"), (std::pair<std::string, std::string>{"mtp.0", "ffn.gate.experts"}));
  EXPECT_EQ(split_key("logits"), (std::pair<std::string, std::string>{"", "logits"}));
}

TEST_P(Oracle, CleanRunWithChunkedPrefillPasses) {
  FakeEngine engine;
  const std::vector<StepRecord> steps = run_both(engine, 3);
  const ReferenceOracle oracle = check_all(steps);
  EXPECT_TRUE(oracle.ok()) << oracle.table();
  EXPECT_FALSE(oracle.first_divergence().has_value());
  ASSERT_EQ(oracle.reports().size(), 2u);
  const RequestReport& a = *oracle.report(kA);
  const RequestReport& b = *oracle.report(kB);
  EXPECT_TRUE(a.ok());
  EXPECT_TRUE(b.ok());
  EXPECT_EQ(a.prompt_length, 24);
  EXPECT_EQ(a.steps_checked, 5);
  EXPECT_EQ(a.tokens_checked, 24 + 4);
  EXPECT_EQ(a.tokens_sampled, 5);
  EXPECT_EQ(b.steps_checked, 5);
  EXPECT_EQ(b.tokens_checked, 30 + 3);
  EXPECT_EQ(b.tokens_sampled, 4);  // the first chunk does not sample
  for (const RequestReport* r : {&a, &b}) {
    EXPECT_EQ(r->forced_decisions, 0);
    EXPECT_GT(r->values_checked, 100);
    EXPECT_GT(r->decisions_checked, 0);
    EXPECT_EQ(r->activations.max_calc_diff, 0.0);  // the same computation on both sides
    EXPECT_EQ(r->logits.max_abs, 0.0);
    EXPECT_TRUE(r->unchecked_keys.empty());
    // Under resync every block after the first and the head take the engine's residual.
    EXPECT_EQ(r->resynced_inputs, g_resync ? r->steps_checked * micro().config.n_layers : 0);
  }
  EXPECT_NE(oracle.table().find(" ok"), std::string::npos);
  EXPECT_EQ(oracle.table().find("DIVERGED"), std::string::npos);
}

TEST_P(Oracle, PerturbedActivationIsTheFirstDivergence) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 2);
  auto bump = [&](int64_t step, int64_t request, const std::string& key, float by) {
    StepRecord& s = steps[static_cast<size_t>(step)];
    const int64_t r = batch_row(s, request, s.rows[request == kA ? 0 : 1].start_pos);
    ref::Mat& m = s.values.at(key);
    for (int64_t c = 0; c < m.cols; ++c) m.at(r, c) += by;
  };
  bump(2, kB, "layers.2.attn.o", 10.0f);    // the first one in forward order of step 2
  bump(2, kA, "layers.4.ffn.out", 10.0f);   // same step, later layer
  bump(3, kA, "layers.0.attn_norm", 10.0f); // a later step
  const ReferenceOracle oracle = check_all(steps);
  EXPECT_FALSE(oracle.ok());
  const std::optional<Divergence> d = oracle.first_divergence();
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->step, 2);
  EXPECT_EQ(d->request_id, kB);
  EXPECT_EQ(d->key, "layers.2.attn.o");
  EXPECT_EQ(d->layer, "layers.2");
  EXPECT_EQ(d->op, "attn.o");
  EXPECT_NEAR(d->max_abs, 10.0, 0.1);
  EXPECT_GT(d->calc_diff, 1e-3);
  EXPECT_NE(d->detail.find("calc_diff"), std::string::npos) << d->detail;

  const RequestReport& a = *oracle.report(kA);
  ASSERT_TRUE(a.first_divergence.has_value());
  EXPECT_EQ(a.first_divergence->step, 2);
  EXPECT_EQ(a.first_divergence->key, "layers.4.ffn.out");
  EXPECT_EQ(a.steps_checked, 4);  // checking went on
  EXPECT_NE(oracle.table().find("DIVERGED step 2 layers.2.attn.o"), std::string::npos) << oracle.table();
}

TEST_P(Oracle, WidthAndMaskMismatchesAreNamed) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 1);
  ref::Mat& q = steps[2].values.at("layers.1.attn.q");
  q = ref::cols_of(q, 0, q.cols - 1);
  steps[1].values.at("layers.3.ffn_norm").at(batch_row(steps[1], kB, 20), 5) = std::nanf("");
  const ReferenceOracle oracle = check_all(steps);
  const RequestReport& a = *oracle.report(kA);
  const RequestReport& b = *oracle.report(kB);
  ASSERT_TRUE(b.first_divergence.has_value());
  EXPECT_EQ(b.first_divergence->step, 1);
  EXPECT_EQ(b.first_divergence->key, "layers.3.ffn_norm");
  EXPECT_NE(b.first_divergence->detail.find("mask"), std::string::npos) << b.first_divergence->detail;
  EXPECT_NE(b.first_divergence->detail.find("position 20"), std::string::npos) << b.first_divergence->detail;
  ASSERT_TRUE(a.first_divergence.has_value());
  EXPECT_EQ(a.first_divergence->step, 2);
  EXPECT_EQ(a.first_divergence->key, "layers.1.attn.q");
  EXPECT_NE(a.first_divergence->detail.find("width"), std::string::npos) << a.first_divergence->detail;
  EXPECT_EQ(oracle.first_divergence()->key, "layers.3.ffn_norm");
}

TEST_P(Oracle, ClearlyWorseIndexerChoiceIsAMismatch) {
  FakeEngine clean;
  const std::vector<StepRecord> ref_steps = run_both(clean, 1);
  const Swap sw = find_swap(ref_steps, true, [](double gap, double best) { return gap > best; });
  ASSERT_GT(sw.gap, 0.0);
  FakeEngine engine;
  engine.indexer_tweak = decide(sw);
  const ReferenceOracle oracle = check_all(run_both(engine, 1));
  const std::optional<Divergence> d = oracle.first_divergence();
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->step, sw.step);
  EXPECT_EQ(d->request_id, sw.request);
  EXPECT_EQ(d->key, decision_key(sw, true));
  EXPECT_NE(d->detail.find("position " + std::to_string(sw.pos)), std::string::npos) << d->detail;
  EXPECT_NE(d->detail.find("score gap"), std::string::npos) << d->detail;
  EXPECT_NEAR(d->max_abs, sw.gap, 1e-6);
  // The rejected choice was still forced: every value after it agrees exactly.
  EXPECT_EQ(oracle.report(sw.request)->activations.max_calc_diff, 0.0);
}

TEST_P(Oracle, IndexerNearTieIsAcceptedExactlyUpToTheTolerance) {
  FakeEngine clean;
  const std::vector<StepRecord> ref_steps = run_both(clean, 1);
  // The closest call with a positive gap: accepted just above it, rejected just below it.
  const Swap sw = find_swap(ref_steps, true, [](double gap, double best) {
    return gap > 0 && (best <= 0 || gap < best);
  });
  ASSERT_GT(sw.gap, 0.0);
  auto engine_steps = [&] {
    FakeEngine engine;
    engine.indexer_tweak = decide(sw);
    return run_both(engine, 1);
  }();
  OracleTolerances loose = base_tol();
  loose.indexer = DecisionTolerance{sw.gap * 1.01, 0.0};
  const ReferenceOracle accepted = check_all(engine_steps, loose);
  EXPECT_TRUE(accepted.ok()) << accepted.table();
  EXPECT_EQ(accepted.report(sw.request)->forced_decisions, 1);
  // The reference continued with the engine's choice: later values agree exactly.
  EXPECT_EQ(accepted.report(sw.request)->activations.max_calc_diff, 0.0);
  EXPECT_EQ(accepted.report(sw.request)->logits.max_abs, 0.0);

  OracleTolerances tight = base_tol();
  tight.indexer = DecisionTolerance{sw.gap * 0.99, 0.0};
  const ReferenceOracle rejected = check_all(engine_steps, tight);
  ASSERT_TRUE(rejected.first_divergence().has_value());
  EXPECT_EQ(rejected.first_divergence()->key, decision_key(sw, true));
  EXPECT_EQ(rejected.first_divergence()->step, sw.step);
  EXPECT_EQ(rejected.report(sw.request)->forced_decisions, 0);
}

TEST_P(Oracle, ExpertChoicesAreTieAwareOnScoreLayersAndExactOnHashLayers) {
  FakeEngine clean;
  const std::vector<StepRecord> ref_steps = run_both(clean, 1);

  const Swap worse = find_swap(ref_steps, false, [](double gap, double best) { return gap > best; });
  ASSERT_GT(worse.gap, 0.0);
  {
    FakeEngine engine;
    engine.experts_tweak = decide(worse);
    const ReferenceOracle oracle = check_all(run_both(engine, 1));
    ASSERT_TRUE(oracle.first_divergence().has_value());
    EXPECT_EQ(oracle.first_divergence()->key, decision_key(worse, false));
    EXPECT_EQ(oracle.first_divergence()->step, worse.step);
    EXPECT_EQ(oracle.report(worse.request)->activations.max_calc_diff, 0.0);
  }

  const Swap close = find_swap(ref_steps, false, [](double gap, double best) {
    return gap > 0 && (best <= 0 || gap < best);
  });
  ASSERT_GT(close.gap, 0.0);
  FakeEngine engine;
  engine.experts_tweak = decide(close);
  const std::vector<StepRecord> steps = run_both(engine, 1);
  OracleTolerances loose = base_tol();
  loose.experts = DecisionTolerance{close.gap * 1.01, 0.0};
  const ReferenceOracle accepted = check_all(steps, loose);
  EXPECT_TRUE(accepted.ok()) << accepted.table();
  EXPECT_EQ(accepted.report(close.request)->forced_decisions, 1);
  EXPECT_EQ(accepted.report(close.request)->activations.max_calc_diff, 0.0);
  OracleTolerances tight = base_tol();
  tight.experts = DecisionTolerance{close.gap * 0.99, 0.0};
  const ReferenceOracle rejected = check_all(steps, tight);
  ASSERT_TRUE(rejected.first_divergence().has_value());
  EXPECT_EQ(rejected.first_divergence()->key, decision_key(close, false));

  // A hash-routed layer is a table lookup: no tolerance makes a different set acceptable.
  // Request 7's token at position 26 (step 3) on hash layer 1 gets one expert off its table row.
  FakeEngine probe;
  const std::vector<StepRecord> probe_steps = run_both(probe, 2);
  const int64_t r = batch_row(probe_steps[3], kA, 26);
  ASSERT_GE(r, 0);
  const ref::Mat& chosen = probe_steps[3].values.at("layers.1.ffn.gate.experts");
  std::vector<int64_t> set;
  for (int64_t j = 0; j < chosen.cols; ++j) set.push_back(static_cast<int64_t>(chosen.at(r, j)));
  for (int64_t e = 0; e < micro().config.n_routed_experts; ++e) {
    if (std::find(set.begin(), set.end(), e) == set.end()) {
      set[0] = e;
      break;
    }
  }
  FakeEngine hashed;
  hashed.experts_tweak = [set](int64_t request, int64_t layer, int64_t pos) -> std::optional<std::vector<int64_t>> {
    if (request == kA && layer == 1 && pos == 26) return set;
    return std::nullopt;
  };
  OracleTolerances huge = base_tol();
  huge.experts = DecisionTolerance{1e9, 1e9};
  const ReferenceOracle oracle = check_all(run_both(hashed, 2), huge);
  ASSERT_TRUE(oracle.first_divergence().has_value());
  EXPECT_EQ(oracle.first_divergence()->key, "layers.1.ffn.gate.experts");
  EXPECT_EQ(oracle.first_divergence()->step, 3);
  EXPECT_NE(oracle.first_divergence()->detail.find("hash-routed"), std::string::npos);
}

TEST_P(Oracle, MalformedDecisionsAreMismatchesAndNotForced) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 1);
  // Request 7's prefill: position 23 sees 6 entries; name entry 9, which it cannot see.
  ref::Mat& topk = steps[0].values.at("layers.3.attn.indexer.topk");
  topk.at(batch_row(steps[0], kA, 23), 0) = 9.0f;
  // Request 9's decode: a repeated expert.
  ref::Mat& experts = steps[2].values.at("layers.4.ffn.gate.experts");
  const int64_t r = batch_row(steps[2], kB, 30);
  experts.at(r, 1) = experts.at(r, 0);
  const ReferenceOracle oracle = check_all(steps);
  const RequestReport& a = *oracle.report(kA);
  const RequestReport& b = *oracle.report(kB);
  ASSERT_TRUE(a.first_divergence.has_value());
  EXPECT_EQ(a.first_divergence->key, "layers.3.attn.indexer.topk");
  EXPECT_NE(a.first_divergence->detail.find("not visible"), std::string::npos) << a.first_divergence->detail;
  // Not forced: the reference kept its own choice, so the values after it still agree.
  EXPECT_EQ(a.activations.max_calc_diff, 0.0);
  ASSERT_TRUE(b.first_divergence.has_value());
  EXPECT_EQ(b.first_divergence->key, "layers.4.ffn.gate.experts");
  EXPECT_NE(b.first_divergence->detail.find("repeated"), std::string::npos) << b.first_divergence->detail;
}

TEST_P(Oracle, GreedyTokenIsTieAware) {
  // The engine samples its runner-up at step 2 for request 7 (and makes it its own argmax), then
  // feeds it: the reference continues with it.
  auto runner_up = [](int64_t request, int64_t step, std::vector<float>& logits, int32_t& sampled) {
    if (request != kA || step != 2) return;
    const int64_t a = std::max_element(logits.begin(), logits.end()) - logits.begin();
    int64_t b = a == 0 ? 1 : 0;
    for (int64_t i = 0; i < static_cast<int64_t>(logits.size()); ++i) {
      if (i != a && logits[static_cast<size_t>(i)] > logits[static_cast<size_t>(b)]) b = i;
    }
    logits[static_cast<size_t>(b)] = logits[static_cast<size_t>(a)];
    sampled = static_cast<int32_t>(b);
  };
  FakeEngine engine;
  engine.sample_tweak = runner_up;
  const std::vector<StepRecord> steps = run_both(engine, 3);
  // The engine's logits differ from the reference's in one element by the runner-up's gap; this
  // test is about the token, so the logits may differ freely.
  OracleTolerances huge = base_tol();
  huge.logits = ValueTolerance{0.0, 0.0, 2.0, std::numeric_limits<double>::infinity()};
  huge.greedy = DecisionTolerance{1e9, 0.0};
  const ReferenceOracle accepted = check_all(steps, huge);
  EXPECT_TRUE(accepted.ok()) << accepted.table();
  EXPECT_EQ(accepted.report(kA)->forced_decisions, 1);
  EXPECT_EQ(accepted.report(kA)->tokens_sampled, 5);

  OracleTolerances zero = huge;
  zero.greedy = DecisionTolerance{0.0, 0.0};
  const ReferenceOracle rejected = check_all(steps, zero);
  ASSERT_TRUE(rejected.first_divergence().has_value());
  EXPECT_EQ(rejected.first_divergence()->key, "sample");
  EXPECT_EQ(rejected.first_divergence()->step, 2);
  EXPECT_EQ(rejected.first_divergence()->request_id, kA);
  EXPECT_TRUE(rejected.report(kB)->ok());
}

TEST_P(Oracle, WrongSampledTokenIsAMismatch) {
  FakeEngine engine;
  engine.sample_tweak = [](int64_t request, int64_t step, std::vector<float>& logits, int32_t& sampled) {
    if (request == kB && step == 1) {
      sampled = static_cast<int32_t>(std::min_element(logits.begin(), logits.end()) - logits.begin());
    }
  };
  const ReferenceOracle oracle = check_all(run_both(engine, 2));
  const std::optional<Divergence> d = oracle.first_divergence();
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->key, "sample");
  EXPECT_EQ(d->op, "sample");
  EXPECT_EQ(d->step, 1);
  EXPECT_EQ(d->request_id, kB);
  EXPECT_TRUE(oracle.report(kA)->ok());
  EXPECT_EQ(oracle.report(kB)->steps_checked, 4);
  EXPECT_NE(oracle.table().find("DIVERGED step 1 sample"), std::string::npos) << oracle.table();
}

TEST_P(Oracle, ThreeChunkPrefillBesideDecodes) {
  FakeEngine engine;
  ReferenceOracle oracle(micro().config, micro().weights, kQuant, base_tol());
  engine.add(1, prompt_of(5, 40));
  engine.add(2, prompt_of(6, 8));
  oracle.add_request(1, prompt_of(5, 40));
  oracle.add_request(2, prompt_of(6, 8));
  oracle.check(engine.step({{2, 8}, {1, 16}}));
  oracle.check(engine.step({{2, 1}, {1, 16}}));
  oracle.check(engine.step({{1, 8}, {2, 1}}));
  oracle.check(engine.step({{2, 1}, {1, 1}}));
  EXPECT_TRUE(oracle.ok()) << oracle.table();
  EXPECT_EQ(oracle.report(1)->tokens_checked, 41);
  EXPECT_EQ(oracle.report(1)->tokens_sampled, 2);
  EXPECT_EQ(oracle.report(2)->tokens_checked, 11);
  EXPECT_EQ(oracle.report(2)->tokens_sampled, 4);
}

TEST_P(Oracle, UnprobedDecisionsAreNotForced) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 1);
  for (StepRecord& s : steps) {
    for (auto it = s.values.begin(); it != s.values.end();) {
      const std::string op = split_key(it->first).second;
      it = op == "attn.indexer.topk" || op == "ffn.gate.experts" ? s.values.erase(it) : std::next(it);
    }
  }
  const ReferenceOracle oracle = check_all(steps);
  EXPECT_TRUE(oracle.ok()) << oracle.table();
  EXPECT_EQ(oracle.report(kA)->decisions_checked, oracle.report(kA)->tokens_sampled);  // greedy only
}

TEST_P(Oracle, RowsMustContinueTheirRequest) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 2);
  steps.erase(steps.begin() + 2);  // request 7 and 9 skip a decode
  const ReferenceOracle oracle = check_all(steps);
  ASSERT_TRUE(oracle.first_divergence().has_value());
  EXPECT_EQ(oracle.first_divergence()->key, "input");
  EXPECT_EQ(oracle.first_divergence()->step, 3);
  EXPECT_NE(oracle.first_divergence()->detail.find("does not continue"), std::string::npos);
  EXPECT_TRUE(oracle.report(kA)->stopped);
}

TEST_P(Oracle, AbortedRequestsKeepTheirReport) {
  FakeEngine engine;
  add_both(engine, nullptr);
  ReferenceOracle oracle(micro().config, micro().weights, kQuant, base_tol());
  oracle.add_request(kA, prompt_of(1, 24));
  oracle.add_request(kB, prompt_of(2, 30));
  oracle.check(engine.step({{kA, 24}, {kB, 16}}));
  oracle.abort_request(kB);
  oracle.check(engine.step({{kA, 1}}));
  EXPECT_TRUE(oracle.ok());
  EXPECT_TRUE(oracle.report(kB)->aborted);
  EXPECT_EQ(oracle.report(kB)->tokens_checked, 16);
  EXPECT_NE(oracle.table().find("(aborted)"), std::string::npos);
  oracle.check(engine.step({{kA, 1}, {kB, 14}}));  // an aborted request must not run
  ASSERT_TRUE(oracle.first_divergence().has_value());
  EXPECT_EQ(oracle.first_divergence()->request_id, kB);
  EXPECT_EQ(oracle.first_divergence()->key, "input");
  EXPECT_THROW(oracle.check(StepRecord{3, serving::ForwardMode::decode, false, {StepRow{42}}, {}}), ContractError);
}

TEST_P(Oracle, MtpBlockIsReplayedWhenProbed) {
  FakeEngine engine;
  engine.mtp = true;
  std::vector<StepRecord> steps = run_both(engine, 2);
  ASSERT_EQ(steps[0].values.count("mtp.0.ffn.out"), 1u);
  {
    const ReferenceOracle oracle = check_all(steps);
    EXPECT_TRUE(oracle.ok()) << oracle.table();
    EXPECT_TRUE(oracle.report(kA)->unchecked_keys.empty());
    // Request 9's first chunk does not sample: its MTP block drafts from the next prompt token, and
    // the oracle follows it there too.
    EXPECT_TRUE(oracle.report(kB)->unchecked_keys.empty());
  }
  ref::Mat& out = steps[3].values.at("mtp.0.ffn.out");
  const int64_t r = batch_row(steps[3], kA, 26);
  for (int64_t c = 0; c < out.cols; ++c) out.at(r, c) += 5.0f;
  const ReferenceOracle oracle = check_all(steps);
  ASSERT_TRUE(oracle.first_divergence().has_value());
  EXPECT_EQ(oracle.first_divergence()->key, "mtp.0.ffn.out");
  EXPECT_EQ(oracle.first_divergence()->layer, "mtp.0");
  EXPECT_EQ(oracle.first_divergence()->step, 3);
}

// One bf16 ulp away from zero (v holds a finite bf16 value).
float bf16_ulp_up(float v) { return std::bit_cast<float>(std::bit_cast<uint32_t>(v) + 0x10000u); }

TEST_P(Oracle, UlpNoiseInOneResidualStaysLocalUnderResync) {
  // The engine's layer-1 residual of request 9 is one bf16 ulp larger in magnitude in every element,
  // in every step: its later blocks, its caches and its head run on it (accumulation-order noise).
  FakeEngine engine;
  engine.residual_tweak = [](int64_t request, int64_t layer, int64_t, ref::Mat& R) {
    if (request != kB || layer != 1) return false;
    for (float& v : R.data) v = bf16_ulp_up(v);
    return true;
  };
  const std::vector<StepRecord> steps = run_both(engine, 2);
  // Exact everywhere but at the residual itself: any difference past layer 1 fails.
  constexpr double kInf = std::numeric_limits<double>::infinity();
  OracleTolerances tol = base_tol();
  tol.activations = ValueTolerance{0.0, 0.0, 1e-12, kInf};
  tol.logits = ValueTolerance{0.0, 0.0, 1e-12, kInf};
  tol.op_overrides = {{"residual", ValueTolerance{1.0 / 32, 1.0 / 64, 1e-3, 16.0}}};
  tol.indexer = tol.experts = tol.greedy = DecisionTolerance{0.0, 0.0};
  const ReferenceOracle oracle = check_all(steps, tol);
  const RequestReport& b = *oracle.report(kB);
  EXPECT_TRUE(oracle.report(kA)->ok());
  ASSERT_GT(b.ops.count("residual"), 0u);
  EXPECT_GT(b.ops.at("residual").max_calc_diff, 0.0);  // the ulp itself is seen, and passes
  if (g_resync) {
    // Layers 2.. and the head are compared against the reference run on the engine's residual.
    EXPECT_TRUE(oracle.ok()) << oracle.table();
    EXPECT_LT(b.ops.at("residual").max_calc_diff, 1e-4);
    for (const auto& [op, e] : b.ops) {
      if (op != "residual") {
        EXPECT_EQ(e.max_calc_diff, 0.0) << op;
      }
    }
    EXPECT_EQ(b.logits.max_abs, 0.0);
    EXPECT_EQ(b.forced_decisions, 0);
  } else {
    // The chained reference blames the harmless ulp on the next layer.
    ASSERT_TRUE(b.first_divergence.has_value());
    EXPECT_EQ(b.first_divergence->layer, "layers.2") << b.first_divergence->summary();
    EXPECT_GT(b.logits.max_abs, 0.0);
  }
}

TEST_P(Oracle, WrongAttentionOutputIsNamedAtItsLayer) {
  // Request 9's decode at position 30 (step 2): the engine's layer-2 attention output is wrong, and
  // so is the residual it feeds (half of it negated, still bf16) to layers 3 and 4, the head and the
  // caches of later steps.
  FakeEngine engine;
  engine.residual_tweak = [](int64_t request, int64_t layer, int64_t start_pos, ref::Mat& R) {
    if (request != kB || layer != 2 || start_pos != 30) return false;
    for (int64_t c = 0; c < R.cols / 2; ++c) R.at(0, c) = -R.at(0, c);
    return true;
  };
  std::vector<StepRecord> steps = run_both(engine, 2);
  ref::Mat& o = steps[2].values.at("layers.2.attn.o");
  const int64_t r = batch_row(steps[2], kB, 30);
  for (int64_t c = 0; c < o.cols; ++c) o.at(r, c) += 10.0f;
  const ReferenceOracle oracle = check_all(steps);
  ASSERT_TRUE(oracle.first_divergence().has_value());
  EXPECT_EQ(oracle.first_divergence()->key, "layers.2.attn.o");
  EXPECT_EQ(oracle.first_divergence()->step, 2);
  EXPECT_EQ(oracle.first_divergence()->request_id, kB);
  const RequestReport& b = *oracle.report(kB);
  ASSERT_TRUE(b.first_divergence.has_value());
  EXPECT_EQ(b.first_divergence->key, "layers.2.attn.o");
  EXPECT_TRUE(oracle.report(kA)->ok());
  if (g_resync) {
    // Only the wrong values differ: layers 3 and 4 and the head ran on the engine's residual.
    for (const auto& [op, e] : b.ops) {
      if (op != "attn.o" && op != "residual") {
        EXPECT_EQ(e.max_calc_diff, 0.0) << op;
      }
    }
    EXPECT_EQ(b.logits.max_abs, 0.0);
  }
}

TEST_P(Oracle, UnprobedResidualsLeaveTheReferenceItsOwn) {
  FakeEngine engine;
  std::vector<StepRecord> steps = run_both(engine, 1);
  for (StepRecord& s : steps) s.values.erase("layers.1.residual");
  steps[1].values.at("layers.3.residual").at(0, 0) = std::nanf("");  // request 7's decode row: not used
  const ReferenceOracle oracle = check_all(steps);
  const RequestReport& a = *oracle.report(kA);
  const RequestReport& b = *oracle.report(kB);
  ASSERT_TRUE(a.first_divergence.has_value());
  EXPECT_EQ(a.first_divergence->key, "layers.3.residual");
  EXPECT_NE(a.first_divergence->detail.find("mask"), std::string::npos) << a.first_divergence->detail;
  EXPECT_TRUE(b.ok()) << oracle.table();
  EXPECT_EQ(a.activations.max_calc_diff, 0.0);
  const int64_t n = micro().config.n_layers;
  EXPECT_EQ(a.resynced_inputs, g_resync ? a.steps_checked * (n - 1) - 1 : 0);
  EXPECT_EQ(b.resynced_inputs, g_resync ? b.steps_checked * (n - 1) : 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, Oracle, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& p) { return p.param ? "Resync" : "Chained"; });

}  // namespace
}  // namespace dsv4::engine
