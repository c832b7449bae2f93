// CUDA (and, through port.h, HIP) implementation of kernels/compressor.h: the pool, the state write
// and the cache store of the KV compressor, reading the encoded plan (compress_plan_words) from
// device memory when they run. The block count B lives in the plan only, so each launch covers the
// output's capacity and the CUDA blocks past B return.
//
// Every value equals compressor_pool_host's (and model1_pack's) bit for bit: the same operations in
// the same order, each rounded once (__f*_rn / __d*_rn intrinsics keep nvcc from contracting a
// multiply and an add into an FMA; hipcc gets `fp contract(off)`), the double sums of the reference
// run by one thread in source / channel order, and exp, sin and cos through the glibc-equivalent
// functions below. Per compress block (one CUDA block): a thread per channel pools the S sources,
// then thread 0 sums the squares for the RMSNorm, then the threads share the RoPE pairs, the
// Hadamard butterflies (one stage at a time) and the quantization blocks.
#include "kernels/compressor.h"
#include "kernels/cuda/port.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "engine/core/error.h"
#include "engine/core/formats.h"

#if defined(__HIPCC__)
#pragma clang fp contract(off)
#endif

namespace dsv4::kernels {
namespace {

// ---- glibc-equivalent libm (begin) ---------------------------------------------------------------
// The host kernels call std::exp, std::cos and std::sin on floats: glibc's expf, cosf and sinf
// (glibc >= 2.28, the ARM optimized-routines algorithms; on x86-64 the ifunc picks their FMA builds
// on any CPU with FMA). They are not correctly rounded (expf misrounds ~170k inputs), so neither a
// GPU intrinsic nor a double-precision exp rounded to f32 reproduces them. These are those
// algorithms operation for operation: the same tables and coefficients, a fused multiply-add
// exactly where the x86-64 FMA build has one, every other double operation rounded on its own.
// Checked against libm's expf / sinf / cosf over all 2^32 inputs (glibc 2.36, x86-64 with FMA).
// Finite inputs only for sin/cos: inf and NaN give a NaN whose payload may differ from libm's.

namespace ieee {  // single IEEE operations, round to nearest even, never contracted into an FMA

DSV4_HD inline double mul(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
DSV4_HD inline double sub(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
DSV4_HD inline double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
DSV4_HD inline uint64_t f64_bits(double x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, 8);
  return b;
#endif
}
DSV4_HD inline double f64_from_bits(uint64_t b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, 8);
  return x;
#endif
}

}  // namespace ieee

// expf's table: the bits of 2^(i/32) minus i << 47, so that adding k << 47 scales by 2^(k/32).
#define DSV4_EXP2F_TABLE                                                                              \
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
// sinf / cosf's large-argument reduction: 4/pi to 192 bits, 8 new bits per entry.
#define DSV4_INV_PIO4_TABLE                                                                        \
  {                                                                                                \
    0xa2u, 0xa2f9u, 0xa2f983u, 0xa2f9836eu, 0xf9836e4eu, 0x836e4e44u, 0x6e4e4415u, 0x4e441529u,    \
        0x441529fcu, 0x1529fc27u, 0x29fc2757u, 0xfc2757d1u, 0x2757d1f5u, 0x57d1f534u, 0xd1f534ddu, \
        0xf534ddc0u, 0x34ddc0dbu, 0xddc0db62u, 0xc0db6295u, 0xdb629599u, 0x6295993cu, 0x95993c43u, \
        0x993c4390u, 0x3c439041u                                                                   \
  }
[[maybe_unused]] __device__ const uint64_t kExp2fTableDevice[32] = DSV4_EXP2F_TABLE;
[[maybe_unused]] const uint64_t kExp2fTableHost[32] = DSV4_EXP2F_TABLE;
[[maybe_unused]] __device__ const uint32_t kInvPio4Device[24] = DSV4_INV_PIO4_TABLE;
[[maybe_unused]] const uint32_t kInvPio4Host[24] = DSV4_INV_PIO4_TABLE;
#undef DSV4_EXP2F_TABLE
#undef DSV4_INV_PIO4_TABLE

DSV4_HD inline uint64_t exp2f_table(uint32_t i) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return kExp2fTableDevice[i];
#else
  return kExp2fTableHost[i];
#endif
}
DSV4_HD inline uint32_t inv_pio4(uint32_t i) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return kInvPio4Device[i];
#else
  return kInvPio4Host[i];
#endif
}

