// CUDA (and, through port.h, HIP) implementation of kernels/mhc.h: hc_pre (Sinkhorn included),
// hc_post and hc_head. The arithmetic is the host kernels' (kernels/host/mhc.cpp), operation for
// operation and in the same order, so the results are equal bit for bit (kernels/cuda/libm.h: the
// rounded operations and glibc's expf; mhc_math.h: the sigmoid).
//
// hc_pre / hc_head: two kernels.
//   1. Σ v² over the token's hc*d residual values and each mix k's dot product with fn row k, in f64
//      in the reference's mix order: a block per token and batch of four sums, whose thread l sums
//      the terms i ≡ l (mod 256); the 256 partial sums fold by halving in shared memory, and the sums
//      go to stream-ordered scratch. Then one block per token:
//   2. r = f32(1 / sqrt(Σ v² / n + norm_eps)); m_k = f32(dot_k) * r.
//   3. The pre weights (and, for hc_pre, post and the hc x hc logits C) per j; warp 0 runs the
//      Sinkhorn iterations on C in shared memory, a lane per row or column, each in the host's order.
//   4. x_i = bf16(Σ_j pre_j R_j,i) (f64 sum over j in order), a thread per i.
// hc_post: a thread per (token, i) computes the hc outputs R'_k,i (f64 sums over j in order).
#include "kernels/mhc.h"
#include "kernels/cuda/port.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "engine/core/formats.h"
#include "kernels/cuda/mhc_math.h"

