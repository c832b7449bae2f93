// Per-op tests of the reference against hand-derived values and invariants; the w8a8-int8 linear
// mode, by hand and through a whole micro-config forward.
#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "engine/checkpoint/synthetic_weights.h"
#include "engine/core/formats.h"
#include "reference/attention.h"
#include "reference/generate.h"
#include "reference/hadamard.h"
#include "reference/linear.h"
#include "reference/model.h"
#include "reference/norm.h"
#include "reference/quant.h"
#include "reference/rope.h"
#include "reference/weights.h"

namespace dsv4::ref {
namespace {

const ModelConfig& tiny() {
  static const ModelConfig c = load_model_config("tiny");
  return c;
}

std::vector<float> noise(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>(synthetic_uniform(seed, "noise", static_cast<uint64_t>(i)));
  return v;
}

TEST(ReferenceRope, InverseRopeUndoesRope) {
  for (int64_t ratio : {0, 4, 128}) {
    const RopeTable table = make_rope_table(tiny(), ratio);
    for (int64_t pos : {0, 1, 127, 128, 1023}) {
      std::vector<float> x = noise(64, static_cast<uint64_t>(pos));
      const std::vector<float> original = x;
      apply_rope(x.data(), pos, table, false);
      apply_rope(x.data(), pos, table, true);
      for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], original[i], 1e-5f) << "ratio " << ratio << " pos " << pos;
    }
  }
}

TEST(ReferenceRope, RotatesInterleavedPairsByPositionTimesFrequency) {
  const RopeTable table = make_rope_table(tiny(), 0);
  std::vector<float> x(64, 0.0f);
  x[2] = 1.0f;  // pair 1: (1, 0)
  apply_rope(x.data(), 3, table, false);
  const float angle = 3.0f * table.freqs[1];
  EXPECT_NEAR(x[2], std::cos(angle), 1e-6f);
  EXPECT_NEAR(x[3], std::sin(angle), 1e-6f);
  EXPECT_EQ(x[0], 0.0f);
}

TEST(ReferenceRope, RatioZeroIsPlainAndCompressedLayersUseYarn) {
  const RopeTable plain = make_rope_table(tiny(), 0);
  const RopeTable yarn = make_rope_table(tiny(), 4);
  EXPECT_NEAR(plain.freqs[1], std::pow(10000.0, -2.0 / 64), 1e-7);  // fp32 table
  // base 160000: dims below the correction range [15, 25] keep their frequency, above it / 16.
  for (int j : {0, 5, 15}) EXPECT_NEAR(yarn.freqs[static_cast<size_t>(j)], std::pow(160000.0, -2.0 * j / 64), 1e-7 * std::pow(160000.0, -2.0 * j / 64) + 1e-12);
  for (int j : {25, 31}) {
    const double raw = std::pow(160000.0, -2.0 * j / 64);
    EXPECT_NEAR(yarn.freqs[static_cast<size_t>(j)], raw / 16, raw * 1e-5);
  }
  const double raw20 = std::pow(160000.0, -2.0 * 20 / 64);
  EXPECT_LT(yarn.freqs[20], raw20);
  EXPECT_GT(yarn.freqs[20], raw20 / 16);
  EXPECT_EQ(make_rope_table(tiny(), 128).freqs, yarn.freqs) << "the ratio picks the table, 4 and 128 share it";
}

