#include "reference/mhc.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dsv4::ref {

namespace {

float sigmoid(float z) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(z)))); }

// The mixes' summation order (§4.1 steps 1-2 fix none): 256 lanes, lane l adding the terms i ≡ l
// (mod 256) in ascending i, then lanes folded by halving (lane l += lane l + s for s = 128, ..., 1).
// One f64 chain per lane, so the GPU kernel reduces a token with a block of threads in this order.
constexpr int64_t kMixLanes = 256;

template <class Term>
double mix_sum(int64_t n, Term term) {
  double lane[kMixLanes] = {};
  for (int64_t i = 0; i < n; ++i) lane[i % kMixLanes] += term(i);
  for (int64_t s = kMixLanes / 2; s >= 1; s /= 2) {
    for (int64_t l = 0; l < s; ++l) lane[l] += lane[l + s];
  }
  return lane[0];
}

// m = (fn · v) · rsqrt(mean(v²) + norm_eps) for one token's flattened copies v [hc * dim]: f64 sums
// (of f32 products for the dots) in the mix order. The RMS scales only the mixes; v itself is never
// normalised (§4.1 steps 1-2).
std::vector<float> mix_logits(const Mat& fn, const float* v, int64_t n, double norm_eps) {
  const double sum_sq = mix_sum(n, [&](int64_t i) { return static_cast<double>(v[i]) * v[i]; });
  const float r = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + norm_eps));
  std::vector<float> m(static_cast<size_t>(fn.rows));
  for (int64_t k = 0; k < fn.rows; ++k) {
    const float* a = fn.row(k);
    m[static_cast<size_t>(k)] = static_cast<float>(mix_sum(n, [&](int64_t i) { return static_cast<double>(a[i] * v[i]); })) * r;
  }
  return m;
}

// out = Σ_j w[j] R_j over the hc copies of one token, fp64 sum of fp32 products, rounded once.
void weighted_copies(const Context& ctx, const float* w, const float* R, int64_t hc, int64_t dim, float* out) {
  for (int64_t i = 0; i < dim; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(w[j] * R[j * dim + i]);
    out[i] = ctx.act(static_cast<float>(acc));
  }
}

// Divides each row (by_rows) or each column of the hc x hc matrix by its sum + eps.
void normalise(float* C, int64_t hc, double eps, bool by_rows) {
  for (int64_t a = 0; a < hc; ++a) {
    double sum = 0.0;
    for (int64_t b = 0; b < hc; ++b) sum += by_rows ? C[a * hc + b] : C[b * hc + a];
    const float denom = static_cast<float>(sum + eps);
    for (int64_t b = 0; b < hc; ++b) (by_rows ? C[a * hc + b] : C[b * hc + a]) /= denom;
  }
}

}  // namespace

void sinkhorn_inplace(float* C, int64_t hc, int64_t iters, double eps) {
  DSV4_ASSERT(hc > 0, "sinkhorn: hc must be positive");
  DSV4_ASSERT(iters >= 1, "sinkhorn: at least one iteration");
  // Row softmax (max-subtracted), then + eps on every entry.
  for (int64_t j = 0; j < hc; ++j) {
    float* row = C + j * hc;
    float mx = row[0];
    for (int64_t k = 1; k < hc; ++k) mx = std::max(mx, row[k]);
    double sum = 0.0;
    for (int64_t k = 0; k < hc; ++k) {
      row[k] = std::exp(row[k] - mx);
      sum += row[k];
    }
    for (int64_t k = 0; k < hc; ++k) row[k] = static_cast<float>(row[k] / sum + eps);
  }
  normalise(C, hc, eps, /*by_rows=*/false);
  for (int64_t it = 1; it < iters; ++it) {
    normalise(C, hc, eps, /*by_rows=*/true);
    normalise(C, hc, eps, /*by_rows=*/false);
  }
}