namespace dsv4::kernels::cuda {

namespace {

using namespace gpu_math;  // rounded operations, glibc's expf
using mhc_gpu::sigmoid;

constexpr int kThreads = 256;  // a multiple of 64: whole warps on CUDA and on wave64

// The reference's summation order for the mixes (reference/mhc.cpp): lane l of kMixLanes adds the
// terms i ≡ l (mod kMixLanes) in ascending i, then the lanes fold by halving (lane l += lane l + s for
// s = kMixLanes / 2, ..., 1). A block of the sums kernel is kMixLanes threads, thread l being lane l,
// and reduces one batch of kMixBatch sums of one token, folded together in shared memory.
constexpr int kMixLanes = 256;
constexpr int kMixBatch = 4;
static_assert(kThreads == kMixLanes, "one thread per lane of the mix order");

// Divides each row (by_rows) or column of the hc x hc matrix C by f32(its f64 sum + eps). Rows (or
// columns) are independent: lane l of warp 0 takes rows l, l + kWarpSize, ...
__device__ void normalise(float* C, int64_t hc, double eps, bool by_rows, int lane) {
  for (int64_t a = lane; a < hc; a += gpu::kWarpSize) {
    double sum = 0.0;
    for (int64_t b = 0; b < hc; ++b) sum = dadd(sum, static_cast<double>(by_rows ? C[a * hc + b] : C[b * hc + a]));
    const auto denom = static_cast<float>(dadd(sum, eps));
    for (int64_t b = 0; b < hc; ++b) {
      float& c = by_rows ? C[a * hc + b] : C[b * hc + a];
      c = fdiv(c, denom);
    }
  }
  gpu::sync_lanes();
}

// Row softmax (max-subtracted) + eps, a column normalisation, then (iters - 1) x (row, column). Run
// by every lane of warp 0, each row's and column's operations in the host's order.
__device__ void sinkhorn(float* C, int64_t hc, int64_t iters, double eps, int lane) {
  for (int64_t j = lane; j < hc; j += gpu::kWarpSize) {
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
  gpu::sync_lanes();
  normalise(C, hc, eps, /*by_rows=*/false, lane);
  for (int64_t it = 1; it < iters; ++it) {
    normalise(C, hc, eps, /*by_rows=*/true, lane);
    normalise(C, hc, eps, /*by_rows=*/false, lane);
  }
}

// Dynamic shared memory of the mix kernel: f32 m[mixes], pre[hc] and C[hc * hc] (hc_pre only).
size_t mix_smem_bytes(int64_t hc, int64_t mixes, bool head) {
  return static_cast<size_t>(mixes + hc + (head ? 0 : hc * hc)) * sizeof(float);
}

// Block (t, b): sums q = kMixBatch b .. + kMixBatch - 1 of token t into sums[t][q], where sum 0 is
// Σ v² and sum q >= 1 mix q - 1's dot product with fn row q - 1 (mixes + 1 sums per token).
__global__ void __launch_bounds__(kMixLanes) mix_sums_kernel(const uint16_t* R, const float* fn, int64_t n,
                                                             int64_t mixes, double* sums) {
  __shared__ double fold[kMixBatch][kMixLanes];
  const int64_t t = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kMixBatch;
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t count = mixes + 1 - q0 < kMixBatch ? mixes + 1 - q0 : kMixBatch;
  const uint16_t* row = R + t * n;
  double acc[kMixBatch];
#pragma unroll
  for (int j = 0; j < kMixBatch; ++j) acc[j] = 0.0;
#pragma unroll 4
  for (int64_t i = lane; i < n; i += kMixLanes) {
    const float v = bf16_to_f32(row[i]);
#pragma unroll
    for (int j = 0; j < kMixBatch; ++j) {
      if (j < count) {
        const int64_t q = q0 + j;
        const double term = q == 0 ? dmul(static_cast<double>(v), static_cast<double>(v))
                                   : static_cast<double>(fmul(fn[(q - 1) * n + i], v));
        acc[j] = dadd(acc[j], term);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMixBatch; ++j) fold[j][lane] = acc[j];
  __syncthreads();
  for (int s = kMixLanes / 2; s >= 1; s /= 2) {
    for (int e = lane; e < kMixBatch * s; e += kMixLanes) {
      const int j = e / s, l = e % s;
      fold[j][l] = dadd(fold[j][l], fold[j][l + s]);
    }
    __syncthreads();
  }
  if (lane < count) sums[t * (mixes + 1) + q0 + lane] = fold[lane][0];
}

// kHead = false: hc_pre (mixes = (2 + hc) hc, scale[3]; writes x, post, comb).
// kHead = true: hc_head (mixes = hc, scale[1]; writes x = y only).
// One block per token, from the token's sums (mix_sums_kernel).
template <bool kHead>
__global__ void __launch_bounds__(kThreads) mix_kernel(const uint16_t* R, const double* sums, const float* base,
                                                      const float* scale, int64_t hc, int64_t dim, double hc_eps,
                                                      double norm_eps, int64_t sinkhorn_iters, uint16_t* x,
                                                      float* post, float* comb) {
  extern __shared__ float smem[];
  const int64_t t = blockIdx.x;
  const int64_t n = hc * dim;
  const int64_t mixes = kHead ? hc : (2 + hc) * hc;
  const int tid = static_cast<int>(threadIdx.x);
  float* m = smem;
  float* pre = m + mixes;
  float* C = pre + hc;
  const uint16_t* row = R + t * n;
  const double* token_sums = sums + t * (mixes + 1);  // [0]: Σ v², [1 + k]: mix k's dot product

  // 2. The inverse RMS scales only the mixes (every thread computes the same r).
  const auto r = static_cast<float>(ddiv(1.0, dsqrt(dadd(ddiv(token_sums[0], static_cast<double>(n)), norm_eps))));
  for (int64_t k = tid; k < mixes; k += blockDim.x) m[k] = fmul(static_cast<float>(token_sums[1 + k]), r);
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
  if (!kHead && tid < gpu::kWarpSize) sinkhorn(C, hc, sinkhorn_iters, hc_eps, tid);
  // 4. x = bf16(Σ_j pre_j R_j): f64 sum of the f32 products, rounded once.
  for (int64_t i = tid; i < dim; i += blockDim.x) {
    double acc = 0.0;
    for (int64_t j = 0; j < hc; ++j) acc = dadd(acc, static_cast<double>(fmul(pre[j], bf16_to_f32(row[j * dim + i]))));
    x[t * dim + i] = f32_to_bf16(static_cast<float>(acc));
  }
  if (!kHead) {
    __syncthreads();  // warp 0's Sinkhorn is done
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

// Launches the sums kernel (a block per token and batch of sums, so a decode batch fills the GPU)
// and the mix kernel for T tokens; more than the default 48 KiB of shared memory (hc beyond about
// 77) is asked for explicitly.
template <bool kHead>
void launch_mix(const Tensor& R, const Tensor& fn, const Tensor& base, const Tensor& scale, double hc_eps,
                double norm_eps, int64_t sinkhorn_iters, int64_t hc, int64_t dim, uint16_t* x, float* post,
                float* comb, gpu::Stream stream, const char* op) {
  const int64_t tokens = R.size(0);
  if (tokens == 0) return;
  const int64_t mixes = kHead ? hc : (2 + hc) * hc;
  const int64_t batches = (mixes + kMixBatch) / kMixBatch;
  if (batches > 65535) throw std::invalid_argument(std::string(op) + ": hc too large for the GPU's sums grid");
  gpu::Scratch sums(static_cast<size_t>(tokens * (mixes + 1)) * sizeof(double), stream);
  mix_sums_kernel<<<dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(batches)), kMixLanes, 0, stream>>>(
      R.data<const uint16_t>(), fn.data<const float>(), hc * dim, mixes, sums.as<double>());
  gpu::check_launch(op);
  const size_t smem = mix_smem_bytes(hc, mixes, kHead);
  if (smem > 48 * 1024) gpu::allow_smem(mix_kernel<kHead>, smem, op);
  mix_kernel<kHead><<<static_cast<unsigned>(tokens), kThreads, smem, stream>>>(
      R.data<const uint16_t>(), sums.as<double>(), base.data<const float>(), scale.data<const float>(), hc, dim,
      hc_eps, norm_eps, sinkhorn_iters, x, post, comb);
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
