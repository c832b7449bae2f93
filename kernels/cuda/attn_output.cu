// CUDA (and, through port.h, HIP) implementation of kernels/attn_output.h.
//
// inverse_rope_inplace: one thread per rope pair, the host's f32 operations (kernels/cuda/libm.h
// and norm_rope_math.h: glibc's sinf / cosf, no fused multiply-adds), so the bits equal the host's.
//
// grouped_wo_a: per group g a [T, W] x [r, W]^T product, shared-memory tiles of kTileM tokens x
// kTileN outputs x kTileK, each thread owning a 4 x 4 block of outputs with one f32 accumulator
// each. An accumulator adds its products in k order, one rounding per product and one per sum
// (no fusion), exactly the host's `acc += x * w`, so the bf16 outputs equal the host's bit for bit.
#include "kernels/attn_output.h"
#include "kernels/cuda/port.h"  // before formats.h: its device code needs the runtime header

#include <cstdint>

#include "engine/core/formats.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/norm_rope_math.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileM = 64;  // tokens per tile
constexpr int kTileN = 64;  // outputs (rank rows) per tile
constexpr int kTileK = 16;
constexpr int kGemmThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs
constexpr int kPerThread = 4;
constexpr int kThreadCols = kTileN / kPerThread;  // 16

// Pair j of head h of token t: the last rope dims of the head, rotated by the conjugate.
__global__ void inverse_rope_kernel(uint16_t* o, int64_t tokens, int64_t heads, int64_t head_dim, int64_t pairs,
                                    const float* freqs, const int32_t* positions) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= tokens * heads * pairs) return;
  const int64_t j = id % pairs;
  const int64_t th = id / pairs;  // t * heads + h
  uint16_t* rope = o + (th + 1) * head_dim - 2 * pairs;
  const float a = bf16_to_f32(rope[2 * j]);
  const float b = bf16_to_f32(rope[2 * j + 1]);
  float ra, rb;
  gpu::rotate_pair(a, b, gpu::rope_angle(positions[th / heads], freqs[j]), /*inverse=*/true, &ra, &rb);
  rope[2 * j] = f32_to_bf16(ra);
  rope[2 * j + 1] = f32_to_bf16(rb);
}

// Block (n tile, m tile, group). out[t, g * rank + i] = bf16(sum_k o[t, g * width + k] * w[g * rank + i, k]).
__global__ void grouped_wo_a_kernel(const uint16_t* o, int64_t o_stride, const uint16_t* w, uint16_t* out,
                                    int64_t tokens, int64_t width, int64_t rank, int64_t groups) {
  __shared__ float a_tile[kTileK][kTileM + 1];  // [k][token]
  __shared__ float b_tile[kTileK][kTileN + 1];  // [k][output]
  const int64_t g = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tx = static_cast<int>(threadIdx.x) % kThreadCols;  // outputs tx + 16 c
  const int ty = static_cast<int>(threadIdx.x) / kThreadCols;  // tokens ty + 16 r
  const uint16_t* a_base = o + g * width;
  const uint16_t* b_base = w + g * rank * width;
  float acc[kPerThread][kPerThread];
  for (int r = 0; r < kPerThread; ++r) {
    for (int c = 0; c < kPerThread; ++c) acc[r][c] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < width; k0 += kTileK) {
    // Consecutive threads load consecutive k of one row. Outside the matrix: 0, which adds
    // +0 products after the last real k (acc + 0 == acc: an accumulator that starts at +0 is never -0).
    for (int e = static_cast<int>(threadIdx.x); e < kTileM * kTileK; e += blockDim.x) {
      const int mm = e / kTileK;
      const int kk = e % kTileK;
      const int64_t m = m0 + mm;
      const int64_t k = k0 + kk;
      a_tile[kk][mm] = m < tokens && k < width ? bf16_to_f32(a_base[m * o_stride + k]) : 0.0f;
    }
    for (int e = static_cast<int>(threadIdx.x); e < kTileN * kTileK; e += blockDim.x) {
      const int nn = e / kTileK;
      const int kk = e % kTileK;
      const int64_t n = n0 + nn;
      const int64_t k = k0 + kk;
      b_tile[kk][nn] = n < rank && k < width ? bf16_to_f32(b_base[n * width + k]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[kPerThread];
      float b[kPerThread];
      for (int r = 0; r < kPerThread; ++r) a[r] = a_tile[kk][ty + kThreadCols * r];
      for (int c = 0; c < kPerThread; ++c) b[c] = b_tile[kk][tx + kThreadCols * c];
      for (int r = 0; r < kPerThread; ++r) {
        for (int c = 0; c < kPerThread; ++c) acc[r][c] = gpu_math::fadd(acc[r][c], gpu_math::fmul(a[r], b[c]));
      }
    }
    __syncthreads();
  }
  const int64_t out_stride = groups * rank;
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t m = m0 + ty + kThreadCols * r;
    if (m >= tokens) continue;
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t n = n0 + tx + kThreadCols * c;
      if (n < rank) out[m * out_stride + g * rank + n] = f32_to_bf16(acc[r][c]);
    }
  }
}

}  // namespace

void inverse_rope_inplace(Tensor& o, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
                          void* stream) {
  const int64_t pairs = freqs.size(0);
  const int64_t n = o.size(0) * heads * pairs;
  if (n == 0) return;
  inverse_rope_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      o.data<uint16_t>(), o.size(0), heads, head_dim, pairs, freqs.data<const float>(),
      positions.data<const int32_t>());
  gpu::check_launch(kInverseRopeOp);
}

void grouped_wo_a(const Tensor& o, const Tensor& wo_a, int64_t groups, Tensor& out, void* stream) {
  const int64_t tokens = o.size(0);
  const int64_t width = o.size(1) / groups;
  const int64_t rank = wo_a.size(0) / groups;
  if (tokens == 0 || rank == 0) return;
  const dim3 grid(static_cast<unsigned>((rank + kTileN - 1) / kTileN),
                  static_cast<unsigned>((tokens + kTileM - 1) / kTileM), static_cast<unsigned>(groups));
  grouped_wo_a_kernel<<<grid, kGemmThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      o.data<const uint16_t>(), o.stride(0), wo_a.data<const uint16_t>(), out.data<uint16_t>(), tokens, width, rank,
      groups);
  gpu::check_launch(kGroupedWoAOp);
}

}  // namespace dsv4::kernels::cuda
