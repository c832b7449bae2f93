// engine/core/formats.h against the spec oracle (reference/formats_spec.h): every code of every
// decoder, hand-picked encoder cases (saturation, ties, subnormals, signed zeros, NaN), fp4
// packing, the ue8m0 ceiling, and the generic load/store by dtype.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "reference/formats_spec.h"

namespace dsv4 {
namespace {

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

uint32_t to_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

const float kNan = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// Same value with the same sign (so -0 != +0), or both NaN.
::testing::AssertionResult same_value(double want, double got) {
  if (std::isnan(want) && std::isnan(got)) return ::testing::AssertionSuccess();
  if (got == want && std::signbit(got) == std::signbit(want)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "want " << want << " got " << got;
}

// ---- decoders: every code -------------------------------------------------------------------------

template <typename Decode>
void check_every_code(DType dtype, Decode decode, bool nan_must_be_quiet) {
  const uint32_t codes = uint32_t{1} << spec_code_bits(dtype);
  int failures = 0;
  for (uint32_t code = 0; code < codes && failures < 10; ++code) {
    const float got = decode(code);
    const double want = spec_decode(dtype, code);
    const auto result = same_value(want, got);
    EXPECT_TRUE(result) << dtype_name(dtype) << " code 0x" << std::hex << code;
    if (!result) ++failures;
    if (nan_must_be_quiet && std::isnan(got)) {
      EXPECT_NE(to_bits(got) & 0x00400000u, 0u) << "signalling NaN from code 0x" << std::hex << code;
    }
    // The generic entry point must agree bit for bit.
    EXPECT_EQ(to_bits(decode_f32(dtype, code)), to_bits(got)) << "code 0x" << std::hex << code;
  }
}

TEST(FormatsDecode, Bf16EveryCode) {
  // bf16 -> f32 is a pure widening, so signalling NaNs stay signalling.
  check_every_code(DType::bf16, [](uint32_t c) { return bf16_to_f32(static_cast<uint16_t>(c)); },
                   false);
}

TEST(FormatsDecode, F16EveryCode) {
  check_every_code(DType::f16, [](uint32_t c) { return f16_to_f32(static_cast<uint16_t>(c)); },
                   true);
}

TEST(FormatsDecode, E4m3fnEveryCode) {
  check_every_code(DType::f8_e4m3fn,
                   [](uint32_t c) { return e4m3fn_to_f32(static_cast<uint8_t>(c)); }, true);
}

TEST(FormatsDecode, E4m3fnuzEveryCode) {
  check_every_code(DType::f8_e4m3fnuz,
                   [](uint32_t c) { return e4m3fnuz_to_f32(static_cast<uint8_t>(c)); }, true);
}

TEST(FormatsDecode, E5m2EveryCode) {
  check_every_code(DType::f8_e5m2, [](uint32_t c) { return e5m2_to_f32(static_cast<uint8_t>(c)); },
                   true);
}

TEST(FormatsDecode, E2m1EveryCode) {
  check_every_code(DType::f4_e2m1, [](uint32_t c) { return e2m1_to_f32(static_cast<uint8_t>(c)); },
                   true);
}

TEST(FormatsDecode, Ue8m0EveryCode) {
  check_every_code(DType::ue8m0, [](uint32_t c) { return ue8m0_to_f32(static_cast<uint8_t>(c)); },
                   true);
}

TEST(FormatsDecode, SpecialCodes) {
  EXPECT_TRUE(std::isnan(e4m3fn_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3fn_to_f32(0xFF)));
  EXPECT_EQ(e4m3fn_to_f32(0x7E), 448.0f);
  EXPECT_TRUE(std::isnan(e4m3fnuz_to_f32(0x80)));
  EXPECT_EQ(e4m3fnuz_to_f32(0x7F), 240.0f);
  EXPECT_EQ(e4m3fnuz_to_f32(0xFF), -240.0f);
  EXPECT_EQ(e5m2_to_f32(0x7C), kInf);
  EXPECT_EQ(e5m2_to_f32(0xFC), -kInf);
  EXPECT_TRUE(std::isnan(e5m2_to_f32(0x7D)));
  EXPECT_TRUE(std::isnan(e5m2_to_f32(0x7F)));
  EXPECT_EQ(e5m2_to_f32(0x7B), 57344.0f);
  EXPECT_EQ(e2m1_to_f32(0x7), 6.0f);
  EXPECT_EQ(e2m1_to_f32(0xF), -6.0f);
  EXPECT_EQ(e2m1_to_f32(0x1), 0.5f);
  EXPECT_EQ(to_bits(e2m1_to_f32(0x8)), 0x80000000u);
  EXPECT_EQ(ue8m0_to_f32(127), 1.0f);
  EXPECT_EQ(ue8m0_to_f32(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(ue8m0_to_f32(254), std::ldexp(1.0f, 127));
  EXPECT_TRUE(std::isnan(ue8m0_to_f32(0xFF)));
}

// ---- encoders: every finite code survives decode -> encode ------------------------------------------

template <typename Encode>
void check_round_trip(DType dtype, Encode encode) {
  const uint32_t codes = uint32_t{1} << spec_code_bits(dtype);
  for (uint32_t code = 0; code < codes; ++code) {
    const double value = spec_decode(dtype, code);
    if (std::isnan(value)) continue;
    EXPECT_EQ(encode(static_cast<float>(value)), code)
        << dtype_name(dtype) << " code 0x" << std::hex << code;
  }
}

TEST(FormatsEncode, EveryCodeRoundTrips) {
  check_round_trip(DType::bf16, [](float x) { return uint32_t{f32_to_bf16(x)}; });
  check_round_trip(DType::f16, [](float x) { return uint32_t{f32_to_f16(x)}; });
  check_round_trip(DType::f8_e4m3fn, [](float x) { return uint32_t{f32_to_e4m3fn(x)}; });
  check_round_trip(DType::f8_e4m3fnuz, [](float x) { return uint32_t{f32_to_e4m3fnuz(x)}; });
  // e5m2 saturates, so its infinities do not round-trip; they are checked by hand below.
  const auto e5m2 = [](float x) { return std::isinf(x) ? 0x7Cu | (std::signbit(x) ? 0x80u : 0u)
                                                       : uint32_t{f32_to_e5m2(x)}; };
  check_round_trip(DType::f8_e5m2, e5m2);
  check_round_trip(DType::f4_e2m1, [](float x) { return uint32_t{f32_to_e2m1(x)}; });
  check_round_trip(DType::ue8m0, [](float x) { return uint32_t{f32_to_ue8m0_ceil(x)}; });
}

// ---- encoders: hand-picked cases ---------------------------------------------------------------------

TEST(FormatsEncode, E4m3fnCases) {
  EXPECT_EQ(f32_to_e4m3fn(448.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3fn(-448.0f), 0xFE);
  EXPECT_EQ(f32_to_e4m3fn(449.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3fn(464.0f), 0x7E);  // the 448/480 midpoint saturates, never NaN
  EXPECT_EQ(f32_to_e4m3fn(1e30f), 0x7E);
  EXPECT_EQ(f32_to_e4m3fn(kInf), 0x7E);
  EXPECT_EQ(f32_to_e4m3fn(-kInf), 0xFE);
  EXPECT_EQ(f32_to_e4m3fn(kNan), 0x7F);
  EXPECT_EQ(f32_to_e4m3fn(-kNan), 0xFF);
  EXPECT_EQ(f32_to_e4m3fn(0.0f), 0x00);
  EXPECT_EQ(f32_to_e4m3fn(-0.0f), 0x80);
  EXPECT_EQ(f32_to_e4m3fn(1.0f), 0x38);
  // Ties to even: 1.0625 lies between 1.0 (0x38) and 1.125 (0x39).
  EXPECT_EQ(f32_to_e4m3fn(1.0625f), 0x38);
  EXPECT_EQ(f32_to_e4m3fn(1.1875f), 0x3A);  // between 0x39 and 0x3A
  EXPECT_EQ(f32_to_e4m3fn(17.0f), 0x58);    // between 16 (0x58) and 18 (0x59)
  EXPECT_EQ(f32_to_e4m3fn(std::nextafter(1.0625f, 2.0f)), 0x39);
  // Subnormals: smallest is 2^-9.
  EXPECT_EQ(f32_to_e4m3fn(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(f32_to_e4m3fn(std::ldexp(1.0f, -10)), 0x00);  // half of it: tie to zero
  EXPECT_EQ(f32_to_e4m3fn(-std::ldexp(1.0f, -10)), 0x80);
  EXPECT_EQ(f32_to_e4m3fn(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(f32_to_e4m3fn(std::ldexp(3.0f, -10)), 0x02);  // 1.5 subnormal steps: tie up to even
  EXPECT_EQ(f32_to_e4m3fn(std::ldexp(7.5f, -9)), 0x08);   // rounds up into the smallest normal
  EXPECT_EQ(f32_to_e4m3fn(from_bits(0x00000001u)), 0x00);  // f32 subnormal
  EXPECT_EQ(f32_to_e4m3fn(from_bits(0x80000001u)), 0x80);
}

TEST(FormatsEncode, E4m3fnuzCases) {
  EXPECT_EQ(f32_to_e4m3fnuz(240.0f), 0x7F);
  EXPECT_EQ(f32_to_e4m3fnuz(248.0f), 0x7F);  // 240/256 midpoint saturates
  EXPECT_EQ(f32_to_e4m3fnuz(1e30f), 0x7F);
  EXPECT_EQ(f32_to_e4m3fnuz(-kInf), 0xFF);
  EXPECT_EQ(f32_to_e4m3fnuz(kNan), 0x80);
  EXPECT_EQ(f32_to_e4m3fnuz(-kNan), 0x80);
  EXPECT_EQ(f32_to_e4m3fnuz(1.0f), 0x40);
  EXPECT_EQ(f32_to_e4m3fnuz(-1.0f), 0xC0);
  // No negative zero: 0x80 is NaN.
  EXPECT_EQ(f32_to_e4m3fnuz(-0.0f), 0x00);
  EXPECT_EQ(f32_to_e4m3fnuz(-1e-30f), 0x00);
  EXPECT_EQ(f32_to_e4m3fnuz(std::ldexp(1.0f, -10)), 0x01);
  EXPECT_EQ(f32_to_e4m3fnuz(-std::ldexp(1.0f, -10)), 0x81);
  EXPECT_EQ(f32_to_e4m3fnuz(-std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(f32_to_e4m3fnuz(1.0625f), 0x40);
}

TEST(FormatsEncode, E5m2Cases) {
  EXPECT_EQ(f32_to_e5m2(57344.0f), 0x7B);
  EXPECT_EQ(f32_to_e5m2(61440.0f), 0x7B);  // midpoint to "65536": saturates
  EXPECT_EQ(f32_to_e5m2(1e30f), 0x7B);
  EXPECT_EQ(f32_to_e5m2(kInf), 0x7B);
  EXPECT_EQ(f32_to_e5m2(-kInf), 0xFB);
  EXPECT_TRUE(spec_is_nan(DType::f8_e5m2, f32_to_e5m2(kNan)));
  EXPECT_TRUE(spec_is_nan(DType::f8_e5m2, f32_to_e5m2(-kNan)));
  EXPECT_EQ(f32_to_e5m2(-kNan) & 0x80, 0x80);
  EXPECT_EQ(f32_to_e5m2(1.0f), 0x3C);
  EXPECT_EQ(f32_to_e5m2(1.125f), 0x3C);  // tie between 0x3C and 0x3D
  EXPECT_EQ(f32_to_e5m2(1.375f), 0x3E);  // tie between 0x3D and 0x3E
  EXPECT_EQ(f32_to_e5m2(std::ldexp(1.0f, -16)), 0x01);
  EXPECT_EQ(f32_to_e5m2(std::ldexp(1.0f, -17)), 0x00);
  EXPECT_EQ(f32_to_e5m2(-std::ldexp(1.0f, -17)), 0x80);
  EXPECT_EQ(f32_to_e5m2(-0.0f), 0x80);
}

TEST(FormatsEncode, E2m1Cases) {
  EXPECT_EQ(f32_to_e2m1(6.0f), 0x7);
  EXPECT_EQ(f32_to_e2m1(7.0f), 0x7);
  EXPECT_EQ(f32_to_e2m1(1e30f), 0x7);
  EXPECT_EQ(f32_to_e2m1(-kInf), 0xF);
  EXPECT_EQ(f32_to_e2m1(kNan), 0x7);  // no NaN: CUDA gives +max
  EXPECT_EQ(f32_to_e2m1(-kNan), 0x7);
  EXPECT_EQ(f32_to_e2m1(5.0f), 0x6);   // tie 4 / 6
  EXPECT_EQ(f32_to_e2m1(3.5f), 0x6);   // tie 3 / 4
  EXPECT_EQ(f32_to_e2m1(2.5f), 0x4);   // tie 2 / 3
  EXPECT_EQ(f32_to_e2m1(1.25f), 0x2);  // tie 1 / 1.5
  EXPECT_EQ(f32_to_e2m1(0.75f), 0x2);  // tie 0.5 / 1
  EXPECT_EQ(f32_to_e2m1(0.25f), 0x0);  // tie 0 / 0.5
  EXPECT_EQ(f32_to_e2m1(-0.25f), 0x8);
  EXPECT_EQ(f32_to_e2m1(std::nextafter(0.25f, 1.0f)), 0x1);
  EXPECT_EQ(f32_to_e2m1(-0.0f), 0x8);
  EXPECT_EQ(f32_to_e2m1(-1.5f), 0xB);
}

TEST(FormatsEncode, Bf16Cases) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808000u)), 0x3F80);  // tie, keep even
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F818000u)), 0x3F82);  // tie, round up to even
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808001u)), 0x3F81);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // overflow -> inf
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::max()), 0xFF80);
  EXPECT_EQ(f32_to_bf16(from_bits(0x7F7F7FFFu)), 0x7F7F);
  EXPECT_EQ(f32_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(from_bits(0x00010000u)), 0x0001);  // f32 subnormal, exact
  EXPECT_EQ(f32_to_bf16(from_bits(0x00008000u)), 0x0000);  // tie to zero
  EXPECT_EQ(f32_to_bf16(from_bits(0x00018000u)), 0x0002);  // tie up to even
  EXPECT_EQ(f32_to_bf16(from_bits(0x80000001u)), 0x8000);
  // NaN stays NaN (a signalling NaN with a low payload must not truncate to inf), sign kept.
  EXPECT_EQ(f32_to_bf16(from_bits(0x7F800001u)), 0x7FC0);
  EXPECT_EQ(f32_to_bf16(from_bits(0xFFC00000u)), 0xFFC0);
  EXPECT_TRUE(spec_is_nan(DType::bf16, f32_to_bf16(kNan)));
}

TEST(FormatsEncode, F16Cases) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // max + half ulp rounds to inf
  EXPECT_EQ(f32_to_f16(1e30f), 0x7C00);
  EXPECT_EQ(f32_to_f16(-kInf), 0xFC00);
  EXPECT_EQ(f32_to_f16(2049.0f), 0x6800);  // tie 2048 / 2050
  EXPECT_EQ(f32_to_f16(2051.0f), 0x6802);  // tie 2050 / 2052
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(-std::ldexp(1.0f, -26)), 0x8000);
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);  // subnormal carries into normal
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(kNan) & 0x7E00, 0x7E00);
  EXPECT_EQ(f32_to_f16(-kNan) & 0x8000, 0x8000);
  EXPECT_TRUE(spec_is_nan(DType::f16, f32_to_f16(from_bits(0x7F800001u))));
}

