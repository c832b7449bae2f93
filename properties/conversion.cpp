#include "properties/conversion.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <tuple>
#include <utility>

#include "engine/core/dtype.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "reference/formats_oracle.h"

namespace dsv4::props {

namespace {

struct NamedFormat {
  const char* name;
  DType dtype;
};

constexpr NamedFormat kFormats[] = {
    {"e4m3fn", DType::f8_e4m3fn}, {"e4m3fnuz", DType::f8_e4m3fnuz}, {"e5m2", DType::f8_e5m2},
    {"e2m1", DType::f4_e2m1},     {"bf16", DType::bf16},            {"f16", DType::f16},
};
constexpr size_t kFormatCount = sizeof kFormats / sizeof kFormats[0];

constexpr uint32_t kF32SignBit = 0x80000000u;
constexpr uint32_t kF32InfBits = 0x7F800000u;

size_t format_index(const std::string& format) {
  for (size_t i = 0; i < kFormatCount; ++i) {
    if (format == kFormats[i].name) return i;
  }
  std::string names;
  for (const NamedFormat& f : kFormats) names += std::string(names.empty() ? "" : ", ") + f.name;
  throw InputError("scenario", "conversion.format", "unknown format '" + format + "' (one of " + names + ")");
}

// One oracle per format for the whole process: the bf16 and f16 tables take milliseconds to build
// and a suite runs hundreds of cases. Magic statics make the first use thread-safe.
const FormatOracle& oracle_at(size_t index) {
  static const std::vector<FormatOracle> oracles = [] {
    std::vector<FormatOracle> all;
    for (const NamedFormat& f : kFormats) all.emplace_back(f.dtype);
    return all;
  }();
  return oracles[index];
}

uint32_t bits_of(float x) { return std::bit_cast<uint32_t>(x); }
float float_of(uint32_t bits) { return std::bit_cast<float>(bits); }

std::string hex(uint32_t value, int digits) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "0x%0*X", digits, value);
  return buffer;
}

// Digits of a code: 4 for the 16-bit formats, 2 for fp8, 1 for the fp4 nibble.
int code_digits(DType dtype) {
  if (dtype == DType::bf16 || dtype == DType::f16) return 4;
  return dtype == DType::f4_e2m1 ? 1 : 2;
}

// f32 bit patterns that the rounding of a format hinges on, as magnitudes: the boundaries of its
// subnormals and of its range, and f32's own (its subnormals must not be flushed).
std::vector<uint32_t> boundary_magnitudes(const FormatOracle& o) {
  const float largest_subnormal = static_cast<float>(
      std::prev(std::lower_bound(o.values().begin(), o.values().end(), static_cast<double>(o.min_normal()),
                                 [](const SpecValue& v, double x) { return v.value < x; }))
          ->value);
  return {bits_of(o.min_subnormal()),
          bits_of(o.min_subnormal() / 2),  // the tie between 0 and the smallest subnormal
          bits_of(largest_subnormal),
          bits_of(o.min_normal()),
          bits_of(static_cast<float>(o.max_finite())),
          bits_of(o.overflow_threshold()),
          0x00000001u,   // smallest f32 subnormal
          0x007FFFFFu,   // largest f32 subnormal
          0x00800000u,   // smallest f32 normal
          0x7F7FFFFFu};  // largest finite f32
}

// Zeros, infinity and NaNs (quiet, signalling, with payloads), as magnitudes.
const std::vector<uint32_t>& special_magnitudes() {
  static const std::vector<uint32_t> specials = {0x00000000u, kF32InfBits, 0x7FC00000u, 0x7F800001u,
                                                 0x7FA00000u, 0x7FC00001u, 0x7FFFFFFFu};
  return specials;
}

std::vector<uint32_t> to_bits(const std::vector<float>& xs) {
  std::vector<uint32_t> bits;
  bits.reserve(xs.size());
  for (float x : xs) bits.push_back(bits_of(x));
  return bits;
}

std::vector<uint32_t> value_magnitudes(const FormatOracle& o) {
  std::vector<uint32_t> bits;
  bits.reserve(o.values().size());
  for (const SpecValue& v : o.values()) bits.push_back(bits_of(static_cast<float>(v.value)));
  return bits;
}

// RapidCheck scales integer ranges with the case size; these inputs should span their whole range
// from the first case, so they are drawn at the nominal full size.
constexpr int kFullSize = 100;

// A magnitude from `corners` (uniform), moved by one of `offsets` ulps, with a sign. An offset
// shrinks to 0 and the sign to +, so a failing input shrinks onto the corner itself.
rc::Gen<uint32_t> gen_near(std::vector<uint32_t> corners, std::vector<int> offsets) {
  const rc::Gen<int> offset = rc::gen::shrink(rc::gen::elementOf(std::move(offsets)), [](int o) {
    return o == 0 ? rc::Seq<int>() : rc::seq::just(0);
  });
  return rc::gen::map(rc::gen::tuple(rc::gen::elementOf(std::move(corners)), offset, rc::gen::arbitrary<bool>()),
                      [](const std::tuple<uint32_t, int, bool>& t) {
                        const auto [magnitude, ulps, negative] = t;
                        // Stepping below +0 would wrap to a NaN pattern; the corner itself stands in.
                        const uint32_t moved =
                            ulps < 0 && magnitude == 0 ? 0u : magnitude + static_cast<uint32_t>(ulps);
                        return moved | (negative ? kF32SignBit : 0u);
                      });
}

