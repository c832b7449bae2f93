// The truth for the narrow number formats, written from the OCP 8-bit Floating Point
// Specification (OFP8), the OCP Microscaling (MX) Formats Specification v1.0 and IEEE 754-2019.
// It decodes codes with the textbook formula in double precision and shares no code with
// engine/core/formats.h, which it is the oracle for. Host only; speed is not a goal.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/core/dtype.h"

namespace dsv4 {

// Width in bits of a code of a narrow float dtype: 16 (bf16, f16), 8 (fp8s, ue8m0), 4 (f4_e2m1).
// Aborts for other dtypes.
int spec_code_bits(DType dtype);

// Exact value of `code` (low spec_code_bits bits used; higher bits must be zero):
//   normal:    (-1)^s * 2^(e - bias) * (1 + m / 2^M)
//   subnormal: (-1)^s * 2^(1 - bias) * (m / 2^M)
// with each format's special encodings: NaN is returned as a quiet NaN, infinities as ±inf,
// and zeros keep their sign. ue8m0 is 2^(code - 127) with 0xFF = NaN.
double spec_decode(DType dtype, uint32_t code);

bool spec_is_nan(DType dtype, uint32_t code);

// The sign bit of a code (0 for ue8m0, which has none).
uint32_t spec_sign_mask(DType dtype);

struct SpecValue {
  double value;
  uint32_t code;
};

// Every finite non-negative value of the format with its code, sorted by value ascending.
// +0 appears once (its positive-sign code); negative zeros are not listed.
std::vector<SpecValue> spec_finite_nonnegative_values(DType dtype);

// Largest finite value.
double spec_max_finite(DType dtype);

}  // namespace dsv4
