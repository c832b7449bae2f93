// The norm and RoPE arithmetic that the GPU kernels of norm_rope.cu, q_path.cu and attn_output.cu
// share so that they equal the host kernels (kernels/host) bit for bit.
//
// RoPE. The host kernels (and the reference) take cos and sin of an f32 angle with std::cos /
// std::sin, i.e. glibc's cosf / sinf, which are not correctly rounded; rotate_pair takes them from
// kernels/cuda/libm.h's libm_sincosf, glibc's algorithm operation for operation (libm.h says why and
// how it is checked), and writes the rotation's products and sums with libm.h's rounded operations
// so no compiler fuses them into an FMA the host does not perform.
//
// RMS. The host sums the squares of a row in f64 in index order. block_sum_f64 sums them in a
// fixed tree order instead (deterministic, not the host's order): every square of an f32 is exact
// in f64, so the two sums are equal whenever no partial sum rounds, and otherwise differ by a few
// f64 ulps, which changes the f32 inverse rms only when it lies within ~2^-50 of an f32 rounding
// boundary (about one row in 2^28).
#pragma once

#include <cstdint>

#include "kernels/cuda/libm.h"  // first: port.h before formats.h

#include "engine/core/formats.h"
#include "engine/core/hd.h"

namespace dsv4::gpu {

// The forward RoPE rotation of the pair (a, b) by `angle` as the host kernels write it:
// (a cos - b sin, a sin + b cos), f32 products and sums, no fusion. `inverse` uses -sin.
DSV4_HD inline void rotate_pair(float a, float b, float angle, bool inverse, float* out_a, float* out_b) {
  using namespace kernels::gpu_math;
  const SinCos sc = libm_sincosf(angle);
  const float c = sc.cos;
  const float s = inverse ? -sc.sin : sc.sin;
  *out_a = fsub(fmul(a, c), fmul(b, s));
  *out_b = fadd(fmul(a, s), fmul(b, c));
}

// The angle of rope pair j at position pos: f32(pos) * freqs[j].
DSV4_HD inline float rope_angle(int32_t pos, float freq) {
  return kernels::gpu_math::fmul(static_cast<float>(pos), freq);
}

#if defined(__CUDACC__) || defined(__HIPCC__)
// Block-wide f64 sum in a fixed order (warp butterflies, then the warp partials in warp order);
// blockDim.x a multiple of kWarpSize, `smem` holds kMaxWarps doubles. Every thread gets the result.
// Contains __syncthreads (call from all threads).
__device__ inline double block_sum_f64(double v, double* smem) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < warps; ++w) total += smem[w];
  return total;
}

// f32(1 / sqrt(sum_sq / n + eps)) in f64, as host::inverse_rms finishes it.
__device__ inline float inverse_rms_from(double sum_sq, int64_t n, double eps) {
  using namespace kernels::gpu_math;
  return static_cast<float>(ddiv(1.0, dsqrt(dadd(ddiv(sum_sq, static_cast<double>(n)), eps))));
}
#endif

}  // namespace dsv4::gpu
