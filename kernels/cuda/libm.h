// The host kernels' scalar float math, replayed in GPU kernels bit for bit: rounded operations that
// no compiler fuses, and glibc's expf, sinf and cosf. Every GPU kernel that must equal its host
// twin bit for bit takes its arithmetic from here (compressor.cu, mhc.cu, norm_rope.cu, q_path.cu,
// attn_output.cu, sparse_attention.cu). The functions are DSV4_HD where they can be: under nvcc /
// hipcc their host versions are the twins a test can run on the CPU.
//
// Rounded operations. Each product, sum, quotient and square root is one IEEE operation rounded to
// nearest even, never contracted with a neighbour into a fused multiply-add: nvcc contracts
// a * b + c by default, so CUDA device code calls the __f*_rn / __d*_rn intrinsics, which it keeps
// apart; hipcc contracts too (-ffp-contract=fast for HIP), so HIP code writes the operation under
// `#pragma clang fp contract(off)`; the host build targets baseline x86-64, without FMA
// instructions, so it never fuses. f32 division and square root are correctly rounded under hipcc's
// default (-fhip-fp32-correctly-rounded-divide-sqrt). dfma is the one fused operation, for the
// places where the host library fuses.
//
// expf, sinf, cosf. The host kernels call std::exp, std::sin and std::cos on floats: glibc's expf,
// sinf and cosf (glibc >= 2.28, the ARM optimized-routines algorithms; on x86-64 the ifunc picks
// their FMA build on any CPU with FMA, aarch64 always fuses). They are not correctly rounded: expf
// differs from the correctly rounded value on about 1e-4 of the negative f32 inputs (~170k inputs),
// sinf / cosf on about 1.3% of all inputs (up to 0.56 ulp). So neither a GPU intrinsic (CUDA's
// expf / sinf / cosf differ in the last bit now and then) nor a double-precision function rounded
// to f32 reproduces them (a double exp rounded to f32 differs from glibc's expf on ~0.06% of the
// softmax inputs of sparse attention), and after a bf16 rounding such a bit shows up as rare
// one-ulp differences. libm_expf and libm_sincosf below are those algorithms operation for
// operation, read off the FMA build of libm.so.6 of glibc 2.36: the same tables and coefficients, a
// fused multiply-add exactly where that build has one, every other double operation rounded on its
// own, one final rounding to f32.
//   expf: x * 32/ln2 = k + r (k rounded by the shift trick, both products fused), 2^(k/32) from a
//     table of 2^(j/32), a cubic in r.
//   sinf / cosf: a double-precision range reduction (one fused multiply-subtract by pi/2 below
//     |x| < 120, a 4/pi fixed-point product above) and short double polynomials.
// Their host twins equal glibc 2.36's expf / sinf / cosf (x86-64 with FMA) on all 2^32 inputs;
// libm's non-FMA build differs from them (expf on two inputs of 2^32). The device functions are
// checked against the host's std::exp on all 2^32 inputs (tests/gpu/test_kernels_mhc.cu) and
// against its std::sin / std::cos on a sweep of ~20M angles (tests/gpu/test_kernels_norm_rope.cu)
// on every run, which also catches a host whose libm differs (another glibc, or no FMA hardware).
// sinf / cosf take finite inputs only: inf and NaN give a NaN whose payload may differ from libm's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/port.h"  // first: formats.h's device code needs the runtime header

#include "engine/core/formats.h"
#include "engine/core/hd.h"

namespace dsv4::kernels::gpu_math {

// ---- rounded operations, never contracted -------------------------------------------------------

#if defined(__HIPCC__)
#define DSV4_GPU_MATH_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define DSV4_GPU_MATH_NO_CONTRACT
#endif

DSV4_HD inline float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a + b;
#endif
}
DSV4_HD inline float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a - b;
#endif
}
DSV4_HD inline float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a * b;
#endif
}
DSV4_HD inline float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DSV4_HD inline float fsqrt(float a) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
DSV4_HD inline double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a + b;
#endif
}
DSV4_HD inline double dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a - b;
#endif
}
DSV4_HD inline double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  DSV4_GPU_MATH_NO_CONTRACT
  return a * b;
#endif
}
DSV4_HD inline double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
DSV4_HD inline double dsqrt(double a) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
// a * b + c rounded once (where the host library fuses).
DSV4_HD inline double dfma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#elif defined(__HIP_DEVICE_COMPILE__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

#undef DSV4_GPU_MATH_NO_CONTRACT

// std::max / std::clamp of floats as libstdc++ writes them (a NaN argument picks the same side).
DSV4_HD inline float std_max(float a, float b) { return a < b ? b : a; }
DSV4_HD inline float std_clamp(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }

DSV4_HD inline uint64_t f64_bits(double x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}
DSV4_HD inline double f64_from_bits(uint64_t b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// ---- libm's tables ------------------------------------------------------------------------------

namespace libm_impl {

// expf's table: the bits of 2^(j/32) (correctly rounded) minus j << 47, so that adding k << 47 for
// k = j (mod 32) scales 2^(j/32) by 2^((k - j)/32).
#define DSV4_GPU_MATH_EXP2F_TABLE                                                                     \
  {                                                                                                   \
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,       \
        0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,   \
        0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,   \
        0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,   \
        0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,   \
        0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,   \
        0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,   \
        0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull    \
  }
// sinf / cosf's large-argument reduction: 4/pi to 192 bits, 8 new bits per entry (entry i holds
// bits 8i .. 8i + 31).
#define DSV4_GPU_MATH_INV_PIO4_TABLE                                                               \
  {                                                                                                \
    0xa2u, 0xa2f9u, 0xa2f983u, 0xa2f9836eu, 0xf9836e4eu, 0x836e4e44u, 0x6e4e4415u, 0x4e441529u,    \
        0x441529fcu, 0x1529fc27u, 0x29fc2757u, 0xfc2757d1u, 0x2757d1f5u, 0x57d1f534u, 0xd1f534ddu, \
        0xf534ddc0u, 0x34ddc0dbu, 0xddc0db62u, 0xc0db6295u, 0xdb629599u, 0x6295993cu, 0x95993c43u, \
        0x993c4390u, 0x3c439041u                                                                   \
  }
#if defined(__CUDACC__) || defined(__HIPCC__)
// Global memory rather than __constant__: the threads of a warp index them divergently.
[[maybe_unused]] static __device__ const uint64_t kExp2fDevice[32] = DSV4_GPU_MATH_EXP2F_TABLE;
[[maybe_unused]] static __device__ const uint32_t kInvPio4Device[24] = DSV4_GPU_MATH_INV_PIO4_TABLE;
#endif
inline constexpr uint64_t kExp2fHost[32] = DSV4_GPU_MATH_EXP2F_TABLE;
inline constexpr uint32_t kInvPio4Host[24] = DSV4_GPU_MATH_INV_PIO4_TABLE;
#undef DSV4_GPU_MATH_EXP2F_TABLE
#undef DSV4_GPU_MATH_INV_PIO4_TABLE

DSV4_HD inline uint64_t exp2f_table(uint32_t j) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return kExp2fDevice[j];
#else
  return kExp2fHost[j];
#endif
}
DSV4_HD inline uint32_t inv_pio4(uint32_t i) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return kInvPio4Device[i];
#else
  return kInvPio4Host[i];
#endif
}

}  // namespace libm_impl

// ---- glibc's expf -------------------------------------------------------------------------------

DSV4_HD inline float libm_expf(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t top = (bits >> 20) & 0x7ffu;
  if (top >= 0x42bu) {  // |x| >= 88, infinities and NaN
    if (bits == 0xff800000u) return 0.0f;
    if (top >= 0x7f8u) return x + x;                                // +inf stays, NaN is quieted
    if (x > 0x1.62e42ep6f) return f32_from_bits(0x7f800000u);       // overflows: +inf
    if (x < -0x1.9fe368p6f) return 0.0f;                            // underflows: +0
    if (x < -0x1.9d1d9ep6f) return f32_from_bits(1u);               // may underflow: 0x1.4p-75f^2 = 2^-149
  }
  // x * 32 / ln2 = k + r, k an integer (read off the low bits of k + 1.5 * 2^52), |r| <= 1/2.
  constexpr double kInvLn2N = 0x1.71547652b82fep+5;  // 32 / ln 2
  constexpr double kShift = 0x1.8p+52;
  const double xd = static_cast<double>(x);
  const double shifted = dfma(kInvLn2N, xd, kShift);
  const uint64_t ki = f64_bits(shifted);
  const double kd = dsub(shifted, kShift);
  const double r = dfma(kInvLn2N, xd, -kd);
  // exp(x) = 2^(k/32) * 2^(r/32) ~= s * (C0 r^3 + C1 r^2 + C2 r + 1).
  const double s = f64_from_bits(libm_impl::exp2f_table(static_cast<uint32_t>(ki % 32)) + (ki << 47));
  constexpr double kC0 = 0x1.c6af84b912394p-20, kC1 = 0x1.ebfce50fac4f3p-13, kC2 = 0x1.62e42ff0c52d6p-6;
  const double z = dfma(kC0, r, kC1);
  const double r2 = dmul(r, r);
  double y = dfma(kC2, r, 1.0);
  y = dfma(z, r2, y);
  return static_cast<float>(dmul(y, s));
}