TEST(ReferenceAttention, SinkOnlyEnlargesTheDenominator) {
  const Context ctx{tiny(), Numerics{}, nullptr, nullptr};
  const int64_t dim = 8;
  std::vector<std::vector<float>> keys_storage;
  for (int j = 0; j < 5; ++j) keys_storage.push_back(noise(dim, 100 + static_cast<uint64_t>(j)));
  std::vector<const float*> keys;
  for (auto& k : keys_storage) keys.push_back(k.data());
  const std::vector<float> q = noise(dim, 7);
  std::vector<float> no_sink(dim), with_sink(dim);
  attention_head(ctx, q.data(), keys, dim, -std::numeric_limits<float>::infinity(), 0.5f, no_sink.data());
  attention_head(ctx, q.data(), keys, dim, 0.3f, 0.5f, with_sink.data());
  // Plain softmax by hand.
  std::vector<double> logits;
  double m = -1e30;
  for (const float* k : keys) {
    double l = 0;
    for (int64_t i = 0; i < dim; ++i) l += static_cast<double>(q[static_cast<size_t>(i)]) * k[i];
    logits.push_back(0.5 * l);
    m = std::max(m, logits.back());
  }
  double denom = 0;
  for (double l : logits) denom += std::exp(l - m);
  const double shrink = denom / (denom + std::exp(0.3 - m));
  for (int64_t i = 0; i < dim; ++i) {
    double expected = 0;
    for (size_t j = 0; j < keys.size(); ++j) expected += std::exp(logits[j] - m) / denom * keys[j][i];
    EXPECT_NEAR(no_sink[static_cast<size_t>(i)], expected, 1e-5);
    EXPECT_NEAR(with_sink[static_cast<size_t>(i)], expected * shrink, 1e-5);
  }
  EXPECT_LT(shrink, 1.0);
}

TEST(ReferenceAttention, NoKeysGiveZero) {
  const Context ctx{tiny(), Numerics{}, nullptr, nullptr};
  std::vector<float> q(4, 1.0f), out(4, 7.0f);
  attention_head(ctx, q.data(), {}, 4, 0.0f, 1.0f, out.data());
  EXPECT_EQ(out, std::vector<float>(4, 0.0f));
}

TEST(ReferenceHadamard, IsOrthonormalAndSylvesterOrdered) {
  std::vector<float> x = noise(128, 3);
  const std::vector<float> original = x;
  hadamard_inplace(x.data(), 128);
  double norm_in = 0, norm_out = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    norm_in += original[i] * original[i];
    norm_out += x[i] * x[i];
  }
  EXPECT_NEAR(norm_in, norm_out, 1e-4);
  // Row i of H: (-1)^popcount(i & j).
  for (int i : {0, 1, 5, 127}) {
    std::vector<float> e(128, 0.0f);
    e[static_cast<size_t>(i)] = 1.0f;
    hadamard_inplace(e.data(), 128);
    for (int j = 0; j < 128; ++j) {
      const float sign = (__builtin_popcount(static_cast<unsigned>(i & j)) % 2) ? -1.0f : 1.0f;
      EXPECT_FLOAT_EQ(e[static_cast<size_t>(j)], sign / std::sqrt(128.0f));
    }
  }
  hadamard_inplace(x.data(), 128);  // H is its own inverse once normalised
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], original[i], 1e-5f);
}

TEST(ReferenceQuant, Fp8ScalesArePowersOfTwoAboveAmaxOver448) {
  EXPECT_EQ(fp8_block_scale(448.0f), 1.0f);
  EXPECT_EQ(fp8_block_scale(1.0f), 0x1.0p-8f);     // 1/448 = 2^-8.8 -> 2^-8
  EXPECT_EQ(fp8_block_scale(0.0f), fp8_block_scale(1e-4f));  // amax is clamped from below
  EXPECT_EQ(fp4_block_scale(6.0f), 1.0f);
  EXPECT_EQ(fp4_block_scale(7.0f), 2.0f);
  std::vector<float> x = {1.0f, -0.3f, 0.01f, 448.0f * 0x1.0p-8f};
  fp8_quant_dequant(x.data(), 4, 4);
  EXPECT_EQ(x[0], 1.0f);
  EXPECT_EQ(x[3], 1.75f);
  EXPECT_NEAR(x[1], -0.3f, 0.3f / 16);
}

