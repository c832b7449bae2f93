// Scalar conversions between f32 and the narrow number formats of DeepSeek-V4 checkpoints and
// kernels: bf16, f16, FP8 (e4m3fn, e4m3fnuz, e5m2), MX FP4 (e2m1) and the MX scale ue8m0.
//
// Every conversion is `inline DSV4_HD` so host code and CUDA/HIP kernels share one definition.
// Encoders round to nearest, ties to even, and treat f32 subnormal inputs as real values (no
// flush to zero). The fp8/fp4 encoders saturate like CUDA's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...) and __nv_cvt_float_to_fp4(x, __NV_E2M1,
// cudaRoundNearest): anything beyond the largest finite value, infinities included, becomes ±max.
// The oracle these are tested against lives in reference/formats_spec.h and shares no code.
#pragma once

#include <cstdint>
#include <cstring>

#include "engine/core/dtype.h"
#include "engine/core/hd.h"
#include "engine/faults/faults.h"

namespace dsv4 {

// Largest finite magnitudes, for callers that compute scales (amax / max).
inline constexpr float kBf16MaxF32 = 3.38953139e38f;  // 0x7F7F
inline constexpr float kF16MaxF32 = 65504.0f;
inline constexpr float kE4m3fnMaxF32 = 448.0f;
inline constexpr float kE4m3fnuzMaxF32 = 240.0f;
inline constexpr float kE5m2MaxF32 = 57344.0f;
inline constexpr float kE2m1MaxF32 = 6.0f;

// ---- bit casts that work on the host and in device code ----------------------------------------

DSV4_HD inline uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

DSV4_HD inline float f32_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

namespace detail {

inline constexpr uint32_t kF32SignMask = 0x80000000u;
inline constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
inline constexpr uint32_t kF32InfBits = 0x7F800000u;
inline constexpr uint32_t kF32QuietNanBits = 0x7FC00000u;

// Rounds a finite-or-infinite f32 magnitude (sign cleared, not NaN) to the magnitude code of a
// binary format with kManBits mantissa bits and exponent bias kBias, ties to even. The result is
// unbounded above: callers clamp it to their largest finite code (or infinity). A carry out of
// the mantissa moves into the exponent field, which is exactly the next binade's code, and a
// subnormal rounding up to 2^kManBits is exactly the smallest normal code.
template <int kManBits, int kBias>
DSV4_HD inline uint32_t round_magnitude(uint32_t abs_bits) {
  constexpr int kMinNormalExp = 1 - kBias;
  const uint32_t exp_field = abs_bits >> 23;
  const uint32_t man_field = abs_bits & 0x7FFFFFu;
  // f32 subnormals have the exponent of the smallest f32 normal, without the implicit bit.
  const int exp = (exp_field == 0 ? 1 : static_cast<int>(exp_field)) - 127;
  uint32_t head;
  uint32_t rest;
  int shift;
  if (exp >= kMinNormalExp) {
    // Target normal (or, for bf16 only, f32 subnormal -> bf16 subnormal with field 0).
    shift = 23 - kManBits;
    const uint32_t target_exp_field = static_cast<uint32_t>(static_cast<int>(exp_field) - 127 + kBias);
    head = (target_exp_field << kManBits) | (man_field >> shift);
    rest = man_field & ((1u << shift) - 1u);
  } else {
    // Target subnormal: keep the implicit bit and shift it down into the mantissa.
    const uint32_t significand = man_field | (exp_field != 0 ? 0x800000u : 0u);
    shift = 23 - kManBits + (kMinNormalExp - exp);
    // Below half the smallest subnormal (significand < 2^24 <= half): rounds to zero.
    if (shift > 24) return 0;
    head = significand >> shift;
    rest = significand & ((1u << shift) - 1u);
  }
  const uint32_t half = 1u << (shift - 1);
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
  // Fault fp8-round-half-up: the e4m3 ties go away from zero (a bit-twiddled software conversion).
  const bool ties_up = rest == half && kManBits == 3 && faults::enabled(faults::Fault::fp8_round_half_up);
#else
  constexpr bool ties_up = false;
#endif
  if (rest > half || (rest == half && ((head & 1u) != 0 || ties_up))) ++head;
  return head;
}

// Value of a finite magnitude code of a binary format (no specials), as an f32.
template <int kManBits, int kBias>
DSV4_HD inline float decode_magnitude(uint32_t mag_code) {
  const uint32_t exp_field = mag_code >> kManBits;
  const uint32_t man_field = mag_code & ((1u << kManBits) - 1u);
  if (exp_field == 0) {
    // Subnormal: man * 2^(1 - bias - man_bits); a small integer times a power of two is exact.
    constexpr uint32_t kScaleBits = static_cast<uint32_t>(127 + 1 - kBias - kManBits) << 23;
    return static_cast<float>(man_field) * f32_from_bits(kScaleBits);
  }
  return f32_from_bits(((exp_field - kBias + 127) << 23) | (man_field << (23 - kManBits)));
}

DSV4_HD inline float with_sign(float magnitude, bool negative) {
  return f32_from_bits(f32_bits(magnitude) | (negative ? kF32SignMask : 0u));
}

DSV4_HD inline float quiet_nan_f32(bool negative) {
  return f32_from_bits(kF32QuietNanBits | (negative ? kF32SignMask : 0u));
}

}  // namespace detail

// ---- bf16 ----------------------------------------------------------------------------------------

DSV4_HD inline float bf16_to_f32(uint16_t code) {
  // bf16 is the top half of an f32; NaN payloads (and signalling NaNs) pass through unchanged.
  return f32_from_bits(static_cast<uint32_t>(code) << 16);
}

DSV4_HD inline uint16_t f32_to_bf16(float x) {
  const uint32_t bits = f32_bits(x);
  if ((bits & detail::kF32AbsMask) > detail::kF32InfBits) {
    // Keep sign and top payload bits; set the quiet bit so a NaN never truncates to inf.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  // Adding 0x7FFF plus the kept LSB rounds to nearest even; overflow carries into inf correctly.
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

// ---- f16 (IEEE binary16) -------------------------------------------------------------------------

DSV4_HD inline float f16_to_f32(uint16_t code) {
  const bool negative = (code & 0x8000u) != 0;
  const uint32_t mag = code & 0x7FFFu;
  if (mag >= 0x7C00u) {
    if (mag == 0x7C00u) return detail::with_sign(f32_from_bits(detail::kF32InfBits), negative);
    // Quiet the NaN, keep its payload.
    const uint32_t payload = (mag & 0x3FFu) << 13;
    return f32_from_bits((negative ? detail::kF32SignMask : 0u) | detail::kF32QuietNanBits | payload);
  }
  return detail::with_sign(detail::decode_magnitude<10, 15>(mag), negative);
}

DSV4_HD inline uint16_t f32_to_f16(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) {
    return static_cast<uint16_t>(sign | 0x7E00u | ((abs_bits >> 13) & 0x1FFu));
  }
  uint32_t mag = detail::round_magnitude<10, 15>(abs_bits);
  if (mag > 0x7C00u) mag = 0x7C00u;  // IEEE overflow: infinity, not saturation
  return static_cast<uint16_t>(sign | mag);
}

// ---- FP8 e4m3fn (OCP): bias 7, max 448, NaN S.1111.111, no inf ------------------------------------

DSV4_HD inline float e4m3fn_to_f32(uint8_t code) {
  const bool negative = (code & 0x80u) != 0;
  const uint32_t mag = code & 0x7Fu;
  if (mag == 0x7Fu) return detail::quiet_nan_f32(negative);
  return detail::with_sign(detail::decode_magnitude<3, 7>(mag), negative);
}

DSV4_HD inline uint8_t f32_to_e4m3fn(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs_bits = bits & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) return static_cast<uint8_t>(sign | 0x7Fu);
  uint32_t mag = detail::round_magnitude<3, 7>(abs_bits);
  if (mag > 0x7Eu) mag = 0x7Eu;  // saturate; 0x7F would be NaN
  return static_cast<uint8_t>(sign | mag);
}

// ---- FP8 e4m3fnuz: bias 8, max 240, NaN = 0x80, no inf, no negative zero ---------------------------

DSV4_HD inline float e4m3fnuz_to_f32(uint8_t code) {
  if (code == 0x80u) return detail::quiet_nan_f32(false);
  const bool negative = (code & 0x80u) != 0;
  return detail::with_sign(detail::decode_magnitude<3, 8>(code & 0x7Fu), negative);
}

DSV4_HD inline uint8_t f32_to_e4m3fnuz(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t abs_bits = bits & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) return 0x80u;
  uint32_t mag = detail::round_magnitude<3, 8>(abs_bits);
  if (mag > 0x7Fu) mag = 0x7Fu;
  // A negative value rounding to zero must not produce 0x80, which is this format's NaN.
  if (mag == 0) return 0x00u;
  return static_cast<uint8_t>(((bits >> 24) & 0x80u) | mag);
}

