#include "reference/linear.h"

#include "engine/core/formats.h"
#include "reference/quant.h"

namespace dsv4::ref {

Mat linear(const Context& ctx, const Mat& x, const Mat& w, LinearKind kind) {
  DSV4_ASSERT(x.cols == w.cols, "linear: input width " + std::to_string(x.cols) + " != weight width " + std::to_string(w.cols));
  const bool quant = ctx.numerics.quant();
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