TEST(ReferenceQuant, InitialReleaseKvSimulationOnlyClamps) {
  std::vector<float> a = {0.3f, -1.1f}, b = a;
  fp8_quant_dequant(a.data(), 2, 2, /*round_to_e4m3=*/false);
  fp8_quant_dequant(b.data(), 2, 2, /*round_to_e4m3=*/true);
  EXPECT_FLOAT_EQ(a[0], 0.3f);  // power-of-two scale: x / s * s is exact
  EXPECT_NE(b[0], 0.3f);
}

TEST(ReferenceLinear, QuantSimQuantizesFp8InputsAndRoundsOutputs) {
  const ModelConfig& c = tiny();
  Mat x(1, 128), w(2, 128);
  for (int64_t i = 0; i < 128; ++i) {
    x.at(0, i) = 0.01f * static_cast<float>(i % 7) - 0.02f;
    w.at(0, i) = 1.0f;
    w.at(1, i) = (i == 3) ? 1.0f : 0.0f;
  }
  const Context exact{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Context quant{c, Numerics{Mode::quant_sim}, nullptr, nullptr};
  const Mat ye = linear(exact, x, w, LinearKind::fp8);
  const Mat yq = linear(quant, x, w, LinearKind::fp8);
  EXPECT_FLOAT_EQ(ye.at(0, 1), x.at(0, 3));
  Mat xq = x;
  fp8_quant_dequant_rows(xq, 128);
  EXPECT_EQ(yq.at(0, 1), round_bf16(xq.at(0, 3)));
  EXPECT_EQ(linear(quant, x, w, LinearKind::f32).at(0, 1), x.at(0, 3)) << "f32 linears take the input as is";
}

// ---- the w8a8-int8 linear mode --------------------------------------------------------------------

Context int8_context(const ModelConfig& c) {
  Numerics n{Mode::quant_sim};
  n.linear = LinearQuant::w8a8_int8;
  return Context{c, n, nullptr, nullptr};
}

TEST(ReferenceQuantInt8, RowRuleByHand) {
  // amax 127/64: s = 1/64 and inv = 64 exactly, so the codes are x · 64 rounded half to even.
  const std::vector<float> x = {127.0f / 64, 2.5f / 64, 3.5f / 64, -2.5f / 64, -127.0f / 64, 0.5f / 64, 0.0f, 1.25f / 64};
  std::vector<int8_t> q(x.size());
  EXPECT_EQ(int8_quantize_row(x.data(), static_cast<int64_t>(x.size()), q.data()), 1.0f / 64);
  EXPECT_EQ(q, (std::vector<int8_t>{127, 2, 4, -2, -127, 0, 0, 1}));
  // An all-zero row: amax is the 1e-7 floor, the codes 0.
  const std::vector<float> zeros(5, 0.0f);
  EXPECT_EQ(int8_quantize_row(zeros.data(), 5, q.data()), 1e-7f / 127.0f);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(q[static_cast<size_t>(i)], 0);
  // Below the floor the codes stay small: 3e-8 * f32(127 / 1e-7) = 38.1 -> 38.
  const float tiny_value = 3e-8f;
  EXPECT_EQ(int8_quantize_row(&tiny_value, 1, q.data()), 1e-7f / 127.0f);
  EXPECT_EQ(q[0], 38);
  // A non-finite row: scale NaN, codes 0.
  const std::vector<float> bad = {1.0f, std::numeric_limits<float>::infinity(), -2.0f};
  EXPECT_TRUE(std::isnan(int8_quantize_row(bad.data(), 3, q.data())));
  EXPECT_EQ(q[0], 0);
  EXPECT_EQ(q[2], 0);
  // The rows of a matrix are quantized independently.
  Mat m(2, 3);
  m.data = {4.0f, -1.0f, 0.5f, 0.0f, 0.0f, -0.25f};
  const Int8Rows r = int8_quantize_rows(m);
  EXPECT_EQ(r.scales[0], 4.0f / 127.0f);
  EXPECT_EQ(r.scales[1], 0.25f / 127.0f);
  EXPECT_EQ(r.at(0, 0), 127);
  EXPECT_EQ(r.at(0, 1), -32);  // -1 * 31.75 = -31.75 -> -32
  EXPECT_EQ(r.at(0, 2), 16);   // 0.5 * 31.75 = 15.875 -> 16
  EXPECT_EQ(r.at(1, 2), -127);
}

TEST(ReferenceLinearInt8, HandComputedTinyExample) {
  // x: amax 127/64 -> s_x = 1/64, codes {127, 2 (2.5, tie to even), 4 (3.5, tie to even), -2}.
  // w row 0: amax 127/64 -> s = 1/64, codes {127, 32, -16, 2 (1.5)}; row 1: zeros; row 2: amax 4 ->
  // inv = 31.75, s = f32(4/127), codes {-127, 0, 0, 32 (31.75)}.
  //   acc0 = 127·127 + 2·32 - 4·16 - 2·2 = 16125 -> bf16((16125/64)/64 = 3.93677) = 3.9375
  //   acc1 = 0 -> 0
  //   acc2 = -127·127 - 2·32 = -16193 -> (-16193/64)·(4/127) = -7.96899 -> bf16 -7.96875
  Mat x(1, 4), w(3, 4);
  x.data = {127.0f / 64, 2.5f / 64, 3.5f / 64, -2.5f / 64};
  w.data = {127.0f / 64, 0.5f, -0.25f, 1.5f / 64, 0, 0, 0, 0, -4.0f, 0, 0, 1.0f};
  const Mat y = linear(int8_context(tiny()), x, w, LinearKind::fp8);
  EXPECT_EQ(y.data, (std::vector<float>{3.9375f, 0.0f, -7.96875f}));
  EXPECT_EQ(linear(int8_context(tiny()), x, w, LinearKind::fp4).data, y.data) << "fp4 linears take the same path";
  EXPECT_EQ(linear_w8a8_int8(x, w).data, y.data);
  // The FP8 block mode gives something else on the same input (x[0] = 1.984375 becomes 2 in e4m3).
  const Mat fp8 = linear(Context{tiny(), Numerics{Mode::quant_sim}, nullptr, nullptr}, x, w, LinearKind::fp8);
  EXPECT_NE(fp8.data, y.data);
}

TEST(ReferenceLinearInt8, OnlyQuantSimFp8AndFp4LinearsChange) {
  const ModelConfig& c = tiny();
  Mat x(3, 256), w(5, 256);
  const std::vector<float> nx = noise(3 * 256, 21), nw = noise(5 * 256, 22);
  for (size_t i = 0; i < nx.size(); ++i) x.data[i] = round_bf16(nx[i]);
  for (size_t i = 0; i < nw.size(); ++i) w.data[i] = nw[i];
  const Context fp8_block{c, Numerics{Mode::quant_sim}, nullptr, nullptr};
  const Context int8 = int8_context(c);
  Numerics exact_int8{Mode::exact};
  exact_int8.linear = LinearQuant::w8a8_int8;
  const Context exact{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Context exact_with_int8{c, exact_int8, nullptr, nullptr};
  // The int8 result is the exact product up to the quantization error: |x - x̂| <= s_x / 2 and
  // |w - ŵ| <= s_w / 2 per element, so |xw - x̂ŵ| <= Σ_k (|x_k| s_w + |w_k| s_x + s_x s_w / 2) / 2, plus
  // the final bf16 rounding (2^-8 relative) and the f32 scaling (a few 2^-24).
  const Mat y_exact = linear(exact, x, w, LinearKind::fp8);
  const Int8Rows qx = int8_quantize_rows(x), qw = int8_quantize_rows(w);
  for (LinearKind kind : {LinearKind::fp8, LinearKind::fp4}) {
    const Mat a = linear(fp8_block, x, w, kind);
    const Mat b = linear(int8, x, w, kind);
    EXPECT_NE(a.data, b.data) << "w8a8-int8 is its own numerics";
    for (int64_t t = 0; t < x.rows; ++t) {
      for (int64_t n = 0; n < w.rows; ++n) {
        const double sx = qx.scales[static_cast<size_t>(t)], sw = qw.scales[static_cast<size_t>(n)];
        double bound = 0;
        for (int64_t k = 0; k < x.cols; ++k) bound += (std::fabs(x.at(t, k)) * sw + std::fabs(w.at(n, k)) * sx + sx * sw / 2) / 2;
        bound += 0x1.0p-8 * std::fabs(b.at(t, n)) + 0x1.0p-20 * bound;
        EXPECT_LE(std::fabs(static_cast<double>(b.at(t, n)) - y_exact.at(t, n)), bound) << "t " << t << " n " << n;
        EXPECT_EQ(b.at(t, n), round_bf16(b.at(t, n))) << "one bf16 rounding";
      }
    }
  }
  for (LinearKind kind : {LinearKind::bf16, LinearKind::f32}) {
    EXPECT_EQ(linear(int8, x, w, kind).data, linear(fp8_block, x, w, kind).data) << "bf16 and f32 kinds unchanged";
  }
  for (LinearKind kind : {LinearKind::fp8, LinearKind::fp4, LinearKind::bf16, LinearKind::f32}) {
    EXPECT_EQ(linear(exact_with_int8, x, w, kind).data, linear(exact, x, w, kind).data) << "exact mode unchanged";
  }
  EXPECT_STREQ(linear_quant_name(LinearQuant::w8a8_int8), "w8a8_int8");
  EXPECT_STREQ(linear_quant_name(Numerics{}.linear), "fp8_block") << "the default stays the official numerics";
}

TEST(ReferenceModelInt8, MicroForwardAndGenerationGiveFiniteLogits) {
  const ModelConfig c = load_model_config("micro");
  const Weights weights = Weights::synthetic(c, 5);
  const std::vector<int64_t> prompt = synthetic_prompt(c, 8, 24);
  const Context int8 = int8_context(c);
  Model m(c, weights);
  const Mat logits = m.forward(int8, prompt, 0).logits;
  ASSERT_EQ(logits.cols, c.vocab_size);
  for (float v : logits.data) ASSERT_TRUE(std::isfinite(v));
  m.reset();
  const Mat fp8 = m.forward(Context{c, Numerics{Mode::quant_sim}, nullptr, nullptr}, prompt, 0).logits;
  m.reset();
  const Mat exact = m.forward(Context{c, Numerics{Mode::exact}, nullptr, nullptr}, prompt, 0).logits;
  EXPECT_NE(logits.data, fp8.data) << "the mode reaches the model's linears";
  double diff = 0, scale = 1;
  for (size_t i = 0; i < exact.data.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(logits.data[i]) - exact.data[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(exact.data[i])));
  }
  EXPECT_LT(diff / scale, 0.25) << "quantization noise, not a broken model";
  // Prefill, decode steps and MTP drafts, all finite and deterministic.
  Model g(c, weights);
  const Generation a = generate_greedy(int8, g, prompt, 4, true);
  ASSERT_EQ(a.logits.size(), 5u);
  for (const Mat& l : a.logits) {
    for (float v : l.data) ASSERT_TRUE(std::isfinite(v));
  }
  for (const Mat& l : a.draft_logits) {
    for (float v : l.data) ASSERT_TRUE(std::isfinite(v));
  }
  const Generation b = generate_greedy(int8, g, prompt, 4, true);
  EXPECT_EQ(logits_digest(a.logits), logits_digest(b.logits));
  EXPECT_EQ(a.logits.front().data, logits.data) << "the prefill step is the forward above";
}

TEST(ReferenceNorm, RmsNormMatchesTheFormula) {
  const Context ctx{tiny(), Numerics{}, nullptr, nullptr};
  Mat x(1, 4), w(1, 4, 2.0f);
  x.data = {1, 2, 3, 4};
  const Mat y = rms_norm(ctx, x, w);
  const double r = 1.0 / std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y.at(0, i), (i + 1) * r * 2, 1e-6);
}

}  // namespace
}  // namespace dsv4::ref
