// The reference KV compressor (dsv4-model §2.4): the pooling formula, when entries are emitted, the
// missing overlap of c4 block 0, prefill / decode / chunking equivalence, and the per-sequence reset.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/quant.h"
#include "reference/rope.h"
#include "reference/weights.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::ref {
namespace {

using testing::make_input;
using testing::Model;

const Model& tiny() {
  static const Model s("tiny", 7);
  return s;
}

const Model& micro() {
  static const Model s("micro", 7);
  return s;
}

// The compressors of a tiny / micro model: layer 1 is c4 (attention and indexer), layer 2 the
// non-overlapping ratio.
struct Which {
  const Model* setup;
  int64_t layer;
  bool indexer;
};

Compressor make(const Which& w) {
  const ModelConfig& c = w.setup->config;
  const int64_t ratio = c.ratio(w.layer);
  const std::string prefix = "layers." + std::to_string(w.layer) + ".attn." + (w.indexer ? "indexer." : "") + "compressor";
  return Compressor(c, w.setup->weights, prefix, ratio, w.indexer ? c.index_head_dim : c.head_dim, w.indexer,
                    make_rope_table(c, ratio));
}

// Runs x through `comp` in calls of the given sizes (the last one takes the rest) and returns every
// emitted entry, checking that the calls return consecutive blocks.
Mat run_chunks(Compressor& comp, const Context& ctx, const Mat& x, const std::vector<int64_t>& sizes) {
  Mat all(0, comp.head_dim());
  int64_t pos = 0;
  size_t i = 0;
  while (pos < x.rows) {
    const int64_t n = i < sizes.size() ? std::min(sizes[i++], x.rows - pos) : x.rows - pos;
    const Compressor::Output out = comp.forward(ctx, rows_of(x, pos, n), pos);
    EXPECT_EQ(out.first_block, all.rows);
    all.data.insert(all.data.end(), out.entries.data.begin(), out.entries.data.end());
    all.rows += out.entries.rows;
    pos += n;
  }
  return all;
}

void expect_bitwise_equal(const Mat& a, const Mat& b, const std::string& what) {
  ASSERT_EQ(a.rows, b.rows) << what;
  ASSERT_EQ(a.cols, b.cols) << what;
  for (int64_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a.data[static_cast<size_t>(i)], b.data[static_cast<size_t>(i)]) << what << " at element " << i;
  }
}

// The compressed entry of block b recomputed straight from the formulas of §2.4 (exact mode, in
// double): the per-channel softmax pool of the recorded rows, RMSNorm, rope at b*ratio. With ratio 4
// the A halves of tokens a_first .. a_first+3 join the pool (none when a_first < 0); the formula has
// a_first = (b-1)*4, and none for block 0.
std::vector<double> expected_entry(const ModelConfig& c, const Weights& w, const std::string& prefix, int64_t ratio,
                                   int64_t hd, const Mat& kv, const Mat& score, int64_t b, int64_t a_first) {
  const bool overlap = ratio == 4;
  std::vector<double> pooled(static_cast<size_t>(hd));
  for (int64_t j = 0; j < hd; ++j) {
    std::vector<double> s, v;
    for (int64_t t = b * ratio; t < (b + 1) * ratio; ++t) {  // own rows: B half when overlapping
      s.push_back(score.at(t, overlap ? hd + j : j));
      v.push_back(kv.at(t, overlap ? hd + j : j));
    }
    if (overlap && a_first >= 0) {
      for (int64_t t = a_first; t < a_first + ratio; ++t) {  // the overlap rows: A half
        s.push_back(score.at(t, j));
        v.push_back(kv.at(t, j));
      }
    }
    double m = -INFINITY, den = 0.0, num = 0.0;
    for (double x : s) m = std::max(m, x);
    for (size_t i = 0; i < s.size(); ++i) {
      den += std::exp(s[i] - m);
      num += std::exp(s[i] - m) * v[i];
    }
    pooled[static_cast<size_t>(j)] = num / den;
  }
  double ms = 0.0;
  for (double x : pooled) ms += x * x;
  const double inv_rms = 1.0 / std::sqrt(ms / static_cast<double>(hd) + c.norm_eps);
  const Mat& nw = w.get(prefix + ".norm.weight");
  for (int64_t j = 0; j < hd; ++j) pooled[static_cast<size_t>(j)] *= inv_rms * nw.data[static_cast<size_t>(j)];
  const RopeTable rope = make_rope_table(c, ratio);
  const int64_t rd = c.rope_head_dim;
  for (int64_t k = 0; k < rd / 2; ++k) {
    const double angle = static_cast<double>(static_cast<float>(b * ratio) * rope.freqs[static_cast<size_t>(k)]);
    double& re = pooled[static_cast<size_t>(hd - rd + 2 * k)];
    double& im = pooled[static_cast<size_t>(hd - rd + 2 * k + 1)];
    const double a = re, bb = im;
    re = a * std::cos(angle) - bb * std::sin(angle);
    im = a * std::sin(angle) + bb * std::cos(angle);
  }
  return pooled;
}

