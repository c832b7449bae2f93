#include "reference/linear.h"

#include "engine/core/formats.h"
#include "reference/quant.h"

namespace dsv4::ref {

Mat linear_w8a8_int8(const Mat& x, const Mat& w) {
  DSV4_ASSERT(x.cols == w.cols, "linear_w8a8_int8: input width " + std::to_string(x.cols) + " != weight width " + std::to_string(w.cols));
  const Int8Rows qw = int8_quantize_rows(w);  // per output channel
  const Int8Rows qx = int8_quantize_rows(x);  // per token
  Mat y(x.rows, w.rows);
  for (int64_t t = 0; t < x.rows; ++t) {
    const int8_t* a = qx.q.data() + t * x.cols;
    for (int64_t n = 0; n < w.rows; ++n) {
      const int8_t* b = qw.q.data() + n * w.cols;
      int64_t acc = 0;  // exact: no rounding before the conversion below
      for (int64_t k = 0; k < x.cols; ++k) acc += static_cast<int64_t>(a[k]) * b[k];
      const float scaled = static_cast<float>(acc) * qx.scales[static_cast<size_t>(t)];
      y.at(t, n) = round_bf16(scaled * qw.scales[static_cast<size_t>(n)]);
    }
  }
  return y;
}

Mat linear(const Context& ctx, const Mat& x, const Mat& w, LinearKind kind) {
  DSV4_ASSERT(x.cols == w.cols, "linear: input width " + std::to_string(x.cols) + " != weight width " + std::to_string(w.cols));
  const bool quant = ctx.numerics.quant();
  if (quant && ctx.numerics.linear == LinearQuant::w8a8_int8 && (kind == LinearKind::fp8 || kind == LinearKind::fp4)) {
    return linear_w8a8_int8(x, w);
  }
  Mat in = x;
  if (quant && (kind == LinearKind::fp8 || kind == LinearKind::fp4)) {
    fp8_quant_dequant_rows(in, ctx.config.act_block_size);
  }
  Mat y(x.rows, w.rows);
  for (int64_t t = 0; t < x.rows; ++t) {
    const float* xr = in.row(t);
    for (int64_t o = 0; o < w.rows; ++o) {
      y.at(t, o) = static_cast<float>(dot(xr, w.row(o), w.cols));
    }
  }
  if (quant && kind != LinearKind::f32) round_bf16_inplace(y);
  return y;
}

}  // namespace dsv4::ref
