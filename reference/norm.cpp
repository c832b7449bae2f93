#include "reference/norm.h"

#include <cmath>

namespace dsv4::ref {

namespace {

float inverse_rms(const float* x, int64_t n, double eps) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps));
}

}  // namespace

Mat rms_norm(const Context& ctx, const Mat& x, const Mat& weight) {
  DSV4_ASSERT(weight.size() == x.cols, "rms_norm: weight width != input width");
  Mat y(x.rows, x.cols);
  for (int64_t t = 0; t < x.rows; ++t) {
    const float r = inverse_rms(x.row(t), x.cols, ctx.config.norm_eps);
    for (int64_t i = 0; i < x.cols; ++i) y.at(t, i) = ctx.act(x.at(t, i) * r * weight.data[static_cast<size_t>(i)]);
  }
  return y;
}

void head_rms_norm_inplace(const Context& ctx, Mat& x, int64_t heads, int64_t head_dim) {
  DSV4_ASSERT(x.cols == heads * head_dim, "head_rms_norm: width != heads * head_dim");
  for (int64_t t = 0; t < x.rows; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x.row(t) + h * head_dim;
      // The official code does this on the bf16 tensor (each op rounded to bf16); one fp32 pass with
      // a final rounding differs only at bf16 noise level (dsv4-model §2.1).
      const float r = inverse_rms(v, head_dim, ctx.config.norm_eps);
      for (int64_t i = 0; i < head_dim; ++i) v[i] = ctx.act(v[i] * r);
    }
  }
}

}  // namespace dsv4::ref
