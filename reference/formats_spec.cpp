#include "reference/formats_spec.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/core/error.h"

namespace dsv4 {

namespace {

// How a format spends its top exponent codes.
enum class Specials {
  ieee,          // all-ones exponent: m == 0 is ±inf, m != 0 NaN (IEEE 754; OFP8 E5M2)
  e4m3fn,        // only S.1111.111 is NaN; no infinities (OFP8 E4M3)
  fnuz,          // only 1.0000.000 ("negative zero") is NaN; no infinities, no -0
  none,          // every code is a finite number (MX FP4 E2M1)
};

struct Layout {
  int code_bits;
  int exp_bits;
  int man_bits;
  int bias;
  Specials specials;
};

Layout layout_of(DType dtype) {
  switch (dtype) {
    case DType::bf16: return {16, 8, 7, 127, Specials::ieee};
    case DType::f16: return {16, 5, 10, 15, Specials::ieee};
    case DType::f8_e4m3fn: return {8, 4, 3, 7, Specials::e4m3fn};
    case DType::f8_e4m3fnuz: return {8, 4, 3, 8, Specials::fnuz};
    case DType::f8_e5m2: return {8, 5, 2, 15, Specials::ieee};
    case DType::f4_e2m1: return {4, 2, 1, 1, Specials::none};
    default: break;
  }
  DSV4_ASSERT(false, "spec: not a sign/exponent/mantissa format");
}

}  // namespace

int spec_code_bits(DType dtype) {
  if (dtype == DType::ue8m0) return 8;
  return layout_of(dtype).code_bits;
}

uint32_t spec_sign_mask(DType dtype) {
  if (dtype == DType::ue8m0) return 0;
  return uint32_t{1} << (layout_of(dtype).code_bits - 1);
}

bool spec_is_nan(DType dtype, uint32_t code) {
  return std::isnan(spec_decode(dtype, code));
}

double spec_decode(DType dtype, uint32_t code) {
  const double quiet_nan = std::numeric_limits<double>::quiet_NaN();
  if (dtype == DType::ue8m0) {
    // MX spec: E8M0 has no sign and no mantissa; 0xFF is NaN.
    DSV4_ASSERT(code <= 0xFF, "spec: ue8m0 code out of range");
    if (code == 0xFF) return quiet_nan;
    return std::ldexp(1.0, static_cast<int>(code) - 127);
  }
  const Layout f = layout_of(dtype);
  DSV4_ASSERT(code < (uint32_t{1} << f.code_bits), "spec: code out of range");

  const uint32_t s = code >> (f.code_bits - 1);
  const uint32_t e = (code >> f.man_bits) & ((uint32_t{1} << f.exp_bits) - 1);
  const uint32_t m = code & ((uint32_t{1} << f.man_bits) - 1);
  const uint32_t e_all_ones = (uint32_t{1} << f.exp_bits) - 1;
  const uint32_t m_all_ones = (uint32_t{1} << f.man_bits) - 1;
  const double sign = s != 0 ? -1.0 : 1.0;

  switch (f.specials) {
    case Specials::ieee:
      if (e == e_all_ones) {
        return m == 0 ? sign * std::numeric_limits<double>::infinity() : quiet_nan;
      }
      break;
    case Specials::e4m3fn:
      if (e == e_all_ones && m == m_all_ones) return quiet_nan;
      break;
    case Specials::fnuz:
      if (s == 1 && e == 0 && m == 0) return quiet_nan;
      break;
    case Specials::none:
      break;
  }

  const double fraction = static_cast<double>(m) / std::ldexp(1.0, f.man_bits);
  double magnitude;
  if (e == 0) {
    magnitude = std::ldexp(1.0, 1 - f.bias) * fraction;
  } else {
    magnitude = std::ldexp(1.0, static_cast<int>(e) - f.bias) * (1.0 + fraction);
  }
  // copysign so that the code with s = 1 and magnitude 0 is -0.0.
  return std::copysign(magnitude, sign);
}

std::vector<SpecValue> spec_finite_nonnegative_values(DType dtype) {
  const uint32_t codes = uint32_t{1} << spec_code_bits(dtype);
  std::vector<SpecValue> table;
  for (uint32_t code = 0; code < codes; ++code) {
    const double value = spec_decode(dtype, code);
    if (std::isnan(value) || std::isinf(value)) continue;
    if (std::signbit(value)) continue;  // negatives and -0
    table.push_back({value, code});
  }
  std::sort(table.begin(), table.end(),
            [](const SpecValue& a, const SpecValue& b) { return a.value < b.value; });
  return table;
}

double spec_max_finite(DType dtype) {
  return spec_finite_nonnegative_values(dtype).back().value;
}

}  // namespace dsv4