double max_abs_diff(const float* got, const std::vector<double>& want) {
  double d = 0.0;
  for (size_t i = 0; i < want.size(); ++i) d = std::max(d, std::fabs(static_cast<double>(got[i]) - want[i]));
  return d;
}

TEST(ReferenceCompressor, PoolingMatchesFormulaC4) {
  const Model& s = tiny();
  const ModelConfig& c = s.config;
  Trace trace;
  const Context ctx{c, Numerics{Mode::exact}, &trace, nullptr};
  Compressor comp = make({&s, 1, false});
  const std::string prefix = "layers.1.attn.compressor";
  const Mat x = make_input(12, c.dim, 1, Mode::exact);
  const Compressor::Output out = comp.forward(ctx, x, 0);
  ASSERT_EQ(out.entries.rows, 3);

  // The recorded rows are the fp32 projections, the score carrying ape[t mod 4].
  const Mat& kv = trace.values.at(prefix + ".kv");
  const Mat& score = trace.values.at(prefix + ".score");
  ASSERT_EQ(kv.rows, 12);
  ASSERT_EQ(kv.cols, 2 * c.head_dim);
  const Mat& wgate = s.weights.get(prefix + ".wgate.weight");
  const Mat& ape = s.weights.get(prefix + ".ape");
  for (int64_t t : {0, 5, 11}) {
    for (int64_t ch : {int64_t{0}, c.head_dim + 3}) {
      double g = 0.0;
      for (int64_t k = 0; k < c.dim; ++k) g += static_cast<double>(wgate.at(ch, k)) * x.at(t, k);
      EXPECT_NEAR(score.at(t, ch), g + ape.at(t % 4, ch), 1e-5) << "t " << t << " channel " << ch;
    }
  }
  for (int64_t b = 0; b < 3; ++b) {
    const std::vector<double> want = expected_entry(c, s.weights, prefix, 4, c.head_dim, kv, score, b, b > 0 ? 4 * (b - 1) : -1);
    EXPECT_LT(max_abs_diff(out.entries.row(b), want), 2e-5) << "block " << b;
  }
  EXPECT_EQ(trace.values.at(prefix + ".entries").rows, 3);
}

TEST(ReferenceCompressor, PoolingMatchesFormulaNonOverlapping) {
  for (const Model* s : {&tiny(), &micro()}) {
    const ModelConfig& c = s->config;
    const int64_t r = c.ratio(2);
    Trace trace;
    const Context ctx{c, Numerics{Mode::exact}, &trace, nullptr};
    Compressor comp = make({s, 2, false});
    const std::string prefix = "layers.2.attn.compressor";
    const Compressor::Output out = comp.forward(ctx, make_input(2 * r + 3, c.dim, 2, Mode::exact), 0);
    ASSERT_EQ(out.entries.rows, 2) << c.source;
    const Mat& kv = trace.values.at(prefix + ".kv");
    const Mat& score = trace.values.at(prefix + ".score");
    for (int64_t b = 0; b < 2; ++b) {
      const std::vector<double> want = expected_entry(c, s->weights, prefix, r, c.head_dim, kv, score, b, -1);
      EXPECT_LT(max_abs_diff(out.entries.row(b), want), 2e-5) << c.source << " block " << b;
    }
  }
}