TEST(FormatsEncode, RoundHelpers) {
  EXPECT_EQ(round_bf16(1.00390625f), 1.0f);
  EXPECT_EQ(round_f16(65520.0f), kInf);
  EXPECT_EQ(round_e4m3fn(500.0f), 448.0f);
  EXPECT_EQ(round_e4m3fnuz(-500.0f), -240.0f);
  EXPECT_EQ(round_e5m2(1.125f), 1.0f);
  EXPECT_EQ(round_e2m1(5.0f), 4.0f);
  EXPECT_EQ(round_ue8m0_ceil(3.0f), 4.0f);
}

// ---- ue8m0 ceiling -------------------------------------------------------------------------------------

TEST(FormatsUe8m0, CeilCases) {
  EXPECT_EQ(f32_to_ue8m0_ceil(1.0f), 127);
  EXPECT_EQ(f32_to_ue8m0_ceil(std::nextafter(1.0f, 2.0f)), 128);
  EXPECT_EQ(f32_to_ue8m0_ceil(1.5f), 128);
  EXPECT_EQ(f32_to_ue8m0_ceil(0.75f), 127);
  EXPECT_EQ(f32_to_ue8m0_ceil(0.5f), 126);
  EXPECT_EQ(f32_to_ue8m0_ceil(-3.0f), 129);  // magnitude
  EXPECT_EQ(f32_to_ue8m0_ceil(0.0f), 0);     // clamps to 2^-127
  EXPECT_EQ(f32_to_ue8m0_ceil(-0.0f), 0);
  EXPECT_EQ(f32_to_ue8m0_ceil(std::ldexp(1.0f, 127)), 254);
  EXPECT_EQ(f32_to_ue8m0_ceil(std::ldexp(1.5f, 127)), 254);  // clamps to 2^127
  EXPECT_EQ(f32_to_ue8m0_ceil(std::numeric_limits<float>::max()), 254);
  EXPECT_EQ(f32_to_ue8m0_ceil(kInf), 254);
  EXPECT_EQ(f32_to_ue8m0_ceil(kNan), 0xFF);
  EXPECT_EQ(f32_to_ue8m0_ceil(-kNan), 0xFF);
  // Around the f32 subnormal 2^-127 and the smallest normal 2^-126.
  EXPECT_EQ(f32_to_ue8m0_ceil(from_bits(0x00000001u)), 0);
  EXPECT_EQ(f32_to_ue8m0_ceil(from_bits(0x00400000u)), 0);
  EXPECT_EQ(f32_to_ue8m0_ceil(from_bits(0x00400001u)), 1);
  EXPECT_EQ(f32_to_ue8m0_ceil(from_bits(0x00800000u)), 1);
  EXPECT_EQ(f32_to_ue8m0_ceil(from_bits(0x00800001u)), 2);
}

