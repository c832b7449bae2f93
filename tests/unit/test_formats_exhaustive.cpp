// Every one of the 2^32 f32 inputs through each f32 -> narrow encoder, against an oracle built
// only from spec_decode: the nearest representable value, exact midpoints compared in double,
// ties to the even code, saturation (fp8/fp4) or infinity (bf16/f16, IEEE) above the range.
// One ctest test per (format, sign, half of the magnitude range) keeps each one short.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/core/formats.h"
#include "reference/formats_spec.h"

namespace dsv4 {
namespace {

// f32 magnitudes [0, 2^31) are split into this many consecutive parts per sign (about 2.5 s
// each on one core of the dev machine at -O2).
constexpr uint32_t kParts = 2;
constexpr uint32_t kMagnitudesPerPart = 0x80000000u / kParts;
constexpr uint32_t kF32InfBits = 0x7F800000u;

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

struct Oracle {
  std::vector<double> values;    // candidate magnitudes, ascending
  std::vector<uint32_t> codes;   // their codes
  std::vector<double> mids;      // mids[i]: exact midpoint of values[i] and values[i + 1]
  std::vector<uint32_t> ties;    // ties[i]: the code a value exactly at mids[i] gets
  std::vector<bool> nan_code;    // per code: spec_decode calls it NaN
  uint32_t sign_code = 0;
  bool has_negative_zero = true;
};

uint32_t even_of(uint32_t a, uint32_t b) { return (a & 1u) == 0 ? a : b; }

Oracle build_oracle(DType dtype, bool overflow_to_inf) {
  Oracle o;
  for (const SpecValue& v : spec_finite_nonnegative_values(dtype)) {
    o.values.push_back(v.value);
    o.codes.push_back(v.code);
  }
  const size_t n = o.values.size();
  if (overflow_to_inf) {
    // IEEE 754 4.3.1: under round-to-nearest a magnitude >= max + ulp/2 becomes infinity. Model
    // infinity as one more step 2^(emax+1) = max + ulp; the tie at max + ulp/2 goes to infinity.
    const double ulp_at_max = o.values[n - 1] - o.values[n - 2];
    const uint32_t inf_code = o.codes[n - 1] + 1;
    EXPECT_TRUE(std::isinf(spec_decode(dtype, inf_code)));
    o.values.push_back(o.values[n - 1] + ulp_at_max);
    o.codes.push_back(inf_code);
  }
  for (size_t i = 0; i + 1 < o.values.size(); ++i) {
    o.mids.push_back((o.values[i] + o.values[i + 1]) / 2);  // exact: few significant bits
    o.ties.push_back(even_of(o.codes[i], o.codes[i + 1]));
  }
  if (overflow_to_inf) o.ties.back() = o.codes.back();
  const uint32_t code_count = uint32_t{1} << spec_code_bits(dtype);
  o.nan_code.resize(code_count);
  for (uint32_t c = 0; c < code_count; ++c) o.nan_code[c] = spec_is_nan(dtype, c);
  o.sign_code = spec_sign_mask(dtype);
  o.has_negative_zero = !spec_is_nan(dtype, o.sign_code);
  return o;
}

struct SweepResult {
  uint64_t checked = 0;
  uint64_t mismatches = 0;
  std::string first_mismatches;
};

enum class NanRule { nan_same_sign, nan_any_sign, positive_max };

// Checks magnitudes [begin, end) with the given f32 sign. The cursor only moves forward, because
// increasing f32 magnitude bit patterns are increasing values.
template <typename Encode>
SweepResult sweep(const Oracle& o, bool negative, uint32_t begin, uint32_t end, NanRule nan_rule,
                  Encode encode) {
  SweepResult r;
  const uint32_t f32_sign = negative ? 0x80000000u : 0u;
  const size_t n = o.values.size();
  const double first = from_bits(std::min(begin, kF32InfBits));
  size_t i = static_cast<size_t>(std::upper_bound(o.values.begin(), o.values.end(), first) -
                                 o.values.begin()) - 1;
  auto record = [&](uint32_t mag, uint32_t got, const char* want) {
    if (++r.mismatches <= 8) {
      std::ostringstream line;
      line << std::hex << "  f32 0x" << (f32_sign | mag) << " (" << std::hexfloat
           << from_bits(f32_sign | mag) << "): got 0x" << got << ", want " << want << "\n";
      r.first_mismatches += line.str();
    }
  };
  for (uint32_t mag = begin; mag != end; ++mag) {
    const uint32_t got = encode(from_bits(f32_sign | mag));
    ++r.checked;
    if (mag > kF32InfBits) {
      bool ok = false;
      switch (nan_rule) {
        case NanRule::nan_same_sign:
          ok = got < o.nan_code.size() && o.nan_code[got] && ((got & o.sign_code) != 0) == negative;
          break;
        case NanRule::nan_any_sign:
          ok = got < o.nan_code.size() && o.nan_code[got];
          break;
        case NanRule::positive_max:
          ok = got == o.codes.back();
          break;
      }
      if (!ok) record(mag, got, "a NaN code");
      continue;
    }
    const double x = from_bits(mag);
    while (i + 1 < n && x >= o.values[i + 1]) ++i;
    uint32_t want;
    if (i + 1 == n) {
      want = o.codes[n - 1];  // at or above the top: saturate (fp8/fp4) or inf (bf16/f16)
    } else if (x < o.mids[i]) {
      want = o.codes[i];
    } else if (x > o.mids[i]) {
      want = o.codes[i + 1];
    } else {
      want = o.ties[i];
    }
    if (negative && (want != 0 || o.has_negative_zero)) want |= o.sign_code;
    if (got != want) {
      std::ostringstream w;
      w << "0x" << std::hex << want;
      record(mag, got, w.str().c_str());
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
  const bool ieee = c.dtype == DType::bf16 || c.dtype == DType::f16;
  const Oracle oracle = build_oracle(c.dtype, ieee);
  SweepResult r;
  // A lambda per format so the encoder inlines into the loop.
  switch (c.dtype) {
    case DType::f8_e4m3fn:
      r = sweep(oracle, c.negative, begin, end, NanRule::nan_same_sign,
                [](float x) { return uint32_t{f32_to_e4m3fn(x)}; });
      break;
    case DType::f8_e4m3fnuz:
      r = sweep(oracle, c.negative, begin, end, NanRule::nan_any_sign,
                [](float x) { return uint32_t{f32_to_e4m3fnuz(x)}; });
      break;
    case DType::f8_e5m2:
      r = sweep(oracle, c.negative, begin, end, NanRule::nan_same_sign,
                [](float x) { return uint32_t{f32_to_e5m2(x)}; });
      break;
    case DType::f4_e2m1:
      r = sweep(oracle, c.negative, begin, end, NanRule::positive_max,
                [](float x) { return uint32_t{f32_to_e2m1(x)}; });
      break;
    case DType::bf16:
      r = sweep(oracle, c.negative, begin, end, NanRule::nan_same_sign,
                [](float x) { return uint32_t{f32_to_bf16(x)}; });
      break;
    case DType::f16:
      r = sweep(oracle, c.negative, begin, end, NanRule::nan_same_sign,
                [](float x) { return uint32_t{f32_to_f16(x)}; });
      break;
    default:
      FAIL() << "no encoder for " << dtype_name(c.dtype);
  }
  EXPECT_EQ(r.checked, uint64_t{kMagnitudesPerPart});
  EXPECT_EQ(r.mismatches, 0u) << "first mismatches:\n" << r.first_mismatches;
}

INSTANTIATE_TEST_SUITE_P(Formats, FormatsExhaustive, ::testing::ValuesIn(all_cases()));

TEST(FormatsOracle, Shape) {
  // The oracle's own sanity: table sizes and top entries per format.
  const Oracle e4m3fn = build_oracle(DType::f8_e4m3fn, false);
  EXPECT_EQ(e4m3fn.values.size(), 127u);
  EXPECT_EQ(e4m3fn.values.back(), 448.0);
  EXPECT_EQ(e4m3fn.codes.back(), 0x7Eu);
  EXPECT_TRUE(e4m3fn.has_negative_zero);
  const Oracle fnuz = build_oracle(DType::f8_e4m3fnuz, false);
  EXPECT_EQ(fnuz.values.size(), 128u);
  EXPECT_EQ(fnuz.values.back(), 240.0);
  EXPECT_FALSE(fnuz.has_negative_zero);
  const Oracle e5m2 = build_oracle(DType::f8_e5m2, false);
  EXPECT_EQ(e5m2.values.size(), 124u);
  EXPECT_EQ(e5m2.values.back(), 57344.0);
  const Oracle e2m1 = build_oracle(DType::f4_e2m1, false);
  EXPECT_EQ(e2m1.values, (std::vector<double>{0, 0.5, 1, 1.5, 2, 3, 4, 6}));
  EXPECT_EQ(e2m1.sign_code, 0x8u);
  const Oracle f16 = build_oracle(DType::f16, true);
  EXPECT_EQ(f16.codes.back(), 0x7C00u);
  EXPECT_EQ(f16.mids.back(), 65520.0);
  EXPECT_EQ(f16.ties.back(), 0x7C00u);
  const Oracle bf16 = build_oracle(DType::bf16, true);
  EXPECT_EQ(bf16.codes.back(), 0x7F80u);
  EXPECT_EQ(bf16.values.size(), 0x7F80u + 1);
}

}  // namespace
}  // namespace dsv4