// Block 0 has no previous block: its A rows are empty (kv 0, score -inf), so it pools only the B
// halves of tokens 0..3 and the A halves of those tokens feed block 1 only.
TEST(ReferenceCompressor, C4BlockZeroHasNoOverlapRows) {
  const Model& s = tiny();
  const ModelConfig& c = s.config;
  Trace trace;
  const Context ctx{c, Numerics{Mode::exact}, &trace, nullptr};
  const std::string prefix = "layers.1.attn.compressor";
  Compressor comp = make({&s, 1, false});
  const Mat x = make_input(8, c.dim, 3, Mode::exact);
  const Mat entries = comp.forward(ctx, x, 0).entries;
  const Mat kv = trace.values.at(prefix + ".kv");
  const Mat score = trace.values.at(prefix + ".score");

  const std::vector<double> b_only = expected_entry(c, s.weights, prefix, 4, c.head_dim, kv, score, 0, -1);
  EXPECT_LT(max_abs_diff(entries.row(0), b_only), 2e-5);
  // Had block 0 pooled its own tokens' A halves as overlap rows, it would differ by far more.
  const std::vector<double> with_a = expected_entry(c, s.weights, prefix, 4, c.head_dim, kv, score, 0, 0);
  EXPECT_GT(max_abs_diff(entries.row(0), with_a), 1e-3);

  // Changing token 0's input changes block 0 (via its B half) and block 1 (via its A half); changing
  // token 4 changes block 1 only.
  Compressor other = make({&s, 1, false});
  Mat x0 = x;
  for (int64_t k = 0; k < c.dim; ++k) x0.at(0, k) = -x0.at(0, k);
  const Mat e0 = other.forward(ctx, x0, 0).entries;
  EXPECT_NE(e0.at(0, 0), entries.at(0, 0));
  EXPECT_NE(e0.at(1, 0), entries.at(1, 0));
  other.reset();
  Mat x4 = x;
  for (int64_t k = 0; k < c.dim; ++k) x4.at(4, k) = -x4.at(4, k);
  const Mat e4 = other.forward(ctx, x4, 0).entries;
  for (int64_t j = 0; j < c.head_dim; ++j) ASSERT_EQ(e4.at(0, j), entries.at(0, j)) << "dim " << j;
  EXPECT_NE(e4.at(1, 0), entries.at(1, 0));
}

// Entry b appears exactly in the call that processes token b*r + r - 1, decode or prefill.
TEST(ReferenceCompressor, EntryEmittedByTheTokenThatCompletesIt) {
  for (const Which& w : {Which{&tiny(), 1, false}, Which{&tiny(), 1, true}, Which{&micro(), 2, false}}) {
    const ModelConfig& c = w.setup->config;
    const int64_t r = c.ratio(w.layer);
    const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
    Compressor comp = make(w);
    const Mat x = make_input(3 * r + 2, c.dim, 4, Mode::exact);
    for (int64_t p = 0; p < x.rows; ++p) {
      const Compressor::Output out = comp.forward(ctx, rows_of(x, p, 1), p);
      const bool completes = (p + 1) % r == 0;
      EXPECT_EQ(out.entries.rows, completes ? 1 : 0) << "ratio " << r << " position " << p;
      EXPECT_EQ(out.first_block, p / r) << "ratio " << r << " position " << p;
    }
    // A prefill ending just before a boundary emits nothing for the unfinished block; its next token does.
    comp.reset();
    EXPECT_EQ(comp.forward(ctx, rows_of(x, 0, r - 1), 0).entries.rows, 0);
    const Compressor::Output next = comp.forward(ctx, rows_of(x, r - 1, 1), r - 1);
    EXPECT_EQ(next.first_block, 0);
    EXPECT_EQ(next.entries.rows, 1);
  }
}

