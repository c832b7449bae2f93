// RMSNorm (dsv4-model §0): upcast to fp32, x * rsqrt(mean(x^2) + eps) * w, cast back to the
// activation dtype. The per-head query norm is the same without a weight.
#pragma once

#include "reference/context.h"
#include "reference/tensor.h"

namespace dsv4::ref {

// Every row of x [T, n] with weight [1, n].
Mat rms_norm(const Context& ctx, const Mat& x, const Mat& weight);
// In place on x [T, heads * head_dim]: each head's head_dim values, no weight (the q path, §2.1).
void head_rms_norm_inplace(const Context& ctx, Mat& x, int64_t heads, int64_t head_dim);

}  // namespace dsv4::ref
