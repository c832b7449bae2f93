// CUDA (and, through port.h, HIP) implementation of kernels/mhc.h: hc_pre (Sinkhorn included),
// hc_post and hc_head. The arithmetic is the host kernels' (kernels/host/mhc.cpp), operation for
// operation and in the same order, so the results are equal bit for bit (kernels/cuda/libm.h: the
// rounded operations and glibc's expf; mhc_math.h: the sigmoid).
//
// hc_pre / hc_head: one block per token.
//   1. Thread 0 sums the squares of the token's hc*d residual values in f64 in index order (the
//      host's order: one sequential chain), while thread 1 + k computes mix k's dot product with
//      fn row k over the host's eight interleaved f64 lanes and its fixed pairwise combine.
//   2. r = f32(1 / sqrt(Σ v² / n + norm_eps)); m_k = f32(dot_k) * r.
//   3. The pre weights (and, for hc_pre, post and the hc x hc logits C) per j; thread 0 runs the
//      Sinkhorn iterations on C in shared memory, the host's loops in the host's order.
//   4. x_i = bf16(Σ_j pre_j R_j,i) (f64 sum over j in order), a thread per i.
// hc_post: a thread per (token, i) computes the hc outputs R'_k,i (f64 sums over j in order).
#include "kernels/mhc.h"
#include "kernels/cuda/port.h"

#include <cstdint>
#include <stdexcept>

#include "engine/core/formats.h"
#include "kernels/cuda/mhc_math.h"