// ---- FP8 e5m2 (OCP): bias 15, max 57344, IEEE-like inf and NaN ------------------------------------

DSV4_HD inline float e5m2_to_f32(uint8_t code) {
  // e5m2 is exactly the top byte of an IEEE binary16.
  return f16_to_f32(static_cast<uint16_t>(static_cast<uint16_t>(code) << 8));
}

DSV4_HD inline uint8_t f32_to_e5m2(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs_bits = bits & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) return static_cast<uint8_t>(sign | 0x7Eu);
  uint32_t mag = detail::round_magnitude<2, 15>(abs_bits);
  if (mag > 0x7Bu) mag = 0x7Bu;  // saturate, infinities included
  return static_cast<uint8_t>(sign | mag);
}

// ---- FP4 e2m1 (OCP MX): bias 1, max 6, no inf/NaN; a nibble 0..15 ----------------------------------

DSV4_HD inline float e2m1_to_f32(uint8_t nibble) {
  const bool negative = (nibble & 0x8u) != 0;
  return detail::with_sign(detail::decode_magnitude<1, 1>(nibble & 0x7u), negative);
}

DSV4_HD inline uint8_t f32_to_e2m1(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t abs_bits = bits & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) return 0x7u;  // no NaN in e2m1: CUDA gives +max
  uint32_t mag = detail::round_magnitude<1, 1>(abs_bits);
  if (mag > 0x7u) mag = 0x7u;
  return static_cast<uint8_t>(((bits >> 28) & 0x8u) | mag);
}

