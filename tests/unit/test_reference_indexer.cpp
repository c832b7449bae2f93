// The reference lightning indexer (dsv4-model §2.5): visibility floor((p+1)/4), top-k that takes
// every candidate when there are few and the best k otherwise, the score formula, forcing, and
// prefill / decode equivalence.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "reference/context.h"
#include "reference/indexer.h"
#include "reference/quant.h"
#include "reference/rope.h"
#include "reference/weights.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::ref {
namespace {

using Selection = std::vector<std::vector<int64_t>>;

using testing::make_input;
using testing::Model;

const Model& tiny() {
  static const Model s("tiny", 11);
  return s;
}

const Model& micro() {
  static const Model s("micro", 11);
  return s;
}

// Layer 1 is the first c4 layer of both presets.
Indexer make(const Model& s) { return Indexer(s.config, s.weights, "layers.1.attn.indexer", make_rope_table(s.config, 4)); }

struct Inputs {
  Mat x, qr;
};

Inputs make_inputs(const ModelConfig& c, int64_t n, uint64_t seed, Mode mode) {
  return {make_input(n, c.dim, seed, mode), make_input(n, c.q_lora_rank, seed + 100, mode)};
}

// Runs the indexer in calls of the given sizes (the last one takes the rest).
Selection run_chunks(Indexer& idx, const Context& ctx, const Inputs& in, const std::vector<int64_t>& sizes) {
  Selection all;
  int64_t pos = 0;
  size_t i = 0;
  while (pos < in.x.rows) {
    const int64_t n = i < sizes.size() ? std::min(sizes[i++], in.x.rows - pos) : in.x.rows - pos;
    const Selection part = idx.forward(ctx, rows_of(in.x, pos, n), rows_of(in.qr, pos, n), pos, 1);
    all.insert(all.end(), part.begin(), part.end());
    pos += n;
  }
  return all;
}

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

// With no more candidates than index_topk, every visible entry is selected; visibility is floor((p+1)/4),
// so the entry a token completes is already selected by that token.
TEST(ReferenceIndexer, FewCandidatesTakesEveryVisibleEntry) {
  for (const Model* s : {&micro(), &tiny()}) {
    const ModelConfig& c = s->config;
    for (Mode mode : {Mode::exact, Mode::quant_sim}) {
      const Context ctx{c, Numerics{mode}, nullptr, nullptr};
      Indexer idx = make(*s);
      const int64_t n = 4 * c.index_topk + 3;  // the last token sees exactly index_topk entries
      const Selection sel = run_chunks(idx, ctx, make_inputs(c, n, 1, mode), {n});
      ASSERT_EQ(static_cast<int64_t>(sel.size()), n);
      for (int64_t p = 0; p < n; ++p) {
        EXPECT_EQ(sel[static_cast<size_t>(p)], iota((p + 1) / 4)) << c.source << " position " << p;
      }
      EXPECT_EQ(idx.n_keys(), n / 4);
    }
  }
}

// Token by token: the key cache grows in the step of the token that completes an entry, and that
// token already selects it.
TEST(ReferenceIndexer, EntryVisibleToTheTokenThatCompletesIt) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Context ctx{c, Numerics{Mode::quant_sim}, nullptr, nullptr};
  Indexer idx = make(s);
  const Inputs in = make_inputs(c, 12, 2, Mode::quant_sim);
  for (int64_t p = 0; p < 12; ++p) {
    const Selection sel = idx.forward(ctx, rows_of(in.x, p, 1), rows_of(in.qr, p, 1), p, 1);
    ASSERT_EQ(sel.size(), 1u);
    EXPECT_EQ(idx.n_keys(), (p + 1) / 4) << "position " << p;
    EXPECT_EQ(sel[0], iota((p + 1) / 4)) << "position " << p;
  }
}