namespace dsv4::kernels::cuda {

namespace {

using namespace gpu_math;  // rounded operations, glibc's expf
using mhc_gpu::sigmoid;

constexpr int kThreads = 256;  // a multiple of 64: whole warps on CUDA and on wave64

// f32 products a_i * v_i (v from bf16) summed in f64 over eight interleaved lanes (element i in lane
// i % 8, in index order), then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
__device__ double dot8(const float* a, const uint16_t* v, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = dadd(acc[j], static_cast<double>(fmul(a[i + j], bf16_to_f32(v[i + j]))));
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (i + j < n) acc[j] = dadd(acc[j], static_cast<double>(fmul(a[i + j], bf16_to_f32(v[i + j]))));
  }
  return dadd(dadd(dadd(acc[0], acc[1]), dadd(acc[2], acc[3])), dadd(dadd(acc[4], acc[5]), dadd(acc[6], acc[7])));
}

// Divides each row (by_rows) or column of the hc x hc matrix C by f32(its f64 sum + eps).
__device__ void normalise(float* C, int64_t hc, double eps, bool by_rows) {
  for (int64_t a = 0; a < hc; ++a) {
    double sum = 0.0;
    for (int64_t b = 0; b < hc; ++b) sum = dadd(sum, static_cast<double>(by_rows ? C[a * hc + b] : C[b * hc + a]));
    const auto denom = static_cast<float>(dadd(sum, eps));
    for (int64_t b = 0; b < hc; ++b) {
      float& c = by_rows ? C[a * hc + b] : C[b * hc + a];
      c = fdiv(c, denom);
    }
  }
}

// Row softmax (max-subtracted) + eps, a column normalisation, then (iters - 1) x (row, column).
__device__ void sinkhorn(float* C, int64_t hc, int64_t iters, double eps) {
  for (int64_t j = 0; j < hc; ++j) {
    float* row = C + j * hc;
    float mx = row[0];  // std::max_element: the first of the largest
    for (int64_t k = 1; k < hc; ++k) mx = mx < row[k] ? row[k] : mx;
    double sum = 0.0;
    for (int64_t k = 0; k < hc; ++k) {
      row[k] = libm_expf(fsub(row[k], mx));
      sum = dadd(sum, static_cast<double>(row[k]));
    }
    for (int64_t k = 0; k < hc; ++k) row[k] = static_cast<float>(dadd(ddiv(static_cast<double>(row[k]), sum), eps));
  }
  normalise(C, hc, eps, /*by_rows=*/false);
  for (int64_t it = 1; it < iters; ++it) {
    normalise(C, hc, eps, /*by_rows=*/true);
    normalise(C, hc, eps, /*by_rows=*/false);
  }
}

// Dynamic shared memory of the mix kernel: f64 dot[mixes], f64 sum_sq, then f32 m[mixes], pre[hc],
// C[hc * hc] (hc_pre only) and r.
size_t mix_smem_bytes(int64_t hc, int64_t mixes, bool head) {
  return static_cast<size_t>(mixes + 1) * sizeof(double) +
         static_cast<size_t>(mixes + hc + (head ? 0 : hc * hc) + 1) * sizeof(float);
}

// kHead = false: hc_pre (mixes = (2 + hc) hc, scale[3]; writes x, post, comb).
// kHead = true: hc_head (mixes = hc, scale[1]; writes x = y only).
template <bool kHead>
__global__ void __launch_bounds__(kThreads) mix_kernel(const uint16_t* R, const float* fn, const float* base,
                                                      const float* scale, int64_t hc, int64_t dim, double hc_eps,
                                                      double norm_eps, int64_t sinkhorn_iters, uint16_t* x,
                                                      float* post, float* comb) {
  extern __shared__ double smem[];
  const int64_t t = blockIdx.x;
  const int64_t n = hc * dim;
  const int64_t mixes = kHead ? hc : (2 + hc) * hc;
  const int tid = static_cast<int>(threadIdx.x);
  double* dot = smem;
  double* sum_sq = dot + mixes;
  float* m = reinterpret_cast<float*>(sum_sq + 1);
  float* pre = m + mixes;
  float* C = pre + hc;
  float* r_shared = C + (kHead ? 0 : hc * hc);
  const uint16_t* row = R + t * n;

  // 1. Σ v² (task 0, the longest chain, starts first) and the mixes' dot products (tasks 1..mixes).
  for (int64_t task = tid; task <= mixes; task += blockDim.x) {
    if (task == 0) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const auto v = static_cast<double>(bf16_to_f32(row[i]));
        acc = dadd(acc, dmul(v, v));
      }
      *sum_sq = acc;
    } else {
      dot[task - 1] = dot8(fn + (task - 1) * n, row, n);
    }
  }
  __syncthreads();
  // 2. The inverse RMS scales only the mixes.
  if (tid == 0) *r_shared = static_cast<float>(ddiv(1.0, dsqrt(dadd(ddiv(*sum_sq, static_cast<double>(n)), norm_eps))));
  __syncthreads();
  const float r = *r_shared;
  for (int64_t k = tid; k < mixes; k += blockDim.x) m[k] = fmul(static_cast<float>(dot[k]), r);
  __syncthreads();
  // 3. pre (not normalised to 1), post, and the Sinkhorn logits.
  const auto eps = static_cast<float>(hc_eps);
  for (int64_t j = tid; j < hc; j += blockDim.x) {
    pre[j] = fadd(sigmoid(fadd(fmul(m[j], scale[0]), base[j])), eps);
    if (!kHead) post[t * hc + j] = fmul(2.0f, sigmoid(fadd(fmul(m[hc + j], scale[1]), base[hc + j])));
  }
  if (!kHead) {
    for (int64_t jk = tid; jk < hc * hc; jk += blockDim.x) C[jk] = fadd(fmul(m[2 * hc + jk], scale[2]), base[2 * hc + jk]);
  }
  __syncthreads();
  if (!kHead && tid == 0) sinkhorn(C, hc, sinkhorn_iters, hc_eps);
  // 4. x = bf16(Σ_j pre_j R_j): f64 sum of the f32 products, rounded once.
  for (int64_t i = tid; i < dim; i += blockDim.x) {
    double acc = 0.0;
    for (int64_t j = 0; j < hc; ++j) acc = dadd(acc, static_cast<double>(fmul(pre[j], bf16_to_f32(row[j * dim + i]))));
    x[t * dim + i] = f32_to_bf16(static_cast<float>(acc));
  }
  if (!kHead) {
    __syncthreads();  // thread 0's Sinkhorn is done
    for (int64_t jk = tid; jk < hc * hc; jk += blockDim.x) comb[t * hc * hc + jk] = C[jk];
  }
}