// ---- ue8m0 (OCP MX scale): 2^(code - 127), 0xFF = NaN ---------------------------------------------

DSV4_HD inline float ue8m0_to_f32(uint8_t code) {
  if (code == 0xFFu) return detail::quiet_nan_f32(false);
  if (code == 0) return f32_from_bits(0x00400000u);  // 2^-127 is an f32 subnormal
  return f32_from_bits(static_cast<uint32_t>(code) << 23);
}

// Smallest 2^k >= |x|, clamped to [2^-127, 2^127]; NaN -> 0xFF. Rounding up keeps x / scale
// within the element format's range, which is why MX scales are taken as a ceiling here.
DSV4_HD inline uint8_t f32_to_ue8m0_ceil(float x) {
  const uint32_t abs_bits = f32_bits(x) & detail::kF32AbsMask;
  if (abs_bits > detail::kF32InfBits) return 0xFFu;
  const uint32_t exp_field = abs_bits >> 23;
  const uint32_t man_field = abs_bits & 0x7FFFFFu;
  if (exp_field == 0) return man_field <= 0x400000u ? 0u : 1u;  // zero and f32 subnormals
  // A power of two 2^(e-127) has code e; anything with a mantissa needs the next power.
  uint32_t code = exp_field + (man_field != 0 ? 1u : 0u);
  if (code > 0xFEu) code = 0xFEu;
  return static_cast<uint8_t>(code);
}

// ---- fp4 packing: element 2i in the low nibble of byte i, element 2i+1 in the high nibble -------

DSV4_HD inline uint8_t fp4_get(const uint8_t* packed, int64_t index) {
  const int shift = static_cast<int>(index & 1) * 4;
  return static_cast<uint8_t>((packed[index >> 1] >> shift) & 0xFu);
}

DSV4_HD inline void fp4_set(uint8_t* packed, int64_t index, uint8_t nibble) {
  const int shift = static_cast<int>(index & 1) * 4;
  uint8_t& byte = packed[index >> 1];
  byte = static_cast<uint8_t>((byte & ~(0xFu << shift)) | ((nibble & 0xFu) << shift));
}

// ---- quantize-dequantize through a format ----------------------------------------------------------

DSV4_HD inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
DSV4_HD inline float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }
DSV4_HD inline float round_e4m3fn(float x) { return e4m3fn_to_f32(f32_to_e4m3fn(x)); }
DSV4_HD inline float round_e4m3fnuz(float x) { return e4m3fnuz_to_f32(f32_to_e4m3fnuz(x)); }
DSV4_HD inline float round_e5m2(float x) { return e5m2_to_f32(f32_to_e5m2(x)); }
DSV4_HD inline float round_e2m1(float x) { return e2m1_to_f32(f32_to_e2m1(x)); }
DSV4_HD inline float round_ue8m0_ceil(float x) { return ue8m0_to_f32(f32_to_ue8m0_ceil(x)); }