// glibc's expf.
DSV4_HD inline float libm_expf(float x) {
  const uint32_t ux = f32_bits(x);
  const uint32_t abstop = (ux >> 20) & 0x7ffu;
  if (abstop >= 0x42bu) {  // |x| >= 88, inf or NaN
    if (ux == 0xff800000u) return 0.0f;
    if (abstop >= 0x7f8u) return x + x;
    if (x > 0x1.62e42ep6f) return f32_from_bits(0x7f800000u);  // overflow: +inf
    if (x < -0x1.9fe368p6f) return 0.0f;                        // underflow: +0
    if (x < -0x1.9d1d9ep6f) return f32_from_bits(1u);           // may underflow: 0x1.4p-75f^2 = 2^-149
  }
  constexpr double kInvLn2N = 0x1.71547652b82fep+5;  // 32 / ln 2
  constexpr double kShift = 0x1.8p+52;
  constexpr double kC0 = 0x1.c6af84b912394p-20, kC1 = 0x1.ebfce50fac4f3p-13, kC2 = 0x1.62e42ff0c52d6p-6;
  const double xd = static_cast<double>(x);
  // x * 32 / ln2 = k + r with r in [-1/2, 1/2]: k rounded by the shift trick.
  double kd = ieee::fma(kInvLn2N, xd, kShift);
  const uint64_t ki = ieee::f64_bits(kd);
  kd = ieee::sub(kd, kShift);
  const double r = ieee::fma(kInvLn2N, xd, -kd);
  // exp(x) = 2^(k/32) * 2^(r/32) ~= s * (C0 r^3 + C1 r^2 + C2 r + 1).
  const double s = ieee::f64_from_bits(exp2f_table(static_cast<uint32_t>(ki % 32)) + (ki << 47));
  const double z = ieee::fma(kC0, r, kC1);
  const double r2 = ieee::mul(r, r);
  double y = ieee::fma(kC2, r, 1.0);
  y = ieee::fma(z, r2, y);
  y = ieee::mul(y, s);
  return static_cast<float>(y);
}

// sinf / cosf's polynomials on the reduced argument (|x| <= pi/4). `negate_cos` selects the second
// coefficient table, whose cosine coefficients are negated.
DSV4_HD inline float libm_sin_poly(double x, double x2) {
  constexpr double kS1 = -0x1.555545995a603p-3, kS2 = 0x1.1107605230bc4p-7, kS3 = -0x1.994eb3774cf24p-13;
  const double x3 = ieee::mul(x2, x);
  const double x7 = ieee::mul(x2, x3);
  const double s1 = ieee::fma(x2, kS3, kS2);
  const double s = ieee::fma(x3, kS1, x);
  return static_cast<float>(ieee::fma(x7, s1, s));
}
DSV4_HD inline float libm_cos_poly(double x2, bool negate_cos) {
  const double c0 = negate_cos ? -1.0 : 1.0;
  const double c1 = negate_cos ? 0x1.ffffffd0c621cp-2 : -0x1.ffffffd0c621cp-2;
  const double c2 = negate_cos ? -0x1.55553e1068f19p-5 : 0x1.55553e1068f19p-5;
  const double c3 = negate_cos ? 0x1.6c087e89a359dp-10 : -0x1.6c087e89a359dp-10;
  const double c4 = negate_cos ? -0x1.99343027bf8c3p-16 : 0x1.99343027bf8c3p-16;
  const double x4 = ieee::mul(x2, x2);
  const double c1x = ieee::fma(x2, c1, c0);
  const double c2x = ieee::fma(x2, c4, c3);
  const double x6 = ieee::mul(x2, x4);
  const double c = ieee::fma(x4, c2, c1x);
  return static_cast<float>(ieee::fma(x6, c2x, c));
}

