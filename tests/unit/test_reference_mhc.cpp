// The reference mHC (dsv4-model §4.1, §4.2, §8 item 9): Sinkhorn, hc_pre, hc_post and hc_head against
// hand-derived values on a 2-copy example, and their invariants on tiny's synthetic weights.
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "engine/config/model_config.h"
#include "engine/core/formats.h"
#include "reference/mhc.h"
#include "reference/weights.h"

namespace dsv4::ref {
namespace {

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

Mat mat(int64_t rows, int64_t cols, std::vector<float> values) {
  Mat m(rows, cols);
  EXPECT_EQ(static_cast<int64_t>(values.size()), rows * cols);
  m.data = std::move(values);
  return m;
}

// Two copies of dim 2, so every mix can be written out by hand.
ModelConfig two_copies() {
  ModelConfig c = load_model_config("tiny");
  c.hc_mult = 2;
  c.dim = 2;
  return c;
}

void expect_doubly_stochastic(const float* C, int64_t hc, double col_tol, double row_tol) {
  for (int64_t a = 0; a < hc; ++a) {
    double row = 0.0, col = 0.0;
    for (int64_t b = 0; b < hc; ++b) {
      EXPECT_GT(C[a * hc + b], 0.0f);
      row += C[a * hc + b];
      col += C[b * hc + a];
    }
    EXPECT_NEAR(col, 1.0, col_tol) << "column " << a;
    EXPECT_NEAR(row, 1.0, row_tol) << "row " << a;
  }
}

TEST(ReferenceSinkhorn, TwentyIterationsGiveADoublyStochasticMatrix) {
  std::mt19937 rng(11);
  // Logits spread over [-2, 2] (entries e^4 apart): 20 iterations bring the rows within 1e-4. Much
  // wider spreads converge more slowly (about 1e-2 left at [-4, 4]); that is the model's definition.
  std::uniform_real_distribution<float> logit(-2.0f, 2.0f);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> C(16);
    for (float& v : C) v = logit(rng);
    sinkhorn_inplace(C.data(), 4, 20, 1e-6);
    // The last step normalises columns, so they are exact up to eps; rows have converged.
    expect_doubly_stochastic(C.data(), 4, 1e-5, 1e-4);
  }
}

TEST(ReferenceSinkhorn, OneIterationIsRowSoftmaxPlusEpsThenColumns) {
  const double eps = 1e-3;  // large enough to see where it enters
  std::vector<float> C = {0.0f, static_cast<float>(std::log(3.0)), 0.0f, 0.0f};
  sinkhorn_inplace(C.data(), 2, 1, eps);
  // Row softmax: (1/4, 3/4) and (1/2, 1/2); + eps; each column ÷ (its sum + eps).
  const double col0 = 0.25 + eps + 0.5 + eps, col1 = 0.75 + eps + 0.5 + eps;
  EXPECT_NEAR(C[0], (0.25 + eps) / (col0 + eps), 1e-6);
  EXPECT_NEAR(C[1], (0.75 + eps) / (col1 + eps), 1e-6);
  EXPECT_NEAR(C[2], (0.5 + eps) / (col0 + eps), 1e-6);
  EXPECT_NEAR(C[3], (0.5 + eps) / (col1 + eps), 1e-6);
}

TEST(ReferenceSinkhorn, TwoIterationsAreColumnsRowsColumnsEndingOnColumns) {
  const double eps = 1e-6;
  const std::vector<float> L = {3.0f, -2.0f, 0.5f, -1.0f, 2.5f, -3.5f, 1.5f, 0.0f, -4.0f};
  std::vector<float> C = L;
  sinkhorn_inplace(C.data(), 3, 2, eps);
  // Spelled out: row softmax + eps, columns, rows, columns.
  double A[3][3];
  for (int j = 0; j < 3; ++j) {
    double sum = 0.0;
    for (int k = 0; k < 3; ++k) sum += std::exp(L[j * 3 + k]);
    for (int k = 0; k < 3; ++k) A[j][k] = std::exp(L[j * 3 + k]) / sum + eps;
  }
  auto columns = [&] {
    for (int k = 0; k < 3; ++k) {
      const double s = A[0][k] + A[1][k] + A[2][k] + eps;
      for (int j = 0; j < 3; ++j) A[j][k] /= s;
    }
  };
  columns();
  for (int j = 0; j < 3; ++j) {
    const double s = A[j][0] + A[j][1] + A[j][2] + eps;
    for (int k = 0; k < 3; ++k) A[j][k] /= s;
  }
  columns();
  double worst_row = 0.0;
  for (int j = 0; j < 3; ++j) {
    for (int k = 0; k < 3; ++k) EXPECT_NEAR(C[static_cast<size_t>(j * 3 + k)], A[j][k], 1e-6) << j << "," << k;
    worst_row = std::max(worst_row, std::abs(A[j][0] + A[j][1] + A[j][2] - 1.0));
  }
  ASSERT_GT(worst_row, 1e-3) << "rows have converged: this example cannot tell the last step";
  expect_doubly_stochastic(C.data(), 3, 1e-5, 1.0);  // columns exact, rows not yet
}

TEST(ReferenceSinkhorn, TwoByTwoConvergesToTheClosedForm) {
  // A positive 2x2 matrix A scales to [[q, 1-q], [1-q, q]] with q/(1-q) = sqrt(A00 A11 / (A01 A10)),
  // i.e. q = sigmoid((L00 + L11 - L01 - L10) / 2) for A = exp(L).
  const std::vector<float> L = {0.3f, -1.1f, 0.8f, 0.5f};
  std::vector<float> C = L;
  sinkhorn_inplace(C.data(), 2, 20, 1e-6);
  const double q = sigmoid((L[0] + L[3] - L[1] - L[2]) / 2.0);
  EXPECT_NEAR(C[0], q, 1e-4);
  EXPECT_NEAR(C[1], 1 - q, 1e-4);
  EXPECT_NEAR(C[2], 1 - q, 1e-4);
  EXPECT_NEAR(C[3], q, 1e-4);
}

TEST(ReferenceMhc, HcPreHandBuiltTwoCopies) {
  const ModelConfig c = two_copies();
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  // R: copy 0 = (1, 2), copy 1 = (3, 4). fn row k picks v[k mod 4], so m_k = v[k mod 4] · r.
  const Mat R = mat(1, 4, {1, 2, 3, 4});
  Mat fn(8, 4);
  for (int64_t k = 0; k < 8; ++k) fn.at(k, k % 4) = 1.0f;
  const Mat base = mat(1, 8, {0.1f, -0.2f, 0.3f, -0.4f, 0.5f, -0.6f, 0.7f, -0.8f});
  const Mat scale = mat(1, 3, {0.5f, 1.0f, 2.0f});
  HcMix mix;
  const Mat x = hc_pre(ctx, R, fn, base, scale, &mix);

  const double r = 1.0 / std::sqrt((1 + 4 + 9 + 16) / 4.0 + c.norm_eps);  // RMS over all 4 values
  const double v[4] = {1, 2, 3, 4};
  const double pre0 = sigmoid(0.5 * r * v[0] + 0.1) + c.hc_eps;
  const double pre1 = sigmoid(0.5 * r * v[1] - 0.2) + c.hc_eps;
  EXPECT_NEAR(mix.pre.at(0, 0), pre0, 1e-6);
  EXPECT_NEAR(mix.pre.at(0, 1), pre1, 1e-6);
  EXPECT_NEAR(mix.post.at(0, 0), 2 * sigmoid(1.0 * r * v[2] + 0.3), 1e-6);
  EXPECT_NEAR(mix.post.at(0, 1), 2 * sigmoid(1.0 * r * v[3] - 0.4), 1e-6);
  // Comb logits m_{4+2j+k}·scale[2] + base, then Sinkhorn: the closed form of the 2x2 case.
  const double L00 = 2 * r * v[0] + 0.5, L01 = 2 * r * v[1] - 0.6, L10 = 2 * r * v[2] + 0.7, L11 = 2 * r * v[3] - 0.8;
  const double q = sigmoid((L00 + L11 - L01 - L10) / 2);
  EXPECT_NEAR(mix.comb.at(0, 0), q, 1e-4);
  EXPECT_NEAR(mix.comb.at(0, 1), 1 - q, 1e-4);
  EXPECT_NEAR(mix.comb.at(0, 2), 1 - q, 1e-4);
  EXPECT_NEAR(mix.comb.at(0, 3), q, 1e-4);
  // x = pre_0 R_0 + pre_1 R_1 (not normalised).
  ASSERT_EQ(x.rows, 1);
  ASSERT_EQ(x.cols, 2);
  EXPECT_NEAR(x.at(0, 0), pre0 * 1 + pre1 * 3, 1e-5);
  EXPECT_NEAR(x.at(0, 1), pre0 * 2 + pre1 * 4, 1e-5);

  // The mix pointer is optional.
  const Mat x2 = hc_pre(ctx, R, fn, base, scale, nullptr);
  EXPECT_EQ(x2.data, x.data);
}

TEST(ReferenceMhc, HcPostOutputCopyKTakesColumnKOfC) {
  const ModelConfig c = two_copies();
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Mat F = mat(1, 2, {10, 20});
  const Mat R = mat(1, 4, {1, 2, 3, 4});
  HcMix mix;
  mix.pre = mat(1, 2, {1, 1});
  mix.post = mat(1, 2, {0.5f, 1.5f});
  mix.comb = mat(1, 4, {0.1f, 0.2f, 0.3f, 0.4f});  // C = [[0.1, 0.2], [0.3, 0.4]], deliberately asymmetric
  const Mat out = hc_post(ctx, F, R, mix);
  ASSERT_EQ(out.cols, 4);
  // R'_0 = post_0 F + C00 R_0 + C10 R_1;  R'_1 = post_1 F + C01 R_0 + C11 R_1.
  EXPECT_NEAR(out.at(0, 0), 0.5 * 10 + 0.1 * 1 + 0.3 * 3, 1e-5);
  EXPECT_NEAR(out.at(0, 1), 0.5 * 20 + 0.1 * 2 + 0.3 * 4, 1e-5);
  EXPECT_NEAR(out.at(0, 2), 1.5 * 10 + 0.2 * 1 + 0.4 * 3, 1e-5);
  EXPECT_NEAR(out.at(0, 3), 1.5 * 20 + 0.2 * 2 + 0.4 * 4, 1e-5);
}

TEST(ReferenceMhc, HcHeadHandBuiltTwoCopies) {
  const ModelConfig c = two_copies();
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Mat R = mat(1, 4, {1, 2, 3, 4});
  const Mat fn = mat(2, 4, {1, 0, 0, 0, 0, 0, 0, 1});  // m_0 = v_0 r, m_1 = v_3 r
  const Mat base = mat(1, 2, {0.25f, -0.5f});
  const Mat scale = mat(1, 1, {0.75f});
  const Mat y = hc_head(ctx, R, fn, base, scale);
  const double r = 1.0 / std::sqrt(7.5 + c.norm_eps);
  const double pre0 = sigmoid(0.75 * r * 1 + 0.25) + c.hc_eps;
  const double pre1 = sigmoid(0.75 * r * 4 - 0.5) + c.hc_eps;
  ASSERT_EQ(y.cols, 2);
  EXPECT_NEAR(y.at(0, 0), pre0 * 1 + pre1 * 3, 1e-5);
  EXPECT_NEAR(y.at(0, 1), pre0 * 2 + pre1 * 4, 1e-5);
}

// A bf16 residual of T tokens for config c.
Mat random_residual(const ModelConfig& c, int64_t T, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Mat R(T, c.hc_mult * c.dim);
  for (float& v : R.data) v = round_bf16(normal(rng));
  return R;
}

TEST(ReferenceMhc, TinyMixesAreInRangeAndCombIsDoublyStochastic) {
  const ModelConfig c = load_model_config("tiny");
  const Weights w = Weights::synthetic(c, 5);
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Mat R = random_residual(c, 3, 1);
  for (const char* which : {"attn", "ffn"}) {
    const std::string p = std::string("layers.1.hc_") + which;
    HcMix mix;
    const Mat x = hc_pre(ctx, R, w.get(p + "_fn"), w.get(p + "_base"), w.get(p + "_scale"), &mix);
    ASSERT_EQ(x.rows, 3);
    ASSERT_EQ(x.cols, c.dim);
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t j = 0; j < c.hc_mult; ++j) {
        EXPECT_GT(mix.pre.at(t, j), 0.0f);
        EXPECT_LE(mix.pre.at(t, j), 1.0f + 1e-5f);
        EXPECT_GT(mix.post.at(t, j), 0.0f);
        EXPECT_LT(mix.post.at(t, j), 2.0f);
      }
      expect_doubly_stochastic(mix.comb.row(t), c.hc_mult, 1e-5, 1e-3);
    }
  }
}

