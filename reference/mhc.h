// mHC, the manifold-constrained hyper-connections (dsv4-model §4.1, §4.2). The residual stream holds
// hc_mult copies of the hidden state; each sub-block reads a sigmoid-weighted mix of the copies
// (hc_pre) and writes back through post weights and a Sinkhorn-normalised mixing matrix (hc_post).
// The head reads the copies through sigmoid weights only (hc_head).
//
// The residual R of T tokens is a Mat [T, hc_mult * dim], copy-major per token: copy c of token t
// is R.row(t)[c * dim, (c + 1) * dim). All mixing math is fp32 with fp64 accumulation; each output
// is rounded once to the activation dtype.
#pragma once

#include <cstdint>

#include "reference/context.h"
#include "reference/tensor.h"

namespace dsv4::ref {

// The mixes hc_pre computes for one sub-block, reused by its hc_post.
struct HcMix {
  Mat pre;   // [T, hc]
  Mat post;  // [T, hc]
  Mat comb;  // [T, hc * hc], C[j][k] at column j * hc + k (row j = source copy, column k = output copy)
};

// x = Σ_j pre_j R_j, rounded to the activation dtype. fn [mix, hc * dim], base [1, mix], scale [1, 3],
// mix = (2 + hc) * hc. `mix` receives pre, post and the normalised C (may be null).
Mat hc_pre(const Context& ctx, const Mat& R, const Mat& fn, const Mat& base, const Mat& scale, HcMix* mix);

// R'_k = post_k F + Σ_j C[j][k] R_j for every output copy k: F [T, dim], R [T, hc * dim]. Summed in
// fp64 from the fp32 terms, rounded once.
Mat hc_post(const Context& ctx, const Mat& F, const Mat& R, const HcMix& mix);

// y = Σ_j pre_j R_j with pre = sigmoid(m * scale + base) + hc_eps, no Sinkhorn, no post.
// fn [hc, hc * dim], base [1, hc], scale [1, 1].
Mat hc_head(const Context& ctx, const Mat& R, const Mat& fn, const Mat& base, const Mat& scale);

// §4.1 step 6 on one row-major hc x hc matrix of logits: row softmax, + eps, column normalisation;
// then iters - 1 times a row then a column normalisation (each divides by the sum + eps). The last
// step is a column one, so columns sum to 1 up to eps and rounding.
void sinkhorn_inplace(float* C, int64_t hc, int64_t iters, double eps);

}  // namespace dsv4::ref
