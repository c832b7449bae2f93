// mHC, the manifold-constrained hyper-connections (dsv4-model §4.1, §4.2). The residual R of T tokens
// is [T, hc * d] bf16, copy-major per token (copy c of token t at R[t, c d : (c + 1) d]); hc is
// R.shape[1] / d with d the width of x / F / y, and mix = (2 + hc) * hc.
//
// hc_pre, per token (fp32 math, f64 accumulation; bit for bit reference/mhc.cpp):
//   r = f32(1 / sqrt(Σ v² / (hc d) + norm_eps)) over the upcast copies v (f64 sum);
//   m_k = f32(fn_k · v) * r, the dot as f32 products summed in f64 over 8 interleaved lanes;
//   pre_j = sigmoid(m_j s0 + b_j) + hc_eps; post_j = 2 sigmoid(m_{hc+j} s1 + b_{hc+j});
//   C[j][k] = m_{2hc + j hc + k} s2 + b_{...}, then Sinkhorn: row softmax + hc_eps, a column
//   normalisation, then (iters - 1) x (row, column), each dividing by (sum + hc_eps);
//   x = bf16(Σ_j pre_j R_j) (f64 sum of the f32 products). Outputs x, post [T, hc], comb [T, hc, hc]
//   (comb[t, j, k] = C[j][k]: row j = source copy, column k = output copy).
// hc_post: R'[t, k d + i] = bf16(post_k F_i + Σ_j C[j][k] R_j,i), f64 sum of f32 products.
// hc_head: pre_j = sigmoid(m_j scale[0] + base_j) + hc_eps with fn [hc, hc d]; y = bf16(Σ_j pre_j R_j).
//
// Contracts (ContractError naming the argument and the rule; all tensors on one device, all
// contiguous):
//   R bf16 [T, hc d] with d >= 1, hc >= 1 (R.shape[1] a multiple of d); fn f32 [mix, hc d] (hc_head:
//   [hc, hc d]); base f32 [mix] ([hc]); scale f32 [3] ([1]); sinkhorn_iters >= 1; x / F / y bf16 [T, d];
//   post f32 [T, hc]; comb f32 [T, hc, hc]; R' bf16 [T, hc d], not aliasing R.
//
// Each entry point checks its contract, then runs the host loops (kernels/host/mhc.cpp) for host
// tensors or the CUDA kernels (kernels/cuda/mhc.cu) on current_stream() for GPU tensors. The two are
// equal bit for bit: the kernels perform the host's operations in the host's order, and their exp
// reproduces the host libm's (kernels/cuda/libm.h says how, and where that could fail).
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

namespace dsv4::kernels {

inline constexpr const char* kHcPreOp = "hc_pre";
inline constexpr const char* kHcPostOp = "hc_post";
inline constexpr const char* kHcHeadOp = "hc_head";

void hc_pre(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
            double norm_eps, int64_t sinkhorn_iters, Tensor& x, Tensor& post, Tensor& comb);

void hc_post(const Tensor& F, const Tensor& R, const Tensor& post, const Tensor& comb, Tensor& R_out);

void hc_head(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
             double norm_eps, Tensor& y);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
// The CUDA implementations, enqueued on `stream` (a cudaStream_t; nullptr is the default stream) and
// asynchronous. The entry points above call them after checking the contract; they check nothing.
namespace dsv4::kernels::cuda {
void hc_pre(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
            double norm_eps, int64_t sinkhorn_iters, Tensor& x, Tensor& post, Tensor& comb, void* stream);
void hc_post(const Tensor& F, const Tensor& R, const Tensor& post, const Tensor& comb, Tensor& R_out, void* stream);
void hc_head(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
             double norm_eps, Tensor& y, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
