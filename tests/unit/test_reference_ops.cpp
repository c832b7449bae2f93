// Per-op tests of the reference against hand-derived values and invariants.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "engine/checkpoint/synthetic_weights.h"
#include "engine/core/formats.h"
#include "reference/attention.h"
#include "reference/hadamard.h"
#include "reference/linear.h"
#include "reference/norm.h"
#include "reference/quant.h"
#include "reference/rope.h"

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
