// The scalar arithmetic of the mHC GPU kernels (kernels/cuda/mhc.cu), written so that it equals the
// host kernels (kernels/host/mhc.cpp) bit for bit. Device code only.
//
// Rounded operations. Every product and sum goes through an explicitly rounded operation, so that
// no compiler fuses a multiply and an add the host performs separately (nvcc contracts by default,
// hipcc too); the host build never fuses.
//
// exp of an f32 (the Sinkhorn softmax). The host calls std::exp(float), i.e. glibc's expf, which is
// not correctly rounded (about 1e-4 of the negative f32 inputs differ from the correctly rounded
// value in the last bit), so neither CUDA's expf nor a correctly rounded exp equals it. libm_expf
// performs glibc's double-precision algorithm: x * 32/ln2 = k + r with the products fused (as the
// FMA build that x86-64 glibc selects on FMA hardware, and aarch64 always, evaluates them), 2^(k/32)
// from a table of 2^(j/32), a cubic in r, and one final rounding to f32. Its host twin matched the
// host's std::exp(float) on all 2^32 inputs (glibc 2.36, x86-64 with FMA); the non-FMA build differs
// from it on two inputs of 2^32. tests/gpu/test_kernels_mhc.cu checks the device function against
// the host's std::exp on all 2^32 inputs on every run (equal on an H100 with CUDA 13.0 and its host's
// glibc), which also catches a host whose libm differs.
//
// sigmoid (the pre / post weights). The host computes f32(1 / (1 + exp(-z))) in f64 with glibc's
// exp; the device uses its own f64 exp (both within an ulp of exact). The f64 results can differ in
// the last bit, which changes the f32 result only when it lies within an f64 ulp of an f32 rounding
// boundary: 60 of the 2^32 f32 inputs z are that close (counted on the host); the GPU test compares
// the two over all 2^32 inputs (equal on an H100 with CUDA 13.0).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/port.h"  // first: formats.h's device code needs the runtime header

#include "engine/core/formats.h"

namespace dsv4::kernels::mhc_gpu {

// ---- rounded operations, never contracted ------------------------------------------------------------

#if defined(__HIPCC__)
__device__ inline float fadd(float a, float b) {
#pragma clang fp contract(off)
  return a + b;
}
__device__ inline float fsub(float a, float b) {
#pragma clang fp contract(off)
  return a - b;
}
__device__ inline float fmul(float a, float b) {
#pragma clang fp contract(off)
  return a * b;
}
__device__ inline float fdiv(float a, float b) {
#pragma clang fp contract(off)
  return a / b;
}
__device__ inline double dadd(double a, double b) {
#pragma clang fp contract(off)
  return a + b;
}
__device__ inline double dmul(double a, double b) {
#pragma clang fp contract(off)
  return a * b;
}
__device__ inline double ddiv(double a, double b) {
#pragma clang fp contract(off)
  return a / b;
}
__device__ inline double dsqrt(double a) { return __dsqrt_rn(a); }
#else
__device__ inline float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline double dsqrt(double a) { return __dsqrt_rn(a); }
#endif

__device__ inline uint64_t f64_bits(double x) { return static_cast<uint64_t>(__double_as_longlong(x)); }
__device__ inline double f64_from_bits(uint64_t b) { return __longlong_as_double(static_cast<long long>(b)); }

// ---- exp of an f32, as glibc's expf -------------------------------------------------------------------

// The f64 bits of 2^(j/32), j = 0..31, correctly rounded.
static __constant__ const uint64_t kExp2Frac[32] = {
    0x3ff0000000000000ull, 0x3ff059b0d3158574ull, 0x3ff0b5586cf9890full, 0x3ff11301d0125b51ull,
    0x3ff172b83c7d517bull, 0x3ff1d4873168b9aaull, 0x3ff2387a6e756238ull, 0x3ff29e9df51fdee1ull,
    0x3ff306fe0a31b715ull, 0x3ff371a7373aa9cbull, 0x3ff3dea64c123422ull, 0x3ff44e086061892dull,
    0x3ff4bfdad5362a27ull, 0x3ff5342b569d4f82ull, 0x3ff5ab07dd485429ull, 0x3ff6247eb03a5585ull,
    0x3ff6a09e667f3bcdull, 0x3ff71f75e8ec5f74ull, 0x3ff7a11473eb0187ull, 0x3ff82589994cce13ull,
    0x3ff8ace5422aa0dbull, 0x3ff93737b0cdc5e5ull, 0x3ff9c49182a3f090ull, 0x3ffa5503b23e255dull,
    0x3ffae89f995ad3adull, 0x3ffb7f76f2fb5e47ull, 0x3ffc199bdd85529cull, 0x3ffcb720dcef9069ull,
    0x3ffd5818dcfba487ull, 0x3ffdfc97337b9b5full, 0x3ffea4afa2a490daull, 0x3fff50765b6e4540ull,
};

__device__ inline float libm_expf(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t top = (bits >> 20) & 0x7FFu;
  if (top >= 0x42Bu) {  // |x| >= 88, infinities and NaN
    if (bits == 0xFF800000u) return 0.0f;
    if (top >= 0x7F8u) return x + x;                                // +inf stays, NaN is quieted
    if (x > 0x1.62e42ep6f) return f32_from_bits(0x7F800000u);       // overflows
    if (x < -0x1.9fe368p6f) return 0.0f;                            // underflows
  }
  // x * 32 / ln2 = k + r, k an integer (read off the low bits of k + 1.5 * 2^52), |r| <= 1/2.
  constexpr double kScale = 0x1.71547652b82fep+0 * 32;
  constexpr double kRound = 0x1.8p+52;
  const double xd = x;
  const double shifted = fma(kScale, xd, kRound);
  const uint64_t ki = f64_bits(shifted);
  const double kd = dadd(shifted, -kRound);
  const double r = fma(kScale, xd, -kd);
  // 2^(k/32) = 2^(j/32) * 2^((k - j)/32) with j = k mod 32: the exponent field moves by (k - j) / 32.
  const uint32_t j = static_cast<uint32_t>(ki % 32u);
  const double s = f64_from_bits(kExp2Frac[j] + ((ki - j) << 47));
  // 2^(r/32) ~ 1 + c2 r + c1 r^2 + c0 r^3.
  constexpr double kC0 = 0x1.c6af84b912394p-5 / 32 / 32 / 32;
  constexpr double kC1 = 0x1.ebfce50fac4f3p-3 / 32 / 32;
  constexpr double kC2 = 0x1.62e42ff0c52d6p-1 / 32;
  const double hi = fma(kC0, r, kC1);
  const double lo = fma(kC2, r, 1.0);
  const double y = fma(hi, dmul(r, r), lo);
  return static_cast<float>(dmul(y, s));
}

// f32(1 / (1 + exp(-z))) in f64, as the host's sigmoid.
__device__ inline float sigmoid(float z) { return static_cast<float>(ddiv(1.0, dadd(1.0, ::exp(-static_cast<double>(z))))); }

}  // namespace dsv4::kernels::mhc_gpu