// ---- glibc's sinf / cosf ------------------------------------------------------------------------

namespace libm_impl {

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

// x + x^3 (S1 + x^2 (S2 + x^2 S3)) in libm's order: x3 = x x2, x7 = x3 x2, s = x + x3 S1 (fused),
// result s + x7 (S2 + x2 S3) (both fused).
DSV4_HD inline float sin_poly(double x, double x2) {
  const double x3 = dmul(x2, x);
  const double s1 = dfma(x2, kS3, kS2);
  const double x7 = dmul(x3, x2);
  const double s = dfma(x3, kS1, x);
  return static_cast<float>(dfma(s1, x7, s));
}

// C0 + C1 x^2 + C2 x^4 + x^6 (C3 + C4 x^2), negated when `negate` (the second table).
DSV4_HD inline float cos_poly(double x2, bool negate) {
  const double x4 = dmul(x2, x2);
  const double c1 = dfma(x2, negate ? -kC1 : kC1, negate ? -kC0 : kC0);
  const double c2 = dfma(x2, negate ? -kC4 : kC4, negate ? -kC3 : kC3);
  const double x6 = dmul(x2, x4);
  const double c = dfma(x4, negate ? -kC2 : kC2, c1);
  return static_cast<float>(dfma(c2, x6, c));
}

// |y| < 120: r = y - n pi/2 with n = round(y 2/pi) (scaled-integer rounding), one fused
// multiply-subtract.
DSV4_HD inline double reduce_fast(double x, int* n) {
  const double r = dmul(x, kHalfPiInvScaled);
  *n = (static_cast<int32_t>(r) + 0x800000) >> 24;
  return dfma(-static_cast<double>(*n), kHalfPi, x);
}

// Large arguments (finite, |y| >= 120): |y| * 4/pi as a 2.62 fixed-point number from a 32 x 96-bit
// product, the quadrant in *n and the remainder (in [-pi/4, pi/4]) returned.
DSV4_HD inline double reduce_large(uint32_t bits, int* n) {
  const uint32_t first = (bits >> 26) & 15u;
  const int shift = static_cast<int>((bits >> 23) & 7u);
  const uint32_t m = ((bits & 0xffffffu) | 0x800000u) << shift;
  uint64_t lo = static_cast<uint32_t>(m * inv_pio4(first));  // a 32-bit product: only the low word counts
  const uint64_t mid = static_cast<uint64_t>(m) * inv_pio4(first + 4);
  const uint64_t hi = static_cast<uint64_t>(m) * inv_pio4(first + 8);
  lo = (hi >> 32) | (lo << 32);
  lo += mid;
  const uint64_t q = (lo + (1ull << 61)) >> 62;
  lo -= q << 62;
  *n = static_cast<int>(q);
  return dmul(static_cast<double>(static_cast<int64_t>(lo)), kPi63);
}

}  // namespace libm_impl

struct SinCos {
  float sin;
  float cos;
};

// {sinf(y), cosf(y)} exactly as glibc's libm computes them (see the file comment).
DSV4_HD inline SinCos libm_sincosf(float y) {
  using namespace libm_impl;
  const uint32_t bits = f32_bits(y);
  const uint32_t top = (bits >> 20) & 0x7ffu;  // exponent and 3 mantissa bits, sign cleared
  double x = static_cast<double>(y);
  if (top < 0x3f4u) {    // |y| < pi/4 (the float pi/4's top bits)
    if (top < 0x398u) {  // |y| < 2^-12: sin y = y, cos y = 1 in f32
      return {y, 1.0f};
    }
    const double x2 = dmul(x, x);
    return {sin_poly(x, x2), cos_poly(x2, false)};
  }
  int n = 0;
  int quadrant = 0;  // selects the sign of x and the table: n, plus 1 for a negative y on the large path
  if (top < 0x42fu) {  // |y| < 120
    x = reduce_fast(x, &n);
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
  const double x2 = dmul(x, x);
  const double xs = dmul(x, sign);
  if ((n & 1) == 0) return {sin_poly(xs, x2), cos_poly(x2, negate)};  // odd quadrants swap the polynomials
  return {cos_poly(x2, negate), sin_poly(xs, x2)};
}

DSV4_HD inline float libm_sinf(float y) { return libm_sincosf(y).sin; }
DSV4_HD inline float libm_cosf(float y) { return libm_sincosf(y).cos; }

}  // namespace dsv4::kernels::gpu_math