// Reduces |x| (finite, >= 120) to r in [-pi/4, pi/4] and the quadrant n: 4/pi times x's
// significand as exact fixed point (a 32 x 96 -> 128-bit multiply).
DSV4_HD inline double libm_reduce_large(uint32_t xi, int* np) {
  const uint32_t base = (xi >> 26) & 15u;
  const int shift = static_cast<int>((xi >> 23) & 7u);
  xi = ((xi & 0xffffffu) | 0x800000u) << shift;
  uint64_t res0 = static_cast<uint64_t>(xi * inv_pio4(base));  // 32-bit product, wrapping
  const uint64_t res1 = static_cast<uint64_t>(xi) * inv_pio4(base + 4);
  const uint64_t res2 = static_cast<uint64_t>(xi) * inv_pio4(base + 8);
  res0 = (res2 >> 32) | (res0 << 32);
  res0 += res1;
  const uint64_t n = (res0 + (1ull << 61)) >> 62;
  res0 -= n << 62;
  *np = static_cast<int>(n);
  return ieee::mul(static_cast<double>(static_cast<int64_t>(res0)), 0x1.921fb54442d18p-62);
}

// Reduces |x| < 120 to r = x - n pi/2 with n = round(x 2/pi) (scaled-integer rounding).
DSV4_HD inline double libm_reduce_fast(double x, int* np) {
  const double r = ieee::mul(x, 0x1.45f306dc9c883p+23);  // 2/pi * 2^24
  const int n = (static_cast<int32_t>(r) + 0x800000) >> 24;
  *np = n;
  return ieee::fma(-static_cast<double>(n), 0x1.921fb54442d18p+0, x);
}

// glibc's sinf (cos = false) and cosf (cos = true).
DSV4_HD inline float libm_sincosf(float y, bool cos) {
  const uint32_t xi = f32_bits(y);
  const uint32_t abstop = (xi >> 20) & 0x7ffu;
  double x = static_cast<double>(y);
  if (abstop < 0x3f4u) {  // |y| < pi/4
    const double x2 = ieee::mul(x, x);
    if (abstop < 0x398u) return cos ? 1.0f : y;  // |y| < 2^-12
    return cos ? libm_cos_poly(x2, false) : libm_sin_poly(x, x2);
  }
  int n = 0;
  int quadrant = 0;  // selects the sign and the table: n, plus 1 for a negative y on the large path
  if (abstop < 0x42fu) {  // |y| < 120
    x = libm_reduce_fast(x, &n);
    quadrant = n;
  } else if (abstop < 0x7f8u) {
    x = libm_reduce_large(xi, &n);
    quadrant = n + static_cast<int>(xi >> 31);
  } else {
    const float d = y - y;
    return d / d;  // inf or NaN: NaN
  }
  const double x2 = ieee::mul(x, x);
  const bool use_cos = ((n & 1) != 0) != cos;  // odd quadrants swap the polynomials
  if (use_cos) return libm_cos_poly(x2, (quadrant & 2) != 0);
  const double sign = ((quadrant + 1) & 2) != 0 ? -1.0 : 1.0;  // quadrants 0..3: +, -, -, +
  return libm_sin_poly(ieee::mul(x, sign), x2);
}

DSV4_HD inline float libm_sinf(float x) { return libm_sincosf(x, false); }
DSV4_HD inline float libm_cosf(float x) { return libm_sincosf(x, true); }
// ---- glibc-equivalent libm (end) -----------------------------------------------------------------

// ---- single roundings on floats (device) ---------------------------------------------------------

__device__ inline float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline float fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double dadd(double a, double b) { return __dadd_rn(a, b); }
// std::max / std::clamp on floats, comparisons in the same order (NaN behaves the same).
__device__ inline float max_like_std(float a, float b) { return a < b ? b : a; }
__device__ inline float clamp_like_std(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }

