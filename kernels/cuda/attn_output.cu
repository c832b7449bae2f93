// CUDA (and, through port.h, HIP) implementation of kernels/attn_output.h.
//
// inverse_rope_inplace: one thread per rope pair, the host's f32 operations (kernels/cuda/libm.h
// and norm_rope_math.h: glibc's sinf / cosf, no fused multiply-adds), so the bits equal the host's.
//
// grouped_wo_a is the plain GEMM of kernels/cuda/dense_gemm.cu, one per output group: one f32
// accumulator per output adds its products in k order without fusion, the host's `acc += x * w`.
#include "kernels/attn_output.h"
#include "kernels/cuda/port.h"  // before formats.h: its device code needs the runtime header

#include <cstdint>

#include "engine/core/formats.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/norm_rope_math.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;

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

}  // namespace dsv4::kernels::cuda
