// The norm and RoPE arithmetic that the GPU kernels of norm_rope.cu, q_path.cu and attn_output.cu
// share so that they equal the host kernels (kernels/host) bit for bit.
//
// RoPE. The host kernels (and the reference) take cos and sin of an f32 angle with std::cos /
// std::sin, i.e. glibc's cosf / sinf, which on x86-64 with FMA hardware run libm's FMA build of the
// ARM-optimized-routines algorithm: a double-precision range reduction (one fused multiply-subtract
// by pi/2 below |x| < 120, a 4/pi fixed-point product above) and short double polynomials, rounded
// once to f32. Those results are not always the correctly rounded ones (up to 0.56 ulp; about 1.3%
// of all f32 inputs differ from the correctly rounded value), and CUDA's sinf / cosf differ from
// them in the last bit now and then, which after RoPE's bf16 rounding shows up as rare one-ulp
// differences. libm_sincosf below performs the same double operations (the same constants, the
// same products and the same fused multiply-adds, read off the FMA build of libm.so.6 of glibc
// 2.36), so it returns exactly glibc's sinf / cosf for every finite f32 input (checked against the
// host library for all 2^32 inputs when it was written; tests/gpu/test_kernels_norm_rope.cu checks
// the device function against the host's std::sin / std::cos over a sweep of angles on every run,
// which also catches a host whose libm differs). Non-finite inputs give a NaN (whose bits may
// differ from the host's).
//
// Products and sums go through rn_* helpers so no compiler fuses them into an FMA the host does
// not perform (the host build targets baseline x86-64: it never fuses).
//
// RMS. The host sums the squares of a row in f64 in index order. block_sum_f64 sums them in a
// fixed tree order instead (deterministic, not the host's order): every square of an f32 is exact
// in f64, so the two sums are equal whenever no partial sum rounds, and otherwise differ by a few
// f64 ulps, which changes the f32 inverse rms only when it lies within ~2^-50 of an f32 rounding
// boundary (about one row in 2^28).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/port.h"  // first: formats.h's device code needs the runtime header

#include "engine/core/formats.h"
#include "engine/core/hd.h"

namespace dsv4::gpu {

// ---- rounded operations that are never contracted into a fused multiply-add ----------------------

DSV4_HD inline double rn_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#elif defined(__HIP_DEVICE_COMPILE__)
#pragma clang fp contract(off)
  return a * b;
#else
  return a * b;
#endif
}

DSV4_HD inline double fused(double a, double b, double c) { return ::fma(a, b, c); }

DSV4_HD inline float rn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#elif defined(__HIP_DEVICE_COMPILE__)
#pragma clang fp contract(off)
  return a * b;
#else
  return a * b;
#endif
}

DSV4_HD inline float rn_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#elif defined(__HIP_DEVICE_COMPILE__)
#pragma clang fp contract(off)
  return a + b;
#else
  return a + b;
#endif
}

DSV4_HD inline float rn_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#elif defined(__HIP_DEVICE_COMPILE__)
#pragma clang fp contract(off)
  return a - b;
#else
  return a - b;
#endif
}

DSV4_HD inline float rn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// std::max / std::clamp of floats as libstdc++ writes them (a NaN argument picks the same side).
DSV4_HD inline float std_max(float a, float b) { return a < b ? b : a; }
DSV4_HD inline float std_clamp(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }

// ---- glibc's sinf / cosf ---------------------------------------------------------------------------