// A state row's float at a byte address: a direct load when rows keep 4-byte alignment, else bytes.
__device__ inline uint32_t load_u32(const uint8_t* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const uint32_t*>(p);
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
__device__ inline void store_u32(uint8_t* p, uint32_t v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<uint32_t*>(p) = v;
    return;
  }
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

// ---- the encoded plan ----------------------------------------------------------------------------

// The header of an encoded plan, valid only when it fits the buffer and S matches the ratio (what
// the host entry points refuse with a ContractError, the kernels answer by writing nothing).
struct PlanHeader {
  long long T = 0, B = 0, S = 0;
  bool ok = false;
  __device__ long long write_rows() const { return 3 + T; }
  __device__ long long blocks() const { return 3 + 2 * T; }
  __device__ long long sources() const { return 3 + 2 * T + 3 * B; }
  __device__ long long dest() const { return 3 + 2 * T + 3 * B + 2 * B * S; }
};

__device__ inline PlanHeader read_plan_header(const int64_t* w, long long words, long long S_expected) {
  PlanHeader h;
  if (words < 3) return h;
  h.T = w[0];
  h.B = w[1];
  h.S = w[2];
  if (h.T < 0 || h.B < 0 || h.S != S_expected || h.T > words || h.B > words) return h;
  h.ok = 3 + 2 * h.T + 3 * h.B + 2 * h.B * h.S + h.B <= words;
  return h;
}

constexpr int kThreads = 256;  // a multiple of 64: whole warps on CUDA and wavefronts on HIP
constexpr int kKindNone = static_cast<int>(CompressSource::Kind::none);
constexpr int kKindState = static_cast<int>(CompressSource::Kind::state);
constexpr int kKindInput = static_cast<int>(CompressSource::Kind::input);

// ---- compressor_pool -------------------------------------------------------------------------------

struct PoolArgs {
  const int64_t* plan;
  long long plan_words;
  long long ratio;
  int coff;
  int S;
  const float* kv;
  const float* score;
  long long kv_rows;
  const uint8_t* state;
  long long state_rows;
  long long row_bytes;
  bool state_aligned;
  long long kv_offset[2];
  long long score_offset[2];
  int hd;
  int rd;
  const float* norm;
  const float* freqs;
  bool bf16_act;
  bool rotate;
  CompressQuant quant;
  int quant_block;
  bool fp8_rounding;
  double eps;
  float* out;
};

__device__ inline float act(bool bf16, float x) { return bf16 ? round_bf16(x) : x; }

// fp8_quant_dequant_blocks / fp4_quant_dequant_blocks of host_common.h on o[0, n), one block per
// thread, then the activation rounding of the span.
__device__ inline void quant_blocks(float* o, int n, int block, bool fp4, bool round_to_e4m3, bool bf16) {
  constexpr float kInv448 = 1.0f / 448.0f;
  constexpr float kInv6 = 1.0f / 6.0f;
  const int count = (n + block - 1) / block;
  for (int q = static_cast<int>(threadIdx.x); q < count; q += static_cast<int>(blockDim.x)) {
    const int b = q * block;
    const int end = n < b + block ? n : b + block;
    float amax = 0.0f;
    for (int i = b; i < end; ++i) amax = max_like_std(amax, fabsf(o[i]));
    if (fp4) {
      const float s = round_ue8m0_ceil(fmul(max_like_std(amax, 6.0f * 0x1.0p-126f), kInv6));
      for (int i = b; i < end; ++i) o[i] = act(bf16, fmul(round_e2m1(clamp_like_std(fdiv(o[i], s), -6.0f, 6.0f)), s));
    } else {
      const float s = round_ue8m0_ceil(fmul(max_like_std(amax, 1e-4f), kInv448));
      for (int i = b; i < end; ++i) {
        const float q8 = clamp_like_std(fdiv(o[i], s), -448.0f, 448.0f);
        o[i] = act(bf16, fmul(round_to_e4m3 ? round_e4m3fn(q8) : q8, s));
      }
    }
  }
}

__global__ void pool_kernel(PoolArgs a) {
  extern __shared__ unsigned long long pool_smem[];  // 8-byte aligned
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long k = blockIdx.x;
  if (!h.ok || k >= h.B) return;
  const int S = a.S, hd = a.hd, tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const uint8_t** src_kv = reinterpret_cast<const uint8_t**>(pool_smem);
  const uint8_t** src_sc = src_kv + S;
  int* src_kind = reinterpret_cast<int*>(src_sc + S);
  float* o = reinterpret_cast<float*>(src_kind + S);
  __shared__ float inv_rms;

  // Where each source's channel 0 lives; an index outside its tensor pools as an empty source.
  for (int i = tid; i < S; i += nt) {
    const long long kind = a.plan[h.sources() + 2 * (k * S + i)];
    const long long index = a.plan[h.sources() + 2 * (k * S + i) + 1];
    const int part = (a.coff == 2 && i >= a.ratio) ? 1 : 0;  // c4: A halves first, then B halves
    int use = kKindNone;
    const uint8_t* pk = nullptr;
    const uint8_t* ps = nullptr;
    if (kind == kKindState && index >= 0 && index < a.state_rows) {
      use = kKindState;
      pk = a.state + index * a.row_bytes + a.kv_offset[part];
      ps = a.state + index * a.row_bytes + a.score_offset[part];
    } else if (kind == kKindInput && index >= 0 && index < a.kv_rows) {
      use = kKindInput;
      const long long width = static_cast<long long>(a.coff) * hd;
      pk = reinterpret_cast<const uint8_t*>(a.kv + index * width + part * hd);
      ps = reinterpret_cast<const uint8_t*>(a.score + index * width + part * hd);
    }
    src_kind[i] = use;
    src_kv[i] = pk;
    src_sc[i] = ps;
  }
  __syncthreads();

  // The reference's arithmetic per channel, in source order: fp32 exp, double sums.
  for (int j = tid; j < hd; j += nt) {
    auto score_of = [&](int i) -> float {
      const int kind = src_kind[i];
      if (kind == kKindState) return f32_from_bits(load_u32(src_sc[i] + 4 * j, a.state_aligned));
      if (kind == kKindInput) return reinterpret_cast<const float*>(src_sc[i])[j];
      return -INFINITY;  // the clean row: weight exactly 0
    };
    auto value_of = [&](int i) -> float {
      const int kind = src_kind[i];
      if (kind == kKindState) return f32_from_bits(load_u32(src_kv[i] + 4 * j, a.state_aligned));
      if (kind == kKindInput) return reinterpret_cast<const float*>(src_kv[i])[j];
      return 0.0f;
    };
    float m = score_of(0);  // std::max_element: the first of the largest
    for (int i = 1; i < S; ++i) {
      const float s = score_of(i);
      if (m < s) m = s;
    }
    double denom = 0.0;
    for (int i = 0; i < S; ++i) denom = dadd(denom, static_cast<double>(libm_expf(fsub(score_of(i), m))));
    const float sum = static_cast<float>(denom);
    double c = 0.0;
    for (int i = 0; i < S; ++i) {
      const float p = fdiv(libm_expf(fsub(score_of(i), m)), sum);
      c = dadd(c, static_cast<double>(fmul(p, value_of(i))));
    }
    o[j] = act(a.bf16_act, static_cast<float>(c));
  }
  __syncthreads();

  // RMSNorm with weight: the squares summed in double in channel order, as the host does.
  if (tid == 0) {
    double sum_sq = 0.0;
    for (int i = 0; i < hd; ++i) {
      const double x = static_cast<double>(o[i]);
      sum_sq = dadd(sum_sq, __dmul_rn(x, x));
    }
    inv_rms = static_cast<float>(__ddiv_rn(1.0, __dsqrt_rn(dadd(__ddiv_rn(sum_sq, static_cast<double>(hd)), a.eps))));
  }
  __syncthreads();
  const float inv = inv_rms;
  for (int i = tid; i < hd; i += nt) o[i] = act(a.bf16_act, fmul(fmul(o[i], inv), a.norm[i]));
  __syncthreads();

  // RoPE on the last rd dims at the block's first position b * ratio.
  const long long b = a.plan[h.blocks() + 3 * k + 1];
  const float pos = static_cast<float>(b * a.ratio);
  float* rope = o + (hd - a.rd);
  for (int j = tid; j < a.rd / 2; j += nt) {
    const float angle = fmul(pos, a.freqs[j]);
    const float cs = libm_cosf(angle), sn = libm_sinf(angle);
    const float x0 = rope[2 * j], x1 = rope[2 * j + 1];
    rope[2 * j] = act(a.bf16_act, fsub(fmul(x0, cs), fmul(x1, sn)));
    rope[2 * j + 1] = act(a.bf16_act, fadd(fmul(x0, sn), fmul(x1, cs)));
  }
  __syncthreads();

  // The indexer's normalised Walsh-Hadamard transform (Sylvester order), one stage at a time.
  if (a.rotate) {
    for (int hstep = 1; hstep < hd; hstep *= 2) {
      for (int p = tid; p < hd / 2; p += nt) {
        const int i = (p / hstep) * 2 * hstep + p % hstep;
        const float x0 = o[i], x1 = o[i + hstep];
        o[i] = fadd(x0, x1);
        o[i + hstep] = fsub(x0, x1);
      }
      __syncthreads();
    }
    const float scale = fdiv(1.0f, __fsqrt_rn(static_cast<float>(hd)));
    for (int i = tid; i < hd; i += nt) o[i] = act(a.bf16_act, fmul(o[i], scale));
    __syncthreads();
  }

  switch (a.quant) {
    case CompressQuant::none:
      break;
    case CompressQuant::fp8_nope:  // the rope dims stay bf16
      quant_blocks(o, hd - a.rd, a.quant_block, false, a.fp8_rounding, a.bf16_act);
      break;
    case CompressQuant::fp4:
      quant_blocks(o, hd, a.quant_block, true, true, a.bf16_act);
      break;
    case CompressQuant::fp8_vector:
      quant_blocks(o, hd, hd, false, true, a.bf16_act);
      break;
  }
  __syncthreads();
  float* dst = a.out + k * hd;
  for (int i = tid; i < hd; i += nt) dst[i] = o[i];
}

// ---- compressor_write_state ---------------------------------------------------------------------

struct WriteArgs {
  const int64_t* plan;
  long long plan_words;
  int S;
  long long kv_rows;
  const uint32_t* kv;  // f32 bits: copied, never computed on
  const uint32_t* score;
  uint8_t* state;
  long long state_rows;
  long long row_bytes;
  bool state_aligned;
  long long kv_offset[2];
  long long score_offset[2];
  int coff;
  int hd;
};

// True (in every thread) when one of words[first + self + 1, first + count) equals `value`: the host
// writes in order, so the last writer of a state row or cache location wins, and so does the GPU.
// Call from every thread of the block.
__device__ inline bool written_later(const int64_t* words, long long first, long long count, long long self,
                                     long long value) {
  int found = 0;
  for (long long u = self + 1 + threadIdx.x; u < count; u += blockDim.x) {
    if (words[first + u] == value) found = 1;
  }
  return __syncthreads_or(found) != 0;
}

__global__ void write_state_kernel(WriteArgs a) {
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long t = blockIdx.x;
  const long long tokens = h.T < a.kv_rows ? h.T : a.kv_rows;
  if (!h.ok || t >= tokens) return;
  const long long row = a.plan[h.write_rows() + t];
  if (row < 0 || row >= a.state_rows) return;  // -1: consumed within its own batch
  if (written_later(a.plan, h.write_rows(), tokens, t, row)) return;
  uint8_t* dst = a.state + row * a.row_bytes;
  const int width = a.coff * a.hd;
  // Full width for c4: the A half is read by the next block's overlap, the B half by this block.
  for (int e = static_cast<int>(threadIdx.x); e < width; e += static_cast<int>(blockDim.x)) {
    const int part = e / a.hd, j = e % a.hd;
    store_u32(dst + a.kv_offset[part] + 4 * j, a.kv[t * width + e], a.state_aligned);
    store_u32(dst + a.score_offset[part] + 4 * j, a.score[t * width + e], a.state_aligned);
  }
}

// ---- compressor_store ------------------------------------------------------------------------------

struct StoreArgs {
  const int64_t* plan;
  long long plan_words;
  int S;
  const float* entries;
  long long capacity;  // entries rows
  int dims;
  long long locations;
  bool model1;
  // f32 rows
  float* rows;
  // MODEL1 pages
  uint8_t* cache;
  long long page_size;
  long long page_bytes;
  int rope_dim;
  int scale_block;
  int scale_count;
  int value_bytes;
  int scale_bytes;
};

__global__ void store_kernel(StoreArgs a) {
  extern __shared__ float block_scale[];  // MODEL1: scale_count
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long k = blockIdx.x;
  const long long blocks = h.B < a.capacity ? h.B : a.capacity;
  if (!h.ok || k >= blocks) return;
  const long long loc = a.plan[h.dest() + k];
  if (loc < 0 || loc >= a.locations) return;
  if (written_later(a.plan, h.dest(), blocks, k, loc)) return;
  const float* e = a.entries + k * a.dims;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  if (!a.model1) {
    float* dst = a.rows + loc * a.dims;
    for (int i = tid; i < a.dims; i += nt) dst[i] = e[i];
    return;
  }
  // model1_pack_entry at page loc / page_size, slot loc % page_size.
  uint8_t* page = a.cache + (loc / a.page_size) * a.page_bytes;
  const long long slot = loc % a.page_size;
  uint8_t* values = page + slot * a.value_bytes;
  uint8_t* scales = page + a.page_size * a.value_bytes + slot * a.scale_bytes;
  constexpr float kInv448 = 1.0f / kE4m3fnMaxF32;
  for (int q = tid; q < a.scale_count; q += nt) {
    float amax = 0.0f;
    for (int i = q * a.scale_block; i < (q + 1) * a.scale_block; ++i) amax = max_like_std(amax, fabsf(e[i]));
    const float scale = round_ue8m0_ceil(fmul(max_like_std(amax, 1e-4f), kInv448));  // e4m3_block_scale
    block_scale[q] = scale;
    scales[q] = f32_to_ue8m0_ceil(scale);  // exact: the scale is a power of two
  }
  for (int q = a.scale_count + tid; q < a.scale_bytes; q += nt) scales[q] = 0;
  __syncthreads();
  const int nope = a.dims - a.rope_dim;
  for (int i = tid; i < nope; i += nt) {
    values[i] = f32_to_e4m3fn(clamp_like_std(fdiv(e[i], block_scale[i / a.scale_block]), -kE4m3fnMaxF32, kE4m3fnMaxF32));
  }
  for (int i = tid; i < a.rope_dim; i += nt) {
    const uint16_t code = f32_to_bf16(e[nope + i]);
    values[nope + 2 * i] = static_cast<uint8_t>(code & 0xFFu);
    values[nope + 2 * i + 1] = static_cast<uint8_t>(code >> 8);
  }
}

bool aligned4(const void* p, long long row_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 4 == 0 && row_bytes % 4 == 0;
}

constexpr long long kSmemLimit = 48 * 1024;  // no opt-in attribute needed

}  // namespace

