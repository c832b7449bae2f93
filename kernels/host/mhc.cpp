// Entry points and host implementations of hc_pre / hc_post / hc_head (dsv4-model §4.1, §4.2): one
// "thread block" per token, replaying reference/mhc.cpp's arithmetic (f64 accumulations in a fixed
// order, fp32 sigmoid via an f64 exp) so the results are equal to the reference bit for bit. GPU
// tensors go to kernels/cuda/mhc.cu, which performs the same operations in the same order.
#include "kernels/mhc.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

float sigmoid(float z) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(z)))); }

// The reference's summation order for the mixes (reference/mhc.cpp): 256 lanes, lane l adding the
// terms i ≡ l (mod 256) in ascending i, then folded by halving (lane l += lane l + s, s = 128 .. 1).
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

// Upcasts token t's copies into v and returns the mixes m = (fn · v) * rsqrt(mean(v²) + norm_eps).
// The RMS scales only the mixes: R itself is never normalised (§4.1 steps 1-2).
void mix_logits(const uint16_t* r_row, int64_t n, const float* fn, int64_t mixes, double norm_eps, float* v,
                float* m) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_to_f32(r_row[i]);
  const double sum_sq = mix_sum(n, [&](int64_t i) { return static_cast<double>(v[i]) * v[i]; });
  const auto r = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(n) + norm_eps));
  for (int64_t k = 0; k < mixes; ++k) {
    const float* a = fn + k * n;
    m[k] = static_cast<float>(mix_sum(n, [&](int64_t i) { return static_cast<double>(a[i] * v[i]); })) * r;
  }
}

// out = bf16(Σ_j w_j R_j) for one token: f64 sum of f32 products, rounded once.
void weighted_copies(const float* w, const float* v, int64_t hc, int64_t dim, uint16_t* out) {
  for (int64_t i = 0; i < dim; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(w[j] * v[j * dim + i]);
    out[i] = f32_to_bf16(static_cast<float>(acc));
  }
}

// Divides each row (by_rows) or column of the hc x hc matrix by its f64 sum + eps, rounded to f32.
void normalise(float* C, int64_t hc, double eps, bool by_rows) {
  for (int64_t a = 0; a < hc; ++a) {
    double sum = 0.0;
    for (int64_t b = 0; b < hc; ++b) sum += by_rows ? C[a * hc + b] : C[b * hc + a];
    const auto denom = static_cast<float>(sum + eps);
    for (int64_t b = 0; b < hc; ++b) (by_rows ? C[a * hc + b] : C[b * hc + a]) /= denom;
  }
}