// ---- by dtype, for kernels that take the format as an argument ---------------------------------

DSV4_HD inline bool is_narrow_float(DType dtype) {
  return dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f8_e4m3fn ||
         dtype == DType::f8_e4m3fnuz || dtype == DType::f8_e5m2 || dtype == DType::f4_e2m1 ||
         dtype == DType::ue8m0;
}

// The code of `value` in a narrow float format (a nibble for f4_e2m1). The caller has checked
// is_narrow_float(dtype); anything else returns 0.
DSV4_HD inline uint32_t encode_narrow(DType dtype, float value) {
  switch (dtype) {
    case DType::bf16: return f32_to_bf16(value);
    case DType::f16: return f32_to_f16(value);
    case DType::f8_e4m3fn: return f32_to_e4m3fn(value);
    case DType::f8_e4m3fnuz: return f32_to_e4m3fnuz(value);
    case DType::f8_e5m2: return f32_to_e5m2(value);
    case DType::f4_e2m1: return f32_to_e2m1(value);
    case DType::ue8m0: return f32_to_ue8m0_ceil(value);
    default: return 0;
  }
}

DSV4_HD inline float decode_narrow(DType dtype, uint32_t code) {
  switch (dtype) {
    case DType::bf16: return bf16_to_f32(static_cast<uint16_t>(code));
    case DType::f16: return f16_to_f32(static_cast<uint16_t>(code));
    case DType::f8_e4m3fn: return e4m3fn_to_f32(static_cast<uint8_t>(code));
    case DType::f8_e4m3fnuz: return e4m3fnuz_to_f32(static_cast<uint8_t>(code));
    case DType::f8_e5m2: return e5m2_to_f32(static_cast<uint8_t>(code));
    case DType::f4_e2m1: return e2m1_to_f32(static_cast<uint8_t>(code & 0xFu));
    case DType::ue8m0: return ue8m0_to_f32(static_cast<uint8_t>(code));
    default: return 0.0f;
  }
}

// A code of a narrow float dtype in a packed byte buffer (fp4: a nibble, low first; 16-bit codes
// little-endian), element `index`. Byte-wise so device code needs no alignment.
DSV4_HD inline uint32_t load_code(DType dtype, const uint8_t* base, int64_t index) {
  if (dtype == DType::f4_e2m1) return fp4_get(base, index);
  if (dtype == DType::bf16 || dtype == DType::f16) {
    return static_cast<uint32_t>(base[2 * index]) | (static_cast<uint32_t>(base[2 * index + 1]) << 8);
  }
  return base[index];
}

DSV4_HD inline void store_code(DType dtype, uint8_t* base, int64_t index, uint32_t code) {
  if (dtype == DType::f4_e2m1) {
    fp4_set(base, index, static_cast<uint8_t>(code));
  } else if (dtype == DType::bf16 || dtype == DType::f16) {
    base[2 * index] = static_cast<uint8_t>(code & 0xFFu);
    base[2 * index + 1] = static_cast<uint8_t>(code >> 8);
  } else {
    base[index] = static_cast<uint8_t>(code);
  }
}

// ---- generic, host only (formats.cpp) ----------------------------------------------------------

// Code (16, 8 or 4 bits, zero-extended) of `value` in a narrow float dtype (bf16, f16, the fp8s,
// f4_e2m1, ue8m0 via the ceiling encoder). Throws ContractError for other dtypes.
uint32_t encode_f32(DType dtype, float value);
// Value of a code of a narrow float dtype. Throws ContractError for other dtypes.
float decode_f32(DType dtype, uint32_t code);

// Element `index` of a densely packed buffer of `dtype` (fp4: low nibble first), as a double.
// Integers and bool load as their value.
double load_element_f64(DType dtype, const void* base, int64_t index);
// Writes element `index`. f64 and f32 store exactly (f32: after rounding the double to f32);
// the narrow floats go double -> f32 -> encoder above (so two roundings); ue8m0 uses the ceiling
// encoder. Integers round to nearest, ties to even, and saturate; NaN stores 0. bool stores
// value != 0 (NaN -> true).
void store_element_f64(DType dtype, void* base, int64_t index, double value);

}  // namespace dsv4