namespace cuda {

void compressor_pool(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, const Tensor& state,
                     const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                     const CompressPostprocess& post, Tensor& entries_out, void* stream) {
  const long long capacity = entries_out.size(0);
  if (capacity == 0) return;
  PoolArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.ratio = ratio;
  a.coff = static_cast<int>(layout.coff);
  a.S = static_cast<int>(layout.coff * ratio);
  a.kv = kv.data<float>();
  a.score = score.data<float>();
  a.kv_rows = kv.size(0);
  a.state = state.data<uint8_t>();
  a.state_rows = state.size(0);
  a.row_bytes = layout.row_bytes;
  a.state_aligned = aligned4(a.state, layout.row_bytes);
  for (int p = 0; p < 2; ++p) {
    a.kv_offset[p] = layout.kv_offset_bytes[p];
    a.score_offset[p] = layout.score_offset_bytes[p];
  }
  a.hd = static_cast<int>(layout.dims);
  a.rd = static_cast<int>(2 * rope_freqs.size(0));
  a.norm = norm_weight.data<float>();
  a.freqs = rope_freqs.data<float>();
  a.bf16_act = post.bf16_act;
  a.rotate = post.rotate;
  a.quant = post.quant;
  a.quant_block = static_cast<int>(post.quant_block);
  a.fp8_rounding = post.fp8_rounding;
  a.eps = post.norm_eps;
  a.out = entries_out.data<float>();
  const long long smem = static_cast<long long>(a.S) * (2 * sizeof(void*) + sizeof(int)) + 4LL * a.hd;
  if (smem > kSmemLimit) {
    throw ContractError("compressor_pool", "layout", "dims " + std::to_string(a.hd) + " and " + std::to_string(a.S) +
                                                         " sources need more shared memory than the GPU kernel has");
  }
  pool_kernel<<<static_cast<unsigned>(capacity), kThreads, static_cast<size_t>(smem), static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_pool");
}

void compressor_write_state(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, Tensor& state,
                            const CompressStateLayout& layout, void* stream) {
  const long long tokens = kv.size(0);
  if (tokens == 0 || state.size(0) == 0) return;
  WriteArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.S = static_cast<int>(layout.coff * ratio);
  a.kv_rows = tokens;
  a.kv = static_cast<const uint32_t*>(kv.data_ptr());
  a.score = static_cast<const uint32_t*>(score.data_ptr());
  a.state = state.data<uint8_t>();
  a.state_rows = state.size(0);
  a.row_bytes = layout.row_bytes;
  a.state_aligned = aligned4(a.state, layout.row_bytes);
  for (int p = 0; p < 2; ++p) {
    a.kv_offset[p] = layout.kv_offset_bytes[p];
    a.score_offset[p] = layout.score_offset_bytes[p];
  }
  a.coff = static_cast<int>(layout.coff);
  a.hd = static_cast<int>(layout.dims);
  write_state_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_write_state");
}

void compressor_store(const Tensor& plan, int64_t ratio, const Tensor& entries, Tensor& cache,
                      const Model1Layout& model1, int64_t page_size, void* stream) {
  const long long capacity = entries.size(0);
  StoreArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.S = static_cast<int>((ratio == 4 ? 2 : 1) * ratio);
  a.entries = entries.data<float>();
  a.capacity = capacity;
  a.dims = static_cast<int>(entries.size(1));
  a.model1 = cache.dtype() == DType::u8;
  size_t smem = 0;
  if (a.model1) {
    a.cache = cache.data<uint8_t>();
    a.page_size = page_size;
    a.page_bytes = model1.page_bytes(page_size);
    a.locations = cache.size(0) * page_size;
    a.rope_dim = static_cast<int>(model1.rope_dim);
    a.scale_block = static_cast<int>(model1.scale_block);
    a.scale_count = static_cast<int>(model1.scale_count());
    a.value_bytes = static_cast<int>(model1.value_bytes());
    a.scale_bytes = static_cast<int>(model1.scale_bytes());
    smem = static_cast<size_t>(a.scale_count) * sizeof(float);
  } else {
    a.rows = cache.data<float>();
    a.locations = a.dims > 0 ? cache.numel() / a.dims : 0;
  }
  if (capacity == 0 || a.locations == 0) return;
  store_kernel<<<static_cast<unsigned>(capacity), kThreads, smem, static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_store");
}

}  // namespace cuda
}  // namespace dsv4::kernels
