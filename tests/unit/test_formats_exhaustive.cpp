// Every one of the 2^32 f32 inputs through each f32 -> narrow encoder, against the oracle of
// reference/formats_oracle.h, built only from spec_decode: the nearest representable value, exact
// midpoints to the even code, saturation (fp8/fp4) or infinity (bf16/f16, IEEE) above the range.
// One ctest test per (format, sign, half of the magnitude range) keeps each one short.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/core/formats.h"
#include "reference/formats_oracle.h"
#include "reference/formats_spec.h"

namespace dsv4 {
namespace {

// f32 magnitudes [0, 2^31) are split into this many consecutive parts per sign (about 2.5 s
// each on one core of the dev machine at -O2).
constexpr uint32_t kParts = 2;
constexpr uint32_t kMagnitudesPerPart = 0x80000000u / kParts;

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

struct SweepResult {
  uint64_t checked = 0;
  uint64_t mismatches = 0;
  std::string first_mismatches;
};

// Checks magnitudes [begin, end) with the given f32 sign.
template <typename Encode>
SweepResult sweep(const FormatOracle& o, bool negative, uint32_t begin, uint32_t end, Encode encode) {
  SweepResult r;
  const uint32_t f32_sign = negative ? 0x80000000u : 0u;
  for (uint32_t mag = begin; mag != end; ++mag) {
    const float x = from_bits(f32_sign | mag);
    const uint32_t got = encode(x);
    ++r.checked;
    if (o.accepts(x, got)) continue;
    if (++r.mismatches <= 8) {
      std::ostringstream line;
      line << std::hex << "  f32 0x" << (f32_sign | mag) << " (" << std::hexfloat << x << "): got 0x"
           << got << ", want ";
      if (std::isnan(x) && !o.nan_codes().empty()) {
        line << "a NaN code";
      } else {
        line << "0x" << o.expected(x);
      }
      r.first_mismatches += line.str() + "\n";
    }
  }
  return r;
}

struct Case {
  DType dtype;
  bool negative;
  uint32_t part;
};

// Also the ctest name: gtest_discover_tests turns "/<n>  # GetParam() = <this>" into "/<this>".
void PrintTo(const Case& c, std::ostream* os) {
  *os << dtype_name(c.dtype) << (c.negative ? "_neg_p" : "_pos_p") << c.part;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (DType dtype : {DType::f8_e4m3fn, DType::f8_e4m3fnuz, DType::f8_e5m2, DType::f4_e2m1,
                      DType::bf16, DType::f16}) {
    for (bool negative : {false, true}) {
      for (uint32_t part = 0; part < kParts; ++part) cases.push_back({dtype, negative, part});
    }
  }
  return cases;
}

class FormatsExhaustive : public ::testing::TestWithParam<Case> {};

TEST_P(FormatsExhaustive, EncoderMatchesOracle) {
  const Case c = GetParam();
  const uint32_t begin = c.part * kMagnitudesPerPart;
  const uint32_t end = begin + kMagnitudesPerPart;  // wraps to 0 only for 2^32; never here
  const FormatOracle oracle(c.dtype);
  SweepResult r;
  // A lambda per format so the encoder inlines into the loop.
  switch (c.dtype) {
    case DType::f8_e4m3fn:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_e4m3fn(x)}; });
      break;
    case DType::f8_e4m3fnuz:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_e4m3fnuz(x)}; });
      break;
    case DType::f8_e5m2:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_e5m2(x)}; });
      break;
    case DType::f4_e2m1:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_e2m1(x)}; });
      break;
    case DType::bf16:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_bf16(x)}; });
      break;
    case DType::f16:
      r = sweep(oracle, c.negative, begin, end, [](float x) { return uint32_t{f32_to_f16(x)}; });
      break;
    default:
      FAIL() << "no encoder for " << dtype_name(c.dtype);
  }
  EXPECT_EQ(r.checked, uint64_t{kMagnitudesPerPart});
  EXPECT_EQ(r.mismatches, 0u) << "first mismatches:\n" << r.first_mismatches;
}

INSTANTIATE_TEST_SUITE_P(Formats, FormatsExhaustive, ::testing::ValuesIn(all_cases()));