TEST(FormatsUe8m0, CeilIsSmallestPowerAtLeastInput) {
  // Property over a sweep of f32 bit patterns: 2^(c-127) >= |x| > 2^(c-128), inside the clamp.
  for (uint32_t bits = 0x00000001u; bits < 0x7F800000u; bits += 0x1357u) {
    const double x = from_bits(bits);
    const uint8_t code = f32_to_ue8m0_ceil(static_cast<float>(x));
    const double scale = spec_decode(DType::ue8m0, code);
    if (code > 0 && code < 254) {
      ASSERT_GE(scale, x) << std::hex << bits;
      ASSERT_LT(scale / 2, x) << std::hex << bits;
    }
  }
}

// ---- fp4 packing -------------------------------------------------------------------------------------

TEST(FormatsFp4, LowNibbleFirst) {
  uint8_t packed[2] = {0, 0};
  fp4_set(packed, 0, 0x3);
  fp4_set(packed, 1, 0xA);
  fp4_set(packed, 2, 0xF);
  EXPECT_EQ(packed[0], 0xA3);
  EXPECT_EQ(packed[1], 0x0F);
  EXPECT_EQ(fp4_get(packed, 0), 0x3);
  EXPECT_EQ(fp4_get(packed, 1), 0xA);
  EXPECT_EQ(fp4_get(packed, 2), 0xF);
  EXPECT_EQ(fp4_get(packed, 3), 0x0);
}

