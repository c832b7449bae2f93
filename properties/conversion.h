// The fp8-conversion suite: f32 bit patterns through one portable encoder of engine/core/formats.h
// (f32_to_e4m3fn, ..., f32_to_f16), each code checked against reference/formats_oracle.h. The
// generator aims at the corners where a hand-written conversion goes wrong (exact ties, ±1 ulp
// around them, subnormal boundaries, the overflow threshold, specials); corner_sweep is the
// bounded exhaustive pass over all of them that `dsv4h check` runs before generating.
#pragma once

#include <rapidcheck.h>

#include <ostream>
#include <string>
#include <vector>

#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

// "e4m3fn", "e4m3fnuz", "e5m2", "e2m1", "bf16", "f16".
std::vector<std::string> conversion_formats();

// Every input through the format's encoder: pass, or a mismatch whose signature is the encoder
// ("f32_to_e4m3fn") and whose detail names the format, the first inputs' bits, got and expected
// codes. NaN inputs accept any NaN code of their sign (payloads may survive). InputError naming
// "conversion.format" for a format not in conversion_formats().
Verdict check_conversion_case(const ConversionSpec& spec);

// A format, then inputs chosen on purpose: exact ties, ties ±1 ulp, code values ±1 ulp, subnormal
// boundaries, the overflow threshold and max ±1 ulp, zeros, infinities, NaNs, and random bits.
// Shrinks to fewer inputs, and an input near a corner onto the corner (offset 0, sign +).
rc::Gen<ConversionSpec> gen_conversion_spec();

// Everything interesting of one format in one case: every code's value and every tie, each exactly
// and ±1 ulp, both signs, plus the f32 specials and boundaries. Sorted, no duplicates.
// InputError naming "conversion.format" for an unknown format.
ConversionSpec corner_sweep(const std::string& format);

// RapidCheck's printer for counterexamples: the format and the inputs as hex bit patterns.
void showValue(const ConversionSpec& spec, std::ostream& os);

}  // namespace dsv4::props