TEST(ReferenceMhc, QuantSimRoundsEachOutputOnceToBf16) {
  const ModelConfig c = load_model_config("tiny");
  const Weights w = Weights::synthetic(c, 5);
  const Context exact{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Context quant{c, Numerics{Mode::quant_sim}, nullptr, nullptr};
  const Mat R = random_residual(c, 2, 2);
  const Mat& fn = w.get("layers.2.hc_ffn_fn");
  const Mat& base = w.get("layers.2.hc_ffn_base");
  const Mat& scale = w.get("layers.2.hc_ffn_scale");
  HcMix mix_e, mix_q;
  const Mat xe = hc_pre(exact, R, fn, base, scale, &mix_e);
  const Mat xq = hc_pre(quant, R, fn, base, scale, &mix_q);
  // The mixes are fp32 in both modes; only the output is rounded, once.
  EXPECT_EQ(mix_e.comb.data, mix_q.comb.data);
  for (size_t i = 0; i < xe.data.size(); ++i) EXPECT_EQ(xq.data[i], round_bf16(xe.data[i]));

  Mat F(2, c.dim);
  for (size_t i = 0; i < F.data.size(); ++i) F.data[i] = xq.data[i];
  const Mat pe = hc_post(exact, F, R, mix_q);
  const Mat pq = hc_post(quant, F, R, mix_q);
  for (size_t i = 0; i < pe.data.size(); ++i) EXPECT_EQ(pq.data[i], round_bf16(pe.data[i]));

  const Mat he = hc_head(exact, R, w.get("hc_head_fn"), w.get("hc_head_base"), w.get("hc_head_scale"));
  const Mat hq = hc_head(quant, R, w.get("hc_head_fn"), w.get("hc_head_base"), w.get("hc_head_scale"));
  for (size_t i = 0; i < he.data.size(); ++i) EXPECT_EQ(hq.data[i], round_bf16(he.data[i]));
}

TEST(ReferenceMhc, HcHeadIsHcPreWithoutSinkhorn) {
  // With fn = hc_pre's first hc rows, base = its first hc bases and scale = scale[0], hc_head's
  // weights are hc_pre's pre weights, so the outputs agree.
  const ModelConfig c = load_model_config("tiny");
  const Weights w = Weights::synthetic(c, 9);
  const Context ctx{c, Numerics{Mode::exact}, nullptr, nullptr};
  const Mat R = random_residual(c, 2, 3);
  const Mat& fn = w.get("layers.0.hc_attn_fn");
  const Mat& base = w.get("layers.0.hc_attn_base");
  const Mat& scale = w.get("layers.0.hc_attn_scale");
  const Mat x = hc_pre(ctx, R, fn, base, scale, nullptr);
  const Mat y = hc_head(ctx, R, rows_of(fn, 0, c.hc_mult), cols_of(base, 0, c.hc_mult), cols_of(scale, 0, 1));
  EXPECT_EQ(x.data, y.data);
}

}  // namespace
}  // namespace dsv4::ref