// R'[t, k d + i] = bf16(post_k F_i + Σ_j C[j][k] R_j,i), a thread per (t, i).
__global__ void __launch_bounds__(kThreads) post_kernel(const uint16_t* F, const uint16_t* R, const float* post,
                                                       const float* comb, uint16_t* out, int64_t tokens,
                                                       int64_t hc, int64_t dim) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= tokens * dim) return;
  const int64_t t = g / dim;
  const int64_t i = g % dim;
  const int64_t n = hc * dim;
  const float f = bf16_to_f32(F[t * dim + i]);
  const uint16_t* rt = R + t * n;
  const float* pt = post + t * hc;
  const float* C = comb + t * hc * hc;
  for (int64_t k = 0; k < hc; ++k) {
    double acc = static_cast<double>(fmul(pt[k], f));
    for (int64_t j = 0; j < hc; ++j) acc = dadd(acc, static_cast<double>(fmul(C[j * hc + k], bf16_to_f32(rt[j * dim + i]))));
    out[t * n + k * dim + i] = f32_to_bf16(static_cast<float>(acc));
  }
}

// Launches the mix kernel for T tokens; more than the default 48 KiB of dynamic shared memory (hc
// beyond about 60) is asked for explicitly.
template <bool kHead>
void launch_mix(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
                double norm_eps, int64_t sinkhorn_iters, int64_t hc, int64_t dim, uint16_t* x, float* post,
                float* comb, gpu::Stream stream, const char* op) {
  const int64_t tokens = R.size(0);
  if (tokens == 0) return;
  const size_t smem = mix_smem_bytes(hc, kHead ? hc : (2 + hc) * hc, kHead);
  if (smem > 48 * 1024) {
#if defined(__HIPCC__)
    gpu::check(hipFuncSetAttribute(reinterpret_cast<const void*>(&mix_kernel<kHead>),
                                   hipFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               op);
#else
    gpu::check(cudaFuncSetAttribute(mix_kernel<kHead>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               op);
#endif
  }
  mix_kernel<kHead><<<static_cast<unsigned>(tokens), kThreads, smem, stream>>>(
      R.data<const uint16_t>(), fn.data<const float>(), base.data<const float>(), scale.data<const float>(), hc,
      dim, hc_eps, norm_eps, sinkhorn_iters, x, post, comb);
  gpu::check_launch(op);
}

}  // namespace

void hc_pre(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
            double norm_eps, int64_t sinkhorn_iters, Tensor& x, Tensor& post, Tensor& comb, void* stream) {
  const int64_t dim = x.size(1);
  const int64_t hc = R.size(1) / dim;
  launch_mix<false>(R, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters, hc, dim, x.data<uint16_t>(),
                    post.data<float>(), comb.data<float>(), static_cast<gpu::Stream>(stream), kHcPreOp);
}

void hc_post(const Tensor& F, const Tensor& R, const Tensor& post, const Tensor& comb, Tensor& R_out, void* stream) {
  const int64_t tokens = R.size(0);
  const int64_t dim = F.size(1);
  const int64_t hc = R.size(1) / dim;
  if (tokens == 0) return;
  const int64_t threads_needed = tokens * dim;
  post_kernel<<<gpu::blocks_for(threads_needed, kThreads), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      F.data<const uint16_t>(), R.data<const uint16_t>(), post.data<const float>(), comb.data<const float>(),
      R_out.data<uint16_t>(), tokens, hc, dim);
  gpu::check_launch(kHcPostOp);
}

void hc_head(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
             double norm_eps, Tensor& y, void* stream) {
  const int64_t dim = y.size(1);
  const int64_t hc = R.size(1) / dim;
  launch_mix<true>(R, fn, base, scale, hc_eps, norm_eps, /*sinkhorn_iters=*/0, hc, dim, y.data<uint16_t>(),
                   nullptr, nullptr, static_cast<gpu::Stream>(stream), kHcHeadOp);
}

}  // namespace dsv4::kernels::cuda