// With more candidates than index_topk: exactly index_topk entries, all visible, and none of the
// unselected ones scores higher (ties going to the lower index). Checked against the recorded scores,
// which are themselves checked against the formula from the recorded q, weights and keys.
TEST(ReferenceIndexer, ManyCandidatesTakesTheBestK) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const std::string prefix = "layers.1.attn.indexer";
  for (Mode mode : {Mode::exact, Mode::quant_sim}) {
    Trace trace;
    const Context ctx{c, Numerics{mode}, &trace, nullptr};
    Indexer idx = make(s);
    const int64_t n = 70;
    const Selection sel = run_chunks(idx, ctx, make_inputs(c, n, 3, mode), {n});
    const Mat& scores = trace.values.at(prefix + ".scores");
    const Mat& topk = trace.values.at(prefix + ".topk");
    const Mat& q = trace.values.at(prefix + ".q");
    const Mat& w = trace.values.at(prefix + ".weights");
    ASSERT_EQ(scores.rows, n);
    ASSERT_EQ(scores.cols, n / 4);
    ASSERT_EQ(topk.cols, c.index_topk);
    ASSERT_EQ(q.cols, c.index_n_heads * c.index_head_dim);
    ASSERT_EQ(w.cols, c.index_n_heads);
    int64_t binding = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t visible = (p + 1) / 4;
      const std::vector<int64_t>& pick = sel[static_cast<size_t>(p)];
      ASSERT_EQ(static_cast<int64_t>(pick.size()), std::min(c.index_topk, visible)) << "position " << p;
      ASSERT_TRUE(std::is_sorted(pick.begin(), pick.end()));
      ASSERT_EQ(std::adjacent_find(pick.begin(), pick.end()), pick.end());
      for (int64_t e = 0; e < n / 4; ++e) {
        if (e >= visible) {
          EXPECT_TRUE(std::isinf(scores.at(p, e)) && scores.at(p, e) < 0) << "position " << p << " entry " << e;
          continue;
        }
        // I(p, e) = Σ_h w_h ReLU(q_h · k_e); quant-sim rounds the dot, the product and the sum to bf16.
        double want = 0.0;
        for (int64_t h = 0; h < c.index_n_heads; ++h) {
          double d = 0.0;
          for (int64_t i = 0; i < c.index_head_dim; ++i) {
            d += static_cast<double>(q.at(p, h * c.index_head_dim + i)) * idx.keys().at(e, i);
          }
          want += w.at(p, h) * std::max(d, 0.0);
        }
        const double tol = mode == Mode::exact ? 1e-5 * (1.0 + std::fabs(want)) : 3e-2 * (1.0 + std::fabs(want));
        EXPECT_NEAR(scores.at(p, e), want, tol) << "position " << p << " entry " << e;
      }
      for (int64_t i = 0; i < c.index_topk; ++i) {
        const float want = i < static_cast<int64_t>(pick.size()) ? static_cast<float>(pick[static_cast<size_t>(i)]) : -1.0f;
        EXPECT_EQ(topk.at(p, i), want) << "position " << p;
      }
      if (visible <= c.index_topk) continue;
      ++binding;
      for (int64_t e = 0; e < visible; ++e) {
        if (std::binary_search(pick.begin(), pick.end(), e)) continue;
        for (int64_t chosen : pick) {
          const float sc = scores.at(p, chosen), se = scores.at(p, e);
          EXPECT_TRUE(sc > se || (sc == se && chosen < e))
              << "position " << p << ": entry " << e << " (" << se << ") beats selected " << chosen << " (" << sc << ")";
        }
      }
    }
    EXPECT_GT(binding, 40);
  }
}

// Equal scores go to the lower index: with zero query weights every score ties at 0.
TEST(ReferenceIndexer, TiesGoToTheLowerIndex) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  Indexer idx = make(s);
  Inputs in = make_inputs(c, 40, 4, Mode::exact);
  std::fill(in.qr.data.begin(), in.qr.data.end(), 0.0f);  // q = 0: every score is exactly 0
  const Selection sel = run_chunks(idx, ctx, in, {40});
  for (int64_t p = 0; p < 40; ++p) {
    EXPECT_EQ(sel[static_cast<size_t>(p)], iota(std::min(c.index_topk, (p + 1) / 4))) << "position " << p;
  }
}

// The forced selection replaces the indexer's own for the (layer, position) it names, sorted; every
// other position keeps the indexer's choice.
TEST(ReferenceIndexer, ForcingOverridesTheSelection) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Inputs in = make_inputs(c, 40, 5, Mode::quant_sim);
  Indexer plain = make(s);
  const Selection own = run_chunks(plain, Context{c, Numerics{Mode::quant_sim}, nullptr, nullptr}, in, {40});

  Forcing forcing;
  forcing.indexer_topk = [](int64_t layer, int64_t position) -> std::optional<std::vector<int64_t>> {
    if (layer == 1 && position == 30) return std::vector<int64_t>{6, 0, 3};
    if (layer == 1 && position == 35) return std::vector<int64_t>{};
    if (layer != 1) return std::vector<int64_t>{0};  // never asked: the indexer runs for layer 1
    return std::nullopt;
  };
  Trace trace;
  const Context ctx{c, Numerics{Mode::quant_sim}, &trace, &forcing};
  Indexer forced = make(s);
  const Selection sel = run_chunks(forced, ctx, in, {29, 1, 1, 4, 1});
  for (int64_t p = 0; p < 40; ++p) {
    if (p == 30) {
      EXPECT_EQ(sel[30], (std::vector<int64_t>{0, 3, 6}));
    } else if (p == 35) {
      EXPECT_TRUE(sel[35].empty());
    } else {
      EXPECT_EQ(sel[static_cast<size_t>(p)], own[static_cast<size_t>(p)]) << "position " << p;
    }
  }
  const Mat& topk = trace.values.at("layers.1.attn.indexer.topk");  // the last call: positions 36..39
  ASSERT_EQ(topk.rows, 4);
  for (int64_t i = 0; i < c.index_topk; ++i) EXPECT_EQ(topk.at(3, i), static_cast<float>(sel[39][static_cast<size_t>(i)]));
}