// §4.1 step 6: row softmax (max-subtracted) + eps, a column normalisation, then (iters - 1) x (row,
// column); the last step is a column one.
void sinkhorn(float* C, int64_t hc, int64_t iters, double eps) {
  for (int64_t j = 0; j < hc; ++j) {
    float* row = C + j * hc;
    const float mx = *std::max_element(row, row + hc);
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

// hc from R and the [T, d] activation; the rest of each contract depends on it, so it is built per call.
int64_t copies_of(const char* op, const Tensor& R, const char* act_name, const Tensor& act) {
  Contract(op)
      .arg("R").dtype(DType::bf16).rank(2).contiguous()
      .arg(act_name).dtype(DType::bf16).rank(2).contiguous().same_size(0, "R", 0)
      .check({{"R", &R}, {act_name, &act}});
  const int64_t dim = act.size(1);
  if (dim < 1 || R.size(1) < dim || R.size(1) % dim != 0) {
    throw ContractError(op, "R", "needs shape[1] = hc * " + std::string(act_name) + ".shape[1] with hc >= 1, got R " +
                                     shape_str(R.shape()) + ", " + act_name + " " + shape_str(act.shape()));
  }
  return R.size(1) / dim;
}

}  // namespace

void hc_pre(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
            double norm_eps, int64_t sinkhorn_iters, Tensor& x, Tensor& post, Tensor& comb) {
  const int64_t hc = copies_of(kHcPreOp, R, "x", x);
  const int64_t n = R.size(1);
  const int64_t dim = n / hc;
  const int64_t mixes = (2 + hc) * hc;
  Contract(kHcPreOp)
      .arg("R").rank(2)
      .arg("fn").dtype(DType::f32).rank(2).contiguous().dim(0, mixes).dim(1, n)
      .arg("base").dtype(DType::f32).rank(1).contiguous().dim(0, mixes)
      .arg("scale").dtype(DType::f32).rank(1).contiguous().dim(0, 3)
      .arg("post").dtype(DType::f32).rank(2).contiguous().same_size(0, "R", 0).dim(1, hc)
      .arg("comb").dtype(DType::f32).rank(3).contiguous().same_size(0, "R", 0).dim(1, hc).dim(2, hc)
      .check({{"R", &R}, {"fn", &fn}, {"base", &base}, {"scale", &scale}, {"post", &post}, {"comb", &comb}});
  if (sinkhorn_iters < 1) {
    throw ContractError(kHcPreOp, "sinkhorn_iters", "must be >= 1, got " + std::to_string(sinkhorn_iters));
  }
  if (runs_on_gpu(kHcPreOp, {{"R", &R}, {"fn", &fn}, {"base", &base}, {"scale", &scale}, {"x", &x},
                             {"post", &post}, {"comb", &comb}})) {
    DSV4_GPU_OR_FAIL(kHcPreOp, cuda::hc_pre(R, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters, x, post, comb, current_stream()));
  }
  const float* b = base.data<float>();
  const float* s = scale.data<float>();
  const auto eps = static_cast<float>(hc_eps);
  std::vector<float> v(static_cast<size_t>(n));
  std::vector<float> m(static_cast<size_t>(mixes));
  std::vector<float> pre(static_cast<size_t>(hc));
  for (int64_t t = 0; t < R.size(0); ++t) {
    mix_logits(R.data<const uint16_t>() + t * n, n, fn.data<float>(), mixes, norm_eps, v.data(), m.data());
    float* pt = post.data<float>() + t * hc;
    float* C = comb.data<float>() + t * hc * hc;
    for (int64_t j = 0; j < hc; ++j) {
      pre[static_cast<size_t>(j)] = sigmoid(m[static_cast<size_t>(j)] * s[0] + b[j]) + eps;  // not normalised to 1
      pt[j] = 2.0f * sigmoid(m[static_cast<size_t>(hc + j)] * s[1] + b[hc + j]);
    }
    for (int64_t jk = 0; jk < hc * hc; ++jk) C[jk] = m[static_cast<size_t>(2 * hc + jk)] * s[2] + b[2 * hc + jk];
    sinkhorn(C, hc, sinkhorn_iters, hc_eps);
    weighted_copies(pre.data(), v.data(), hc, dim, x.data<uint16_t>() + t * dim);
  }
}

void hc_post(const Tensor& F, const Tensor& R, const Tensor& post, const Tensor& comb, Tensor& R_out) {
  const int64_t hc = copies_of(kHcPostOp, R, "F", F);
  const int64_t n = R.size(1);
  const int64_t dim = n / hc;
  Contract(kHcPostOp)
      .arg("R").rank(2)
      .arg("post").dtype(DType::f32).rank(2).contiguous().same_size(0, "R", 0).dim(1, hc)
      .arg("comb").dtype(DType::f32).rank(3).contiguous().same_size(0, "R", 0).dim(1, hc).dim(2, hc)
      .arg("R_out").dtype(DType::bf16).rank(2).contiguous().same_size(0, "R", 0).dim(1, n)
      .check({{"R", &R}, {"post", &post}, {"comb", &comb}, {"R_out", &R_out}});
  const bool gpu = runs_on_gpu(kHcPostOp, {{"F", &F}, {"R", &R}, {"post", &post}, {"comb", &comb}, {"R_out", &R_out}});
  if (R_out.data_ptr() == R.data_ptr()) {
    // Every output copy reads all input copies: in place would read overwritten values.
    throw ContractError(kHcPostOp, "R_out", "must not alias R");
  }
  if (gpu) {
    DSV4_GPU_OR_FAIL(kHcPostOp, cuda::hc_post(F, R, post, comb, R_out, current_stream()));
  }
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t t = 0; t < R.size(0); ++t) {
    const uint16_t* rt = R.data<const uint16_t>() + t * n;
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = bf16_to_f32(rt[i]);
    const uint16_t* ft = F.data<const uint16_t>() + t * dim;
    const float* pt = post.data<float>() + t * hc;
    const float* C = comb.data<float>() + t * hc * hc;
    uint16_t* out = R_out.data<uint16_t>() + t * n;
    for (int64_t k = 0; k < hc; ++k) {
      for (int64_t i = 0; i < dim; ++i) {
        // Output copy k takes column k of C.
        double acc = static_cast<double>(pt[k] * bf16_to_f32(ft[i]));
        for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(C[j * hc + k] * v[static_cast<size_t>(j * dim + i)]);
        out[k * dim + i] = f32_to_bf16(static_cast<float>(acc));
      }
    }
  }
}

void hc_head(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
             double norm_eps, Tensor& y) {
  const int64_t hc = copies_of(kHcHeadOp, R, "y", y);
  const int64_t n = R.size(1);
  const int64_t dim = n / hc;
  Contract(kHcHeadOp)
      .arg("fn").dtype(DType::f32).rank(2).contiguous().dim(0, hc).dim(1, n)
      .arg("base").dtype(DType::f32).rank(1).contiguous().dim(0, hc)
      .arg("scale").dtype(DType::f32).rank(1).contiguous().dim(0, 1)
      .check({{"fn", &fn}, {"base", &base}, {"scale", &scale}});
  if (runs_on_gpu(kHcHeadOp, {{"R", &R}, {"fn", &fn}, {"base", &base}, {"scale", &scale}, {"y", &y}})) {
    DSV4_GPU_OR_FAIL(kHcHeadOp, cuda::hc_head(R, fn, base, scale, hc_eps, norm_eps, y, current_stream()));
  }
  const float* b = base.data<float>();
  const float s = scale.data<float>()[0];
  const auto eps = static_cast<float>(hc_eps);
  std::vector<float> v(static_cast<size_t>(n));
  std::vector<float> m(static_cast<size_t>(hc));
  for (int64_t t = 0; t < R.size(0); ++t) {
    mix_logits(R.data<const uint16_t>() + t * n, n, fn.data<float>(), hc, norm_eps, v.data(), m.data());
    for (int64_t j = 0; j < hc; ++j) m[static_cast<size_t>(j)] = sigmoid(m[static_cast<size_t>(j)] * s + b[j]) + eps;
    weighted_copies(m.data(), v.data(), hc, dim, y.data<uint16_t>() + t * dim);
  }
}

}  // namespace dsv4::kernels