TEST(FormatsFp4, SetRoundTripsWithoutTouchingNeighbours) {
  std::vector<uint8_t> packed(7, 0x5A);  // odd nibble count below: the last high nibble stays
  const int64_t count = 13;
  for (int64_t i = 0; i < count; ++i) fp4_set(packed.data(), i, static_cast<uint8_t>((i * 7 + 3) & 0xF));
  for (int64_t i = 0; i < count; ++i) {
    EXPECT_EQ(fp4_get(packed.data(), i), (i * 7 + 3) & 0xF) << i;
  }
  EXPECT_EQ(packed[6] >> 4, 0x5);
  // Overwrite one element; both neighbours keep their values.
  fp4_set(packed.data(), 5, 0x0);
  EXPECT_EQ(fp4_get(packed.data(), 4), (4 * 7 + 3) & 0xF);
  EXPECT_EQ(fp4_get(packed.data(), 5), 0x0);
  EXPECT_EQ(fp4_get(packed.data(), 6), (6 * 7 + 3) & 0xF);
  // Bits above the nibble are ignored.
  fp4_set(packed.data(), 4, 0xF1);
  EXPECT_EQ(fp4_get(packed.data(), 4), 0x1);
  EXPECT_EQ(fp4_get(packed.data(), 5), 0x0);
}