Mat hc_pre(const Context& ctx, const Mat& R, const Mat& fn, const Mat& base, const Mat& scale, HcMix* mix) {
  const int64_t hc = ctx.config.hc_mult;
  const int64_t n = R.cols;
  const int64_t dim = n / hc;
  DSV4_ASSERT(dim * hc == n, "hc_pre: residual width is not hc_mult * dim");
  DSV4_ASSERT(fn.rows == (2 + hc) * hc, "hc_pre: fn must have (2 + hc) * hc rows");
  DSV4_ASSERT(fn.cols == n, "hc_pre: fn width != residual width");
  DSV4_ASSERT(base.size() == fn.rows, "hc_pre: base size != number of mixes");
  DSV4_ASSERT(scale.size() == 3, "hc_pre: scale must hold 3 values");
  const float* b = base.data.data();
  const float* s = scale.data.data();
  const float eps = static_cast<float>(ctx.config.hc_eps);

  HcMix local;
  HcMix& out_mix = mix != nullptr ? *mix : local;
  out_mix.pre = Mat(R.rows, hc);
  out_mix.post = Mat(R.rows, hc);
  out_mix.comb = Mat(R.rows, hc * hc);
  Mat x(R.rows, dim);
  for (int64_t t = 0; t < R.rows; ++t) {
    const std::vector<float> m = mix_logits(fn, R.row(t), n, ctx.config.norm_eps);
    float* pre = out_mix.pre.row(t);
    float* post = out_mix.post.row(t);
    float* C = out_mix.comb.row(t);
    for (int64_t j = 0; j < hc; ++j) {
      pre[j] = sigmoid(m[static_cast<size_t>(j)] * s[0] + b[j]) + eps;  // not normalised to sum 1
      post[j] = 2.0f * sigmoid(m[static_cast<size_t>(hc + j)] * s[1] + b[hc + j]);
    }
    for (int64_t jk = 0; jk < hc * hc; ++jk) C[jk] = m[static_cast<size_t>(2 * hc + jk)] * s[2] + b[2 * hc + jk];
    sinkhorn_inplace(C, hc, ctx.config.hc_sinkhorn_iters, ctx.config.hc_eps);
    weighted_copies(ctx, pre, R.row(t), hc, dim, x.row(t));
  }
  return x;
}

Mat hc_post(const Context& ctx, const Mat& F, const Mat& R, const HcMix& mix) {
  const int64_t hc = ctx.config.hc_mult;
  const int64_t dim = F.cols;
  DSV4_ASSERT(R.rows == F.rows, "hc_post: F and R token counts differ");
  DSV4_ASSERT(R.cols == hc * dim, "hc_post: residual width != hc_mult * F width");
  DSV4_ASSERT(mix.post.rows == F.rows && mix.post.cols == hc, "hc_post: post must be [T, hc]");
  DSV4_ASSERT(mix.comb.rows == F.rows && mix.comb.cols == hc * hc, "hc_post: comb must be [T, hc * hc]");
  Mat out(R.rows, R.cols);
  for (int64_t t = 0; t < R.rows; ++t) {
    const float* post = mix.post.row(t);
    const float* C = mix.comb.row(t);
    const float* Rt = R.row(t);
    for (int64_t k = 0; k < hc; ++k) {
      for (int64_t i = 0; i < dim; ++i) {
        // Output copy k takes column k of C.
        double acc = static_cast<double>(post[k] * F.at(t, i));
        for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(C[j * hc + k] * Rt[j * dim + i]);
        out.at(t, k * dim + i) = ctx.act(static_cast<float>(acc));
      }
    }
  }
  return out;
}

Mat hc_head(const Context& ctx, const Mat& R, const Mat& fn, const Mat& base, const Mat& scale) {
  const int64_t hc = ctx.config.hc_mult;
  const int64_t n = R.cols;
  const int64_t dim = n / hc;
  DSV4_ASSERT(dim * hc == n, "hc_head: residual width is not hc_mult * dim");
  DSV4_ASSERT(fn.rows == hc, "hc_head: fn must have hc rows");
  DSV4_ASSERT(fn.cols == n, "hc_head: fn width != residual width");
  DSV4_ASSERT(base.size() == hc, "hc_head: base must hold hc values");
  DSV4_ASSERT(scale.size() == 1, "hc_head: scale is a single value");
  const float eps = static_cast<float>(ctx.config.hc_eps);
  Mat y(R.rows, dim);
  std::vector<float> pre(static_cast<size_t>(hc));
  for (int64_t t = 0; t < R.rows; ++t) {
    const std::vector<float> m = mix_logits(fn, R.row(t), n, ctx.config.norm_eps);
    for (int64_t j = 0; j < hc; ++j) {
      pre[static_cast<size_t>(j)] = sigmoid(m[static_cast<size_t>(j)] * scale.data[0] + base.data[static_cast<size_t>(j)]) + eps;
    }
    weighted_copies(ctx, pre.data(), R.row(t), hc, dim, y.row(t));
  }
  return y;
}

}  // namespace dsv4::ref