// One input of a format, weighted toward the ties: the bug class this suite exists for is a
// conversion that rounds exact midpoints the wrong way, which random bits almost never hit.
rc::Gen<uint32_t> gen_input_for(const FormatOracle& o) {
  const std::vector<uint32_t> ties = to_bits(o.ties());
  const uint32_t threshold = bits_of(o.overflow_threshold());
  // Anywhere from 0 to a little past the range (at most infinity), uniform in bit patterns, so
  // every binade alike.
  const uint32_t past_range = std::min(threshold + (threshold >> 4), kF32InfBits + 1);
  const rc::Gen<uint32_t> in_range = rc::gen::map(
      rc::gen::pair(rc::gen::resize(kFullSize, rc::gen::inRange<uint32_t>(0, past_range)),
                    rc::gen::arbitrary<bool>()),
      [](const std::pair<uint32_t, bool>& p) { return p.first | (p.second ? kF32SignBit : 0u); });
  return rc::gen::weightedOneOf<uint32_t>({
      {6, gen_near(ties, {0})},
      {3, gen_near(ties, {1, -1})},
      {3, gen_near(value_magnitudes(o), {0, 1, -1})},
      {2, gen_near(boundary_magnitudes(o), {0, 1, -1})},
      {1, gen_near(special_magnitudes(), {0})},
      {2, in_range},
      {1, rc::gen::resize(kFullSize, rc::gen::arbitrary<uint32_t>())},
  });
}

const rc::Gen<uint32_t>& input_gen_at(size_t index) {
  // Built once: the bf16 and f16 corner lists hold tens of thousands of patterns.
  static const std::vector<rc::Gen<uint32_t>> gens = [] {
    std::vector<rc::Gen<uint32_t>> all;
    for (size_t i = 0; i < kFormatCount; ++i) all.push_back(gen_input_for(oracle_at(i)));
    return all;
  }();
  return gens[index];
}

std::string describe_input(const FormatOracle& o, uint32_t bits) {
  char value[32];
  std::snprintf(value, sizeof value, "%.9g", static_cast<double>(float_of(bits)));
  return hex(bits, 8) + " (" + value + (o.is_tie(float_of(bits)) ? ", a tie" : "") + ")";
}

}  // namespace

std::vector<std::string> conversion_formats() {
  std::vector<std::string> names;
  for (const NamedFormat& f : kFormats) names.emplace_back(f.name);
  return names;
}

Verdict check_conversion_case(const ConversionSpec& spec) {
  const size_t index = format_index(spec.format);
  const DType dtype = kFormats[index].dtype;
  const FormatOracle& oracle = oracle_at(index);
  constexpr size_t kShown = 4;  // enough to see a pattern, short enough for a report line
  size_t mismatches = 0;
  std::string shown;
  for (uint32_t bits : spec.inputs) {
    const float x = float_of(bits);
    const uint32_t got = encode_narrow(dtype, x);
    if (oracle.accepts(x, got)) continue;
    if (++mismatches > kShown) continue;
    const bool any_nan = std::isnan(x) && !oracle.nan_codes().empty();
    shown += "; input " + describe_input(oracle, bits) + ": got " + hex(got, code_digits(dtype)) + ", expected " +
             (any_nan ? "a NaN code" : hex(oracle.expected(x), code_digits(dtype)));
  }
  if (mismatches == 0) return Verdict::pass();
  return Verdict::fail(VerdictKind::mismatch, std::string("f32_to_") + kFormats[index].name,
                       "format " + spec.format + ": " + std::to_string(mismatches) + " of " +
                           std::to_string(spec.inputs.size()) + " inputs mismatch" + shown);
}

rc::Gen<ConversionSpec> gen_conversion_spec() {
  std::vector<size_t> indices(kFormatCount);
  for (size_t i = 0; i < kFormatCount; ++i) indices[i] = i;
  // elementOf, not inRange: uniform over the formats at every case size.
  return rc::gen::mapcat(rc::gen::elementOf(indices), [](size_t index) {
    return rc::gen::map(rc::gen::container<std::vector<uint32_t>>(input_gen_at(index)),
                        [index](std::vector<uint32_t> inputs) {
                          return ConversionSpec{kFormats[index].name, std::move(inputs)};
                        });
  });
}

ConversionSpec corner_sweep(const std::string& format) {
  const size_t index = format_index(format);
  const FormatOracle& o = oracle_at(index);
  std::vector<uint32_t> corners = value_magnitudes(o);
  const std::vector<uint32_t> ties = to_bits(o.ties());
  const std::vector<uint32_t> boundaries = boundary_magnitudes(o);
  corners.insert(corners.end(), ties.begin(), ties.end());
  corners.insert(corners.end(), boundaries.begin(), boundaries.end());
  ConversionSpec spec{format, {}};
  spec.inputs.reserve(6 * corners.size() + 2 * special_magnitudes().size());
  for (uint32_t m : corners) {
    for (uint32_t sign : {0u, kF32SignBit}) {
      if (m > 0) spec.inputs.push_back(sign | (m - 1));
      spec.inputs.push_back(sign | m);
      spec.inputs.push_back(sign | (m + 1));
    }
  }
  for (uint32_t m : special_magnitudes()) {
    spec.inputs.push_back(m);
    spec.inputs.push_back(kF32SignBit | m);
  }
  std::sort(spec.inputs.begin(), spec.inputs.end());
  spec.inputs.erase(std::unique(spec.inputs.begin(), spec.inputs.end()), spec.inputs.end());
  return spec;
}

void showValue(const ConversionSpec& spec, std::ostream& os) {
  constexpr size_t kShown = 64;  // a shrunk counterexample has a handful; a sweep has thousands
  os << spec.format << " [";
  for (size_t i = 0; i < spec.inputs.size() && i < kShown; ++i) os << (i ? ", " : "") << hex(spec.inputs[i], 8);
  if (spec.inputs.size() > kShown) os << ", ... " << spec.inputs.size() - kShown << " more";
  os << "]";
}

}  // namespace dsv4::props
