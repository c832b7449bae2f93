#include "reference/formats_oracle.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "engine/core/error.h"

namespace dsv4 {

namespace {

uint32_t bits_of(float x) { return std::bit_cast<uint32_t>(x); }
float float_of(uint32_t bits) { return std::bit_cast<float>(bits); }

uint32_t even_of(uint32_t a, uint32_t b) { return (a & 1u) == 0 ? a : b; }

}  // namespace

FormatOracle::FormatOracle(DType dtype) : dtype_(dtype) {
  DSV4_ASSERT(dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f8_e4m3fn ||
                  dtype == DType::f8_e4m3fnuz || dtype == DType::f8_e5m2 || dtype == DType::f4_e2m1,
              "FormatOracle: not an f32 -> narrow float encoder's format");
  // IEEE formats overflow to infinity; the others have none (e5m2 does, but the encoders follow
  // CUDA's satfinite, which saturates every fp8 and fp4 format).
  saturates_ = !(dtype == DType::bf16 || dtype == DType::f16);
  values_ = spec_finite_nonnegative_values(dtype);
  DSV4_ASSERT(values_.size() >= 3, "FormatOracle: too few values");
  sign_mask_ = spec_sign_mask(dtype);
  has_negative_zero_ = !spec_is_nan(dtype, sign_mask_);

  for (const SpecValue& v : values_) {
    steps_.push_back(v.value);
    step_codes_.push_back(v.code);
  }
  const size_t n = values_.size();
  const double ulp_at_max = values_[n - 1].value - values_[n - 2].value;
  if (!saturates_) {
    // IEEE 754 4.3.1: a magnitude >= max + ulp/2 rounds to infinity. Infinity acts as one more
    // step 2^(emax+1) = max + ulp, and the tie below it goes up to infinity rather than to even.
    const uint32_t inf_code = values_[n - 1].code + 1;
    DSV4_ASSERT(std::isinf(spec_decode(dtype, inf_code)), "FormatOracle: no infinity after max");
    steps_.push_back(values_[n - 1].value + ulp_at_max);
    step_codes_.push_back(inf_code);
  }
  for (size_t i = 0; i + 1 < steps_.size(); ++i) {
    mids_.push_back((steps_[i] + steps_[i + 1]) / 2);  // exact in double: few significant bits
    tie_codes_.push_back(even_of(step_codes_[i], step_codes_[i + 1]));
  }
  if (!saturates_) tie_codes_.back() = step_codes_.back();

  for (double mid : mids_) ties_.push_back(static_cast<float>(mid));
  // Saturating formats still have the threshold where unbounded rounding would leave the range.
  if (saturates_) ties_.push_back(static_cast<float>(values_[n - 1].value + ulp_at_max / 2));
  for (size_t i = 0; i < ties_.size(); ++i) {
    const double exact = i < mids_.size() ? mids_[i] : values_[n - 1].value + ulp_at_max / 2;
    DSV4_ASSERT(static_cast<double>(ties_[i]) == exact, "FormatOracle: a tie is not an f32");
  }

  const double subnormal_step = values_[1].value;
  min_normal_ = static_cast<float>(values_[n - 1].value);
  for (size_t i = 1; i + 1 < n; ++i) {
    if (values_[i + 1].value - values_[i].value > subnormal_step) {
      min_normal_ = static_cast<float>(values_[i].value / 2);
      break;
    }
  }

  const uint32_t code_count = uint32_t{1} << spec_code_bits(dtype);
  DSV4_ASSERT(code_count <= 0x10000u, "FormatOracle: codes must fit the 16-bit bucket entries");
  is_nan_code_.assign(code_count, false);
  bool positive_nan = false;
  bool negative_nan = false;
  for (uint32_t c = 0; c < code_count; ++c) {
    if (!spec_is_nan(dtype, c)) continue;
    is_nan_code_[c] = true;
    nan_codes_.push_back(c);
    ((c & sign_mask_) != 0 ? negative_nan : positive_nan) = true;
  }
  signed_nans_ = positive_nan && negative_nan;
  // The quiet NaN of a sign is the middle of its NaN codes: with all-ones exponents (IEEE, e5m2)
  // that is the code with only the top mantissa bit set; e4m3fn and e4m3fnuz have just one.
  auto quiet_nan = [&](bool negative) {
    std::vector<uint32_t> same;
    for (uint32_t c : nan_codes_) {
      if (((c & sign_mask_) != 0) == negative || !signed_nans_) same.push_back(c);
    }
    return same[same.size() / 2];
  };
  if (nan_codes_.empty()) {
    nan_code_positive_ = nan_code_negative_ = values_[n - 1].code;  // e2m1: CUDA gives +max
  } else {
    nan_code_positive_ = quiet_nan(false);
    nan_code_negative_ = quiet_nan(true);
  }

  // Every tie is an f32 with at most a few significant bits, so its bit pattern ends in at least
  // bucket_shift_ zeros: each tie starts a bucket, and a bucket's interior has one code.
  bucket_shift_ = 23;
  for (float t : ties_) {
    if (t > 0) bucket_shift_ = std::min(bucket_shift_, std::countr_zero(bits_of(t)));
  }
  bucket_low_mask_ = (uint32_t{1} << bucket_shift_) - 1u;
  const uint32_t bucket_count = (kF32InfBits >> bucket_shift_) + 1;
  bucket_codes_.resize(bucket_count);
  for (uint32_t k = 0; k < bucket_count; ++k) {
    const uint32_t start = k << bucket_shift_;
    const uint32_t at_start = search_code(float_of(start));
    // The bucket starting at infinity has no finite interior (the rest is NaN, handled apart).
    const uint32_t inside = start == kF32InfBits ? at_start : search_code(float_of(start + 1));
    bucket_codes_[k] = at_start | (inside << 16);
  }
}

uint32_t FormatOracle::search_code(double magnitude) const {
  const size_t n = steps_.size();
  const size_t i =
      static_cast<size_t>(std::upper_bound(steps_.begin(), steps_.end(), magnitude) - steps_.begin()) - 1;
  if (i + 1 == n) return step_codes_[n - 1];  // at or past the top: max (saturating) or infinity
  if (magnitude < mids_[i]) return step_codes_[i];
  if (magnitude > mids_[i]) return step_codes_[i + 1];
  return tie_codes_[i];
}

bool FormatOracle::is_tie(float x) const {
  const float magnitude = std::fabs(x);
  if (std::isnan(magnitude)) return false;  // NaN compares false both ways and would match
  return std::binary_search(ties_.begin(), ties_.end(), magnitude);
}

}  // namespace dsv4