TEST(ReferenceIndexerDeathTest, ForcingMustNameDistinctVisibleEntries) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Inputs in = make_inputs(c, 8, 6, Mode::exact);
  for (std::vector<int64_t> bad : {std::vector<int64_t>{0, 2}, std::vector<int64_t>{1, 1}, std::vector<int64_t>{-1}}) {
    Forcing forcing;
    forcing.indexer_topk = [bad](int64_t, int64_t position) -> std::optional<std::vector<int64_t>> {
      if (position == 7) return bad;  // two entries are visible at position 7
      return std::nullopt;
    };
    const Context ctx{c, Numerics{Mode::exact}, nullptr, &forcing};
    Indexer idx = make(s);
    EXPECT_DEATH(run_chunks(idx, ctx, in, {8}), "forced selection");
  }
}

// Prefill then decode, and any chunking, select exactly what one prefill selects (the scores are
// computed per token from the same keys), across c4 boundaries and past the top-k binding point.
TEST(ReferenceIndexer, PrefillDecodeAndChunksEqualOnePrefill) {
  for (const Model* s : {&micro(), &tiny()}) {
    const ModelConfig& c = s->config;
    const int64_t n = s == &micro() ? 60 : 266;  // tiny: top-k binds from position 259
    for (Mode mode : {Mode::exact, Mode::quant_sim}) {
      Trace trace;
      const Context ctx{c, Numerics{mode}, &trace, nullptr};
      const Inputs in = make_inputs(c, n, 7, mode);
      Indexer idx = make(*s);
      const Selection whole = run_chunks(idx, ctx, in, {n});
      const Mat whole_scores = trace.values.at("layers.1.attn.indexer.scores");
      const std::vector<std::vector<int64_t>> plans = {
          {1, 1, 1, 1, 1, 1},        {3, 1, 1, 1, 1},           {4, 1, 1, 1},
          {n - 8, 1, 1, 1, 1, 1, 1}, {7, 5, 1, 19, 2, 1, 33, 4}, {n - 1, 1}};
      for (const std::vector<int64_t>& plan : plans) {
        idx.reset();
        EXPECT_EQ(run_chunks(idx, ctx, in, plan), whole) << c.source << " plan starting " << plan[0];
      }
      // The last decode step's scores equal the last row of the prefill's, bitwise.
      const Mat& last = trace.values.at("layers.1.attn.indexer.scores");
      ASSERT_EQ(last.rows, 1);
      ASSERT_EQ(last.cols, whole_scores.cols);
      for (int64_t e = 0; e < last.cols; ++e) ASSERT_EQ(last.at(0, e), whole_scores.at(n - 1, e)) << "entry " << e;
    }
  }
}

// A reused indexer after reset() equals a fresh one (its key cache and its compressor both restart).
TEST(ReferenceIndexer, ResetMakesReusedEqualFresh) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Context ctx{c, Numerics{Mode::quant_sim}, nullptr, nullptr};
  Indexer reused = make(s);
  run_chunks(reused, ctx, make_inputs(c, 31, 8, Mode::quant_sim), {31});
  reused.reset();
  EXPECT_EQ(reused.n_keys(), 0);
  Indexer fresh = make(s);
  const Inputs in = make_inputs(c, 30, 9, Mode::quant_sim);
  const std::vector<int64_t> plan = {2, 1, 1, 1, 1};
  EXPECT_EQ(run_chunks(reused, ctx, in, plan), run_chunks(fresh, ctx, in, plan));
  ASSERT_EQ(reused.keys().data, fresh.keys().data);
}

// The quant-sim queries and keys are FP4 values times a power of two per fp4 block (e2m1: at most
// 2 significant bits).
TEST(ReferenceIndexer, QuantSimQueriesAndKeysAreFp4) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  Trace trace;
  const Context ctx{c, Numerics{Mode::quant_sim}, &trace, nullptr};
  Indexer idx = make(s);
  run_chunks(idx, ctx, make_inputs(c, 16, 10, Mode::quant_sim), {16});
  auto two_bits = [](float v) {
    int e = 0;
    const float m = std::frexp(std::fabs(v), &e);
    return std::ldexp(m, 2) == std::round(std::ldexp(m, 2));
  };
  const Mat& q = trace.values.at("layers.1.attn.indexer.q");
  for (float v : q.data) ASSERT_TRUE(two_bits(v)) << v;
  for (float v : idx.keys().data) ASSERT_TRUE(two_bits(v)) << v;
}

}  // namespace
}  // namespace dsv4::ref
