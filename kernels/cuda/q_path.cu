// CUDA (and, through port.h, HIP) implementation of kernels/q_path.h: one block per row (rms_norm)
// or per (token, head) (q_norm_rope_inplace, indexer_q), as the host kernels' loops. Every value is
// computed with the host's operations in the host's order (kernels/cuda/libm.h and
// norm_rope_math.h: RoPE through glibc's sinf / cosf, no fused multiply-adds), so results equal the
// host's bit for bit; the one difference is the order of the f64 sum of squares (see
// norm_rope_math.h).
#include "kernels/q_path.h"
#include "kernels/cuda/port.h"  // before formats.h: its device code needs the runtime header

#include <cmath>
#include <cstdint>
#include <string>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/norm_rope_math.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kRowThreads = 256;   // rms_norm rows (thousands of dims)
constexpr int kHeadThreads = 128;  // one head (a few hundred dims); a multiple of 64
constexpr int64_t kMaxSharedHeadDim = 8192;  // indexer_q's head in shared memory: 32 KiB of f32
constexpr float kInvE4m3Max = 1.0f / 448.0f;
constexpr float kInvE2m1Max = 1.0f / 6.0f;
constexpr float kE2m1MinAmax = 6.0f * 0x1.0p-126f;

// f32(1 / sqrt(mean(x^2) + eps)) of n bf16 codes over the whole block; every thread gets it.
__device__ float inverse_rms(const uint16_t* x, int64_t n, double eps, double* red) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = bf16_to_f32(x[i]);
    acc += static_cast<double>(v) * v;  // exact in f64 (fused or not)
  }
  return gpu::inverse_rms_from(gpu::block_sum_f64(acc, red), n, eps);
}

// Row t of x (row stride x_stride) into the dense row t of out. The sum's barriers order every read
// of the row before any write, and each element is then read and written by one thread, so out may
// be x itself (a contiguous x).
__global__ void rms_norm_kernel(const uint16_t* x, int64_t x_stride, const float* weight, double eps, uint16_t* out,
                                int64_t n) {
  __shared__ double red[gpu::kMaxWarps];
  const int64_t t = blockIdx.x;
  const uint16_t* xr = x + t * x_stride;
  const float r = inverse_rms(xr, n, eps, red);
  uint16_t* y = out + t * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    y[i] = f32_to_bf16(gpu_math::fmul(gpu_math::fmul(bf16_to_f32(xr[i]), r), weight[i]));
  }
}

// Head h of token t (block t * heads + h) at q + (t * heads + h) * head_dim: the weightless RMS over
// all head dims, bf16, then RoPE of the last rope_dim dims read from the bf16 normed values.
__global__ void q_norm_rope_kernel(uint16_t* q, int64_t heads, int64_t head_dim, int64_t rope_dim, double eps,
                                   const float* freqs, const int32_t* positions) {
  __shared__ double red[gpu::kMaxWarps];
  const int64_t th = blockIdx.x;
  uint16_t* x = q + th * head_dim;
  const float r = inverse_rms(x, head_dim, eps, red);
  const int64_t nope = head_dim - rope_dim;
  for (int64_t i = threadIdx.x; i < nope; i += blockDim.x) x[i] = f32_to_bf16(gpu_math::fmul(bf16_to_f32(x[i]), r));
  const int32_t pos = positions[th / heads];
  for (int64_t j = threadIdx.x; j < rope_dim / 2; j += blockDim.x) {
    const int64_t i = nope + 2 * j;
    const float a = round_bf16(gpu_math::fmul(bf16_to_f32(x[i]), r));
    const float b = round_bf16(gpu_math::fmul(bf16_to_f32(x[i + 1]), r));
    float ra, rb;
    gpu::rotate_pair(a, b, gpu::rope_angle(pos, freqs[j]), /*inverse=*/false, &ra, &rb);
    x[i] = f32_to_bf16(ra);
    x[i + 1] = f32_to_bf16(rb);
  }
}