// Prefill of s tokens, a few decode steps, then one chunk for the rest equals one prefill of all,
// bitwise, for split points around ratio-4 and ratio-128 boundaries; and arbitrary chunkings too.
TEST(ReferenceCompressor, PrefillDecodeAndChunksEqualOnePrefill) {
  const Model& s = tiny();
  const ModelConfig& c = s.config;
  const int64_t n = 262;  // two c128 entries, 65 c4 entries
  for (Mode mode : {Mode::exact, Mode::quant_sim}) {
    const Context ctx{c, Numerics{mode}, nullptr, nullptr};
    const Mat x = make_input(n, c.dim, 5, mode);
    for (const Which& w : {Which{&s, 1, false}, Which{&s, 1, true}, Which{&s, 2, false}}) {
      const std::string what = std::string(mode == Mode::exact ? "exact" : "quant_sim") + " layer " +
                               std::to_string(w.layer) + (w.indexer ? " indexer" : "");
      Compressor one = make(w);
      const Mat whole = run_chunks(one, ctx, x, {n});
      ASSERT_EQ(whole.rows, n / c.ratio(w.layer)) << what;
      Compressor comp = make(w);
      for (int64_t split : {1, 3, 4, 5, 7, 8, 126, 127, 128, 129, 254, 255, 256}) {
        comp.reset();
        expect_bitwise_equal(run_chunks(comp, ctx, x, {split, 1, 1, 1, 1, 1}), whole,
                             what + " split " + std::to_string(split));
      }
      comp.reset();
      expect_bitwise_equal(run_chunks(comp, ctx, x, {2, 9, 1, 30, 17, 64, 3, 5, 127}), whole, what + " chunks");
    }
  }
}

// A sequence slot reused for a new sequence: after reset() the compressor equals a fresh one, also
// for a prompt shorter than 4 tokens whose c4 block 0 is completed by decode steps (the case where
// stale A rows of the previous sequence would leak in).
TEST(ReferenceCompressor, ResetMakesReusedEqualFresh) {
  const Model& s = tiny();
  const ModelConfig& c = s.config;
  for (Mode mode : {Mode::exact, Mode::quant_sim}) {
    const Context ctx{c, Numerics{mode}, nullptr, nullptr};
    for (const Which& w : {Which{&s, 1, false}, Which{&s, 1, true}, Which{&s, 2, false}}) {
      Compressor reused = make(w);
      run_chunks(reused, ctx, make_input(135, c.dim, 6, mode), {135});  // leaves A rows and a partial block
      reused.reset();
      EXPECT_EQ(reused.next_pos(), 0);
      Compressor fresh = make(w);
      const Mat x = make_input(140, c.dim, 8, mode);
      const std::vector<int64_t> calls = {3, 1, 1, 1, 1, 1};  // a 3-token prompt, then decode
      expect_bitwise_equal(run_chunks(reused, ctx, x, calls), run_chunks(fresh, ctx, x, calls),
                           "layer " + std::to_string(w.layer) + (w.indexer ? " indexer" : ""));
    }
  }
}

TEST(ReferenceCompressor, QuantSimOnlyTouchesTheNopeDimsOfAttentionEntries) {
  const Model& s = tiny();
  const ModelConfig& c = s.config;
  const Mat x = make_input(8, c.dim, 9, Mode::quant_sim);
  Compressor comp = make({&s, 1, false});
  const Mat q = comp.forward(Context{c, Numerics{Mode::quant_sim}, nullptr, nullptr}, x, 0).entries;
  const int64_t nope = c.head_dim - c.rope_head_dim;
  for (int64_t b = 0; b < q.rows; ++b) {
    // Every nope block is e4m3 times a power of two: at most 3 mantissa bits survive.
    for (int64_t j = 0; j < nope; ++j) {
      const float v = q.at(b, j);
      int e = 0;
      const float m = std::frexp(std::fabs(v), &e);  // m in [0.5, 1)
      EXPECT_EQ(std::ldexp(m, 4), std::round(std::ldexp(m, 4))) << "block " << b << " dim " << j << " value " << v;
    }
    // The rope dims stay bf16 values.
    for (int64_t j = nope; j < c.head_dim; ++j) {
      Mat one(1, 1, q.at(b, j));
      round_bf16_inplace(one);
      EXPECT_EQ(one.at(0, 0), q.at(b, j));
    }
  }
}

TEST(ReferenceCompressorDeathTest, RefusesAPositionThatDoesNotContinueTheSequence) {
  const Model& s = micro();
  const ModelConfig& c = s.config;
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  Compressor comp = make({&s, 1, false});
  comp.forward(ctx, make_input(5, c.dim, 10, Mode::exact), 0);
  EXPECT_DEATH(comp.forward(ctx, make_input(1, c.dim, 11, Mode::exact), 0), "does not continue");
}

}  // namespace
}  // namespace dsv4::ref