// ---- generic load/store by dtype -----------------------------------------------------------------------

struct StoreCase {
  double stored;
  double loaded;
};

// Stores each case at index 1 (odd: the fp4 high nibble; unaligned for wide types) and loads it.
void check_store_load(DType dtype, const std::vector<StoreCase>& cases) {
  for (const StoreCase& c : cases) {
    std::vector<unsigned char> buffer(32, 0);
    const double element0 = load_element_f64(dtype, buffer.data(), 0);  // ue8m0: 2^-127, not 0
    store_element_f64(dtype, buffer.data(), 1, c.stored);
    const double loaded = load_element_f64(dtype, buffer.data(), 1);
    EXPECT_TRUE(same_value(c.loaded, loaded))
        << dtype_name(dtype) << " stored " << c.stored << " loaded " << loaded << " want "
        << c.loaded;
    // Element 0 is untouched.
    EXPECT_EQ(load_element_f64(dtype, buffer.data(), 0), element0) << dtype_name(dtype);
  }
}

TEST(FormatsLoadStore, EveryDType) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (DType dtype : kAllDTypes) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    switch (dtype) {
      case DType::f32:
        check_store_load(dtype, {{0.1, static_cast<double>(0.1f)}, {-0.0, -0.0}, {1e300, inf},
                                 {nan, nan}});
        break;
      case DType::f64:
        check_store_load(dtype, {{0.1, 0.1}, {-0.0, -0.0}, {1e300, 1e300}, {nan, nan}});
        break;
      case DType::bf16:
        check_store_load(dtype, {{1.00390625, 1.0}, {3.0, 3.0}, {-0.0, -0.0}, {1e39, inf}, {nan, nan}});
        break;
      case DType::f16:
        check_store_load(dtype, {{65520.0, inf}, {0.5, 0.5}, {-2049.0, -2048.0}, {nan, nan}});
        break;
      case DType::f8_e4m3fn:
        check_store_load(dtype, {{500.0, 448.0}, {-0.0, -0.0}, {1.0625, 1.0}, {nan, nan}});
        break;
      case DType::f8_e4m3fnuz:
        check_store_load(dtype, {{500.0, 240.0}, {-0.0, 0.0}, {-1.0, -1.0}, {nan, nan}});
        break;
      case DType::f8_e5m2:
        check_store_load(dtype, {{1e6, 57344.0}, {-inf, -57344.0}, {1.125, 1.0}, {nan, nan}});
        break;
      case DType::f4_e2m1:
        check_store_load(dtype, {{5.0, 4.0}, {-7.0, -6.0}, {0.75, 1.0}, {-0.0, -0.0}, {nan, 6.0}});
        break;
      case DType::ue8m0:
        check_store_load(dtype, {{3.0, 4.0}, {1.0, 1.0}, {0.0, std::ldexp(1.0, -127)}, {nan, nan}});
        break;
      case DType::i8:
        check_store_load(dtype, {{127.5, 127.0}, {-200.0, -128.0}, {2.5, 2.0}, {-2.5, -2.0},
                                 {3.5, 4.0}, {-0.4, 0.0}, {nan, 0.0}, {inf, 127.0}});
        break;
      case DType::i32:
        check_store_load(dtype, {{3e9, 2147483647.0}, {-3e9, -2147483648.0}, {-7.6, -8.0}, {nan, 0.0}});
        break;
      case DType::i64:
        check_store_load(dtype, {{1e19, 9223372036854775807.0}, {-1e19, -9223372036854775808.0},
                                 {12345.0, 12345.0}, {-inf, -9223372036854775808.0}, {nan, 0.0}});
        break;
      case DType::u8:
        check_store_load(dtype, {{-1.0, 0.0}, {255.4, 255.0}, {300.0, 255.0}, {254.5, 254.0},
                                 {nan, 0.0}});
        break;
      case DType::boolean:
        check_store_load(dtype, {{0.0, 0.0}, {-0.0, 0.0}, {0.3, 1.0}, {-5.0, 1.0}, {nan, 1.0}});
        break;
    }
  }
}

