// The expected code of every f32 input for each f32 -> narrow float encoder of
// engine/core/formats.h, built only from reference/formats_spec.h: the nearest representable
// value, exact midpoints (ties) to the even code, above the range ±max (fp8, fp4: CUDA's
// satfinite) or ±infinity (bf16, f16: IEEE 754 4.3.1). It also lists what a test generator needs
// to aim at the corners: every code's value, every tie, the subnormal and overflow boundaries.
//
// Built once per format (milliseconds); expected() is a table lookup, so the 2^32-input sweeps
// can call it for every input. Host only.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/core/dtype.h"
#include "reference/formats_spec.h"

namespace dsv4 {

class FormatOracle {
 public:
  // One of bf16, f16, f8_e4m3fn, f8_e4m3fnuz, f8_e5m2, f4_e2m1; aborts for any other dtype.
  explicit FormatOracle(DType dtype);

  DType dtype() const { return dtype_; }

  // The code for x. The sign is x's, except that a value rounding to zero is +0 in formats
  // without -0 (e4m3fnuz). NaN inputs get the format's quiet NaN of x's sign (e4m3fnuz: its only
  // NaN 0x80; e2m1, which has no NaN: +max, as CUDA does).
  uint32_t expected(float x) const {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint32_t mag = bits & 0x7FFFFFFFu;
    const bool negative = (bits >> 31) != 0;
    if (mag > kF32InfBits) return negative ? nan_code_negative_ : nan_code_positive_;
    // No tie lies strictly inside a bucket, so one code holds for its whole interior.
    const uint32_t entry = bucket_codes_[mag >> bucket_shift_];
    uint32_t code = (mag & bucket_low_mask_) == 0 ? (entry & 0xFFFFu) : (entry >> 16);
    if (negative && (code != 0 || has_negative_zero_)) code |= sign_mask_;
    return code;
  }

  // Whether an encoder's `got` is right for x: expected(x), except that a NaN input may keep its
  // payload, so any NaN code of x's sign is accepted (any sign in e4m3fnuz, whose NaN is unsigned).
  bool accepts(float x, uint32_t got) const {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7FFFFFFFu) <= kF32InfBits || nan_codes_.empty()) return got == expected(x);
    if (got >= is_nan_code_.size() || !is_nan_code_[got]) return false;
    return !signed_nans_ || ((got & sign_mask_) != 0) == ((bits >> 31) != 0);
  }

  // ---- what a generator aims at ----------------------------------------------------------------

  // Every finite non-negative value with its code, ascending; +0 once.
  const std::vector<SpecValue>& values() const { return values_; }
  // The exact midpoints between adjacent finite values, ascending, as f32 (for these six formats
  // every one is an f32, which the constructor checks). The last is the overflow threshold.
  const std::vector<float>& ties() const { return ties_; }
  // Whether |x| is exactly one of ties().
  bool is_tie(float x) const;
  double max_finite() const { return values_.back().value; }
  // max + ulp/2, the tie between max and the next binade's step: from here up the result is ±inf
  // (bf16, f16) or saturates to ±max (fp8, fp4; a tie rounds to max since it is past the range).
  float overflow_threshold() const { return ties_.back(); }
  bool saturates() const { return saturates_; }
  float min_subnormal() const { return static_cast<float>(values_[1].value); }
  // The smallest normal value: spacing is one subnormal step up to 2 * min_normal, then doubles.
  float min_normal() const { return min_normal_; }
  // Every NaN code (both signs), ascending; empty for e2m1.
  const std::vector<uint32_t>& nan_codes() const { return nan_codes_; }
  uint32_t sign_mask() const { return sign_mask_; }
  bool has_negative_zero() const { return has_negative_zero_; }
  // The code of ±infinity inputs: ±inf in bf16/f16, ±max elsewhere.
  uint32_t infinity_code(bool negative) const {
    const float inf = f32_infinity();
    return expected(negative ? -inf : inf);
  }

 private:
  static constexpr uint32_t kF32InfBits = 0x7F800000u;
  static float f32_infinity() {
    float inf;
    std::memcpy(&inf, &kF32InfBits, sizeof inf);
    return inf;
  }
  // The code for a magnitude from the tables by search: the slow path the buckets are filled from.
  uint32_t search_code(double magnitude) const;

  DType dtype_;
  bool saturates_ = true;
  bool has_negative_zero_ = true;
  bool signed_nans_ = true;
  uint32_t sign_mask_ = 0;
  float min_normal_ = 0;
  std::vector<SpecValue> values_;     // finite, non-negative, ascending
  std::vector<double> steps_;         // values_ plus, for bf16/f16, infinity as max + ulp
  std::vector<uint32_t> step_codes_;  // their codes
  std::vector<double> mids_;          // mids_[i]: midpoint of steps_[i] and steps_[i + 1]
  std::vector<uint32_t> tie_codes_;   // tie_codes_[i]: the code of exactly mids_[i]
  std::vector<float> ties_;
  std::vector<uint32_t> nan_codes_;
  std::vector<bool> is_nan_code_;
  uint32_t nan_code_positive_ = 0;
  uint32_t nan_code_negative_ = 0;
  // f32 magnitude bit patterns split into buckets of 2^bucket_shift_; every tie starts a bucket.
  // Entry: the code at the bucket's first pattern (low 16 bits) and inside it (high 16 bits).
  int bucket_shift_ = 0;
  uint32_t bucket_low_mask_ = 0;
  std::vector<uint32_t> bucket_codes_;
};

}  // namespace dsv4