// One (token, head) per block, the head in shared memory: RoPE -> bf16, the normalised Sylvester
// Walsh-Hadamard transform (butterfly stages, then * hadamard_scale) -> bf16, then quant-dequant in
// blocks of `block` (one thread per block, as host::fp4/fp8_quant_dequant_blocks) -> bf16.
__global__ void indexer_q_kernel(uint16_t* q, int64_t heads, int64_t head_dim, int64_t rope_dim, const float* freqs,
                                 const int32_t* positions, float hadamard_scale, bool fp8, int64_t block) {
  extern __shared__ float v[];  // head_dim floats
  const int64_t th = blockIdx.x;
  uint16_t* x = q + th * head_dim;
  for (int64_t i = threadIdx.x; i < head_dim; i += blockDim.x) v[i] = bf16_to_f32(x[i]);
  __syncthreads();
  const int64_t nope = head_dim - rope_dim;
  const int32_t pos = positions[th / heads];
  for (int64_t j = threadIdx.x; j < rope_dim / 2; j += blockDim.x) {
    const int64_t i = nope + 2 * j;
    float ra, rb;
    gpu::rotate_pair(v[i], v[i + 1], gpu::rope_angle(pos, freqs[j]), /*inverse=*/false, &ra, &rb);
    v[i] = round_bf16(ra);
    v[i + 1] = round_bf16(rb);
  }
  __syncthreads();
  // Stage h pairs (j, j + h) for every j with bit h clear, exactly the host loop's pairs.
  for (int64_t h = 1; h < head_dim; h *= 2) {
    for (int64_t p = threadIdx.x; p < head_dim / 2; p += blockDim.x) {
      const int64_t j = (p / h) * 2 * h + p % h;
      const float a = v[j];
      const float b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
    __syncthreads();
  }
  // The transform's scale, then the bf16 the reference's Hadamard op ends in.
  for (int64_t i = threadIdx.x; i < head_dim; i += blockDim.x) v[i] = round_bf16(gpu_math::fmul(v[i], hadamard_scale));
  __syncthreads();
  for (int64_t b = threadIdx.x; b < head_dim / block; b += blockDim.x) {
    const int64_t first = b * block;
    float amax = 0.0f;
    for (int64_t i = first; i < first + block; ++i) amax = gpu_math::std_max(amax, fabsf(v[i]));
    if (fp8) {
      const float s = round_ue8m0_ceil(gpu_math::fmul(gpu_math::std_max(amax, 1e-4f), kInvE4m3Max));
      for (int64_t i = first; i < first + block; ++i) {
        const float qv = gpu_math::std_clamp(gpu_math::fdiv(v[i], s), -448.0f, 448.0f);
        x[i] = f32_to_bf16(gpu_math::fmul(round_e4m3fn(qv), s));
      }
    } else {
      const float s = round_ue8m0_ceil(gpu_math::fmul(gpu_math::std_max(amax, kE2m1MinAmax), kInvE2m1Max));
      for (int64_t i = first; i < first + block; ++i) {
        x[i] = f32_to_bf16(gpu_math::fmul(round_e2m1(gpu_math::std_clamp(gpu_math::fdiv(v[i], s), -6.0f, 6.0f)), s));
      }
    }
  }
}

}  // namespace

void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& out, void* stream) {
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  if (rows == 0 || n == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      x.data<const uint16_t>(), x.stride(0), weight.data<const float>(), eps, out.data<uint16_t>(), n);
  gpu::check_launch(kRmsNormOp);
}

void q_norm_rope_inplace(Tensor& q, int64_t heads, int64_t head_dim, double eps, const Tensor& freqs,
                         const Tensor& positions, void* stream) {
  const int64_t blocks = q.size(0) * heads;
  if (blocks == 0) return;
  q_norm_rope_kernel<<<static_cast<unsigned>(blocks), kHeadThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      q.data<uint16_t>(), heads, head_dim, 2 * freqs.size(0), eps, freqs.data<const float>(),
      positions.data<const int32_t>());
  gpu::check_launch(kQNormRopeOp);
}

void indexer_q(Tensor& q, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
               IndexerQuant quant, int64_t block, void* stream) {
  if (head_dim > kMaxSharedHeadDim) {
    throw ContractError(kIndexerQOp, "head_dim",
                        "the GPU kernel holds a head in shared memory: at most " + std::to_string(kMaxSharedHeadDim) +
                            ", got " + std::to_string(head_dim));
  }
  const int64_t blocks = q.size(0) * heads;
  if (blocks == 0) return;
  // Computed by the host exactly as host::hadamard_inplace does.
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const size_t smem = static_cast<size_t>(head_dim) * sizeof(float);
  indexer_q_kernel<<<static_cast<unsigned>(blocks), kHeadThreads, smem, static_cast<gpu::Stream>(stream)>>>(
      q.data<uint16_t>(), heads, head_dim, 2 * freqs.size(0), freqs.data<const float>(),
      positions.data<const int32_t>(), scale, quant == IndexerQuant::fp8, block);
  gpu::check_launch(kIndexerQOp);
}

}  // namespace dsv4::kernels::cuda