TEST(FormatsLoadStore, RawBytes) {
  unsigned char buffer[8] = {};
  store_element_f64(DType::f8_e4m3fn, buffer, 0, 448.0);
  EXPECT_EQ(buffer[0], 0x7E);
  store_element_f64(DType::bf16, buffer, 1, 1.0);
  uint16_t bf16_code;
  std::memcpy(&bf16_code, buffer + 2, 2);
  EXPECT_EQ(bf16_code, 0x3F80);
  store_element_f64(DType::f4_e2m1, buffer + 4, 0, 1.0);
  store_element_f64(DType::f4_e2m1, buffer + 4, 1, -6.0);
  EXPECT_EQ(buffer[4], 0xF2);
  store_element_f64(DType::boolean, buffer, 7, 2.0);
  EXPECT_EQ(buffer[7], 1);
  // i64 keeps all 64 bits, beyond double precision.
  int64_t big = (int64_t{1} << 62) + 1;
  std::memcpy(buffer, &big, 8);
  EXPECT_EQ(load_element_f64(DType::i64, buffer, 0), static_cast<double>(big));
}

TEST(FormatsGeneric, RejectsNonNarrowDTypes) {
  EXPECT_THROW(encode_f32(DType::f32, 1.0f), ContractError);
  EXPECT_THROW(decode_f32(DType::i8, 0), ContractError);
  EXPECT_EQ(encode_f32(DType::f8_e4m3fn, 448.0f), 0x7Eu);
  EXPECT_EQ(decode_f32(DType::f4_e2m1, 0x7), 6.0f);
}

}  // namespace
}  // namespace dsv4