TEST(FormatsOracle, Shape) {
  // The oracle's own sanity: table sizes, top entries and the specials per format.
  const FormatOracle e4m3fn(DType::f8_e4m3fn);
  EXPECT_EQ(e4m3fn.values().size(), 127u);
  EXPECT_EQ(e4m3fn.max_finite(), 448.0);
  EXPECT_EQ(e4m3fn.values().back().code, 0x7Eu);
  EXPECT_EQ(e4m3fn.overflow_threshold(), 464.0f);
  EXPECT_EQ(e4m3fn.min_normal(), 0x1p-6f);
  EXPECT_EQ(e4m3fn.min_subnormal(), 0x1p-9f);
  EXPECT_TRUE(e4m3fn.has_negative_zero());
  EXPECT_EQ(e4m3fn.expected(-0.0f), 0x80u);
  EXPECT_EQ(e4m3fn.expected(1e9f), 0x7Eu);
  EXPECT_EQ(e4m3fn.expected(-std::nanf("")), 0xFFu);
  EXPECT_EQ(e4m3fn.expected(1.0625f), 0x38u);  // tie between 1 (0x38) and 1.125 (0x39): even
  EXPECT_EQ(e4m3fn.expected(1.1875f), 0x3Au);  // tie between 0x39 and 0x3A: even
  EXPECT_TRUE(e4m3fn.is_tie(-1.0625f));
  EXPECT_FALSE(e4m3fn.is_tie(1.0f));
  const FormatOracle fnuz(DType::f8_e4m3fnuz);
  EXPECT_EQ(fnuz.values().size(), 128u);
  EXPECT_EQ(fnuz.max_finite(), 240.0);
  EXPECT_FALSE(fnuz.has_negative_zero());
  EXPECT_EQ(fnuz.expected(-0.0f), 0x00u);
  EXPECT_EQ(fnuz.expected(std::nanf("")), 0x80u);
  EXPECT_EQ(fnuz.nan_codes(), (std::vector<uint32_t>{0x80u}));
  const FormatOracle e5m2(DType::f8_e5m2);
  EXPECT_EQ(e5m2.values().size(), 124u);
  EXPECT_EQ(e5m2.max_finite(), 57344.0);
  EXPECT_EQ(e5m2.expected(std::nanf("")), 0x7Eu);
  EXPECT_EQ(e5m2.infinity_code(true), 0xFBu);  // satfinite: -max, not -inf
  const FormatOracle e2m1(DType::f4_e2m1);
  std::vector<double> e2m1_values;
  for (const SpecValue& v : e2m1.values()) e2m1_values.push_back(v.value);
  EXPECT_EQ(e2m1_values, (std::vector<double>{0, 0.5, 1, 1.5, 2, 3, 4, 6}));
  EXPECT_EQ(e2m1.ties(), (std::vector<float>{0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 7.0f}));
  EXPECT_EQ(e2m1.min_normal(), 1.0f);
  EXPECT_EQ(e2m1.sign_mask(), 0x8u);
  EXPECT_EQ(e2m1.expected(-std::nanf("")), 0x7u);  // no NaN in e2m1: +max
  const FormatOracle f16(DType::f16);
  EXPECT_EQ(f16.infinity_code(false), 0x7C00u);
  EXPECT_EQ(f16.ties().back(), 65520.0f);
  EXPECT_EQ(f16.expected(65520.0f), 0x7C00u);    // the overflow tie goes to infinity
  EXPECT_EQ(f16.expected(65519.99f), 0x7BFFu);
  EXPECT_EQ(f16.expected(std::nanf("")), 0x7E00u);
  EXPECT_EQ(f16.min_normal(), 0x1p-14f);
  EXPECT_FALSE(f16.saturates());
  const FormatOracle bf16(DType::bf16);
  EXPECT_EQ(bf16.infinity_code(true), 0xFF80u);
  EXPECT_EQ(bf16.values().size(), 0x7F80u);
  EXPECT_EQ(bf16.expected(std::nanf("")), 0x7FC0u);
  EXPECT_EQ(bf16.min_subnormal(), 0x1p-133f);
  EXPECT_EQ(bf16.expected(0x1p-134f), 0x0000u);  // the tie below the smallest subnormal: even 0
  EXPECT_TRUE(bf16.accepts(from_bits(0x7F800001u), 0x7F81u));  // a NaN keeping its payload
  EXPECT_FALSE(bf16.accepts(from_bits(0xFF800001u), 0x7FC0u));  // but not flipping its sign
}

}  // namespace
}  // namespace dsv4