namespace libm {

// Polynomial coefficients of libm's sincosf table (cos: kC0..kC4, sin: kS1..kS3). The table of the
// quadrants 2 and 3 negates the cosine coefficients, which is how cos picks up its sign there.
inline constexpr double kC0 = 0x1p0;
inline constexpr double kC1 = -0x1.ffffffd0c621cp-2;
inline constexpr double kC2 = 0x1.55553e1068f19p-5;
inline constexpr double kC3 = -0x1.6c087e89a359dp-10;
inline constexpr double kC4 = 0x1.99343027bf8c3p-16;
inline constexpr double kS1 = -0x1.555545995a603p-3;
inline constexpr double kS2 = 0x1.1107605230bc4p-7;
inline constexpr double kS3 = -0x1.994eb3774cf24p-13;
inline constexpr double kHalfPiInvScaled = 0x1.45f306dc9c883p+23;  // 2/pi * 2^24
inline constexpr double kHalfPi = 0x1.921fb54442d18p0;
inline constexpr double kPi63 = 0x1.921fb54442d18p-62;  // 2 pi * 2^-64

// 4/pi to 192 bits, 8 new bits per entry (entry i holds bits 8i .. 8i + 31).
DSV4_HD inline uint32_t inv_pio4(int i) {
  switch (i) {
    case 0: return 0xa2u;
    case 1: return 0xa2f9u;
    case 2: return 0xa2f983u;
    case 3: return 0xa2f9836eu;
    case 4: return 0xf9836e4eu;
    case 5: return 0x836e4e44u;
    case 6: return 0x6e4e4415u;
    case 7: return 0x4e441529u;
    case 8: return 0x441529fcu;
    case 9: return 0x1529fc27u;
    case 10: return 0x29fc2757u;
    case 11: return 0xfc2757d1u;
    case 12: return 0x2757d1f5u;
    case 13: return 0x57d1f534u;
    case 14: return 0xd1f534ddu;
    case 15: return 0xf534ddc0u;
    case 16: return 0x34ddc0dbu;
    case 17: return 0xddc0db62u;
    case 18: return 0xc0db6295u;
    case 19: return 0xdb629599u;
    case 20: return 0x6295993cu;
    case 21: return 0x95993c43u;
    case 22: return 0x993c4390u;
    default: return 0x3c439041u;
  }
}

// x + x^3 (S1 + x^2 (S2 + x^2 S3)) in libm's order: x3 = x x2, x7 = x3 x2, s = x + x3 S1 (fused),
// result s + x7 (S2 + x2 S3) (both fused).
DSV4_HD inline float sin_poly(double x, double x2) {
  const double x3 = rn_mul(x2, x);
  const double s1 = fused(x2, kS3, kS2);
  const double x7 = rn_mul(x3, x2);
  const double s = fused(x3, kS1, x);
  return static_cast<float>(fused(s1, x7, s));
}

// C0 + C1 x^2 + C2 x^4 + x^6 (C3 + C4 x^2), negated when `negate` (the second table).
DSV4_HD inline float cos_poly(double x2, bool negate) {
  const double x4 = rn_mul(x2, x2);
  const double c1 = fused(x2, negate ? -kC1 : kC1, negate ? -kC0 : kC0);
  const double c2 = fused(x2, negate ? -kC4 : kC4, negate ? -kC3 : kC3);
  const double x6 = rn_mul(x2, x4);
  const double c = fused(x4, negate ? -kC2 : kC2, c1);
  return static_cast<float>(fused(c2, x6, c));
}

// Large arguments: |y| * 4/pi as a 2.62 fixed-point number from a 32 x 96-bit product, the quadrant
// in *quadrant and the remainder (in [-pi/4, pi/4]) returned.
DSV4_HD inline double reduce_large(uint32_t bits, int* quadrant) {
  const int first = static_cast<int>((bits >> 26) & 15u);
  const int shift = static_cast<int>((bits >> 23) & 7u);
  const uint32_t m = ((bits & 0xffffffu) | 0x800000u) << shift;
  uint64_t lo = static_cast<uint32_t>(m * inv_pio4(first));  // a 32-bit product: only the low word counts
  const uint64_t mid = static_cast<uint64_t>(m) * inv_pio4(first + 4);
  const uint64_t hi = static_cast<uint64_t>(m) * inv_pio4(first + 8);
  lo = (hi >> 32) | (lo << 32);
  lo += mid;
  const uint64_t n = (lo + (1ull << 61)) >> 62;
  lo -= n << 62;
  *quadrant = static_cast<int>(n);
  return rn_mul(static_cast<double>(static_cast<int64_t>(lo)), kPi63);
}

}  // namespace libm

struct SinCos {
  float sin;
  float cos;
};

// {sinf(y), cosf(y)} exactly as glibc's libm computes them (see the file comment).
DSV4_HD inline SinCos libm_sincosf(float y) {
  using namespace libm;
  const uint32_t bits = f32_bits(y);
  const uint32_t top = (bits >> 20) & 0x7ffu;  // exponent and 3 mantissa bits, sign cleared
  double x = static_cast<double>(y);
  if (top < 0x3f4u) {    // |y| < pi/4 (the float pi/4's top bits)
    if (top < 0x398u) {  // |y| < 2^-12: sin y = y, cos y = 1 in f32
      return {y, 1.0f};
    }
    const double x2 = rn_mul(x, x);
    return {sin_poly(x, x2), cos_poly(x2, false)};
  }
  int n = 0;
  int quadrant = 0;  // selects the sign of x and the table; n selects the polynomial
  if (top < 0x42fu) {  // |y| < 120: one fused multiply-subtract by pi/2
    const double r = rn_mul(x, kHalfPiInvScaled);
    n = (static_cast<int32_t>(r) + 0x800000) >> 24;
    x = fused(-static_cast<double>(n), kHalfPi, x);
    quadrant = n;
  } else if (top < 0x7f8u) {  // finite
    x = reduce_large(bits, &n);
    quadrant = n + static_cast<int>(bits >> 31);
  } else {
    const float nan = f32_from_bits(0x7fc00000u);
    return {nan, nan};
  }
  const double sign = (quadrant & 3) == 1 || (quadrant & 3) == 2 ? -1.0 : 1.0;
  const bool negate = (quadrant & 2) != 0;
  const double x2 = rn_mul(x, x);
  const double xs = rn_mul(x, sign);
  if ((n & 1) == 0) return {sin_poly(xs, x2), cos_poly(x2, negate)};
  return {cos_poly(x2, negate), sin_poly(xs, x2)};
}

// The forward RoPE rotation of the pair (a, b) by `angle` as the host kernels write it:
// (a cos - b sin, a sin + b cos), f32 products and sums, no fusion. `inverse` uses -sin.
DSV4_HD inline void rotate_pair(float a, float b, float angle, bool inverse, float* out_a, float* out_b) {
  const SinCos sc = libm_sincosf(angle);
  const float c = sc.cos;
  const float s = inverse ? -sc.sin : sc.sin;
  *out_a = rn_sub(rn_mul(a, c), rn_mul(b, s));
  *out_b = rn_add(rn_mul(a, s), rn_mul(b, c));
}

// The angle of rope pair j at position pos: f32(pos) * freqs[j].
DSV4_HD inline float rope_angle(int32_t pos, float freq) { return rn_mul(static_cast<float>(pos), freq); }

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
  return static_cast<float>(1.0 / ::sqrt(sum_sq / static_cast<double>(n) + eps));
}
#endif

}  // namespace dsv4::gpu
