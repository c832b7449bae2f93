#include "engine/core/formats.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "engine/core/error.h"

namespace dsv4 {

namespace {

[[noreturn]] void not_a_narrow_float(const char* op, DType dtype) {
  throw ContractError(op, "dtype",
                      "must be a narrow float format, got " + std::string(dtype_name(dtype)));
}

template <typename T>
T load_raw(const void* base, int64_t index) {
  // memcpy: buffers come from byte streams (checkpoints) and need not be aligned.
  T value;
  std::memcpy(&value, static_cast<const unsigned char*>(base) + index * int64_t{sizeof(T)},
              sizeof(T));
  return value;
}

template <typename T>
void store_raw(void* base, int64_t index, T value) {
  std::memcpy(static_cast<unsigned char*>(base) + index * int64_t{sizeof(T)}, &value, sizeof(T));
}

// Round to nearest (ties to even) and clamp to T's range; NaN -> 0.
template <typename T>
T saturate_round(double value) {
  if (std::isnan(value)) return T{0};
  const double rounded = std::nearbyint(value);
  // (double)max of int64 is 2^63, one past the range, so >= catches it before the cast.
  if (rounded >= static_cast<double>(std::numeric_limits<T>::max())) {
    return std::numeric_limits<T>::max();
  }
  if (rounded <= static_cast<double>(std::numeric_limits<T>::min())) {
    return std::numeric_limits<T>::min();
  }
  return static_cast<T>(rounded);
}

}  // namespace

uint32_t encode_f32(DType dtype, float value) {
  if (!is_narrow_float(dtype)) not_a_narrow_float("encode_f32", dtype);
  return encode_narrow(dtype, value);
}

float decode_f32(DType dtype, uint32_t code) {
  if (!is_narrow_float(dtype)) not_a_narrow_float("decode_f32", dtype);
  return decode_narrow(dtype, code);
}

double load_element_f64(DType dtype, const void* base, int64_t index) {
  switch (dtype) {
    case DType::f32: return load_raw<float>(base, index);
    case DType::f64: return load_raw<double>(base, index);
    case DType::bf16: return bf16_to_f32(load_raw<uint16_t>(base, index));
    case DType::f16: return f16_to_f32(load_raw<uint16_t>(base, index));
    case DType::f8_e4m3fn: return e4m3fn_to_f32(load_raw<uint8_t>(base, index));
    case DType::f8_e4m3fnuz: return e4m3fnuz_to_f32(load_raw<uint8_t>(base, index));
    case DType::f8_e5m2: return e5m2_to_f32(load_raw<uint8_t>(base, index));
    case DType::f4_e2m1: return e2m1_to_f32(fp4_get(static_cast<const uint8_t*>(base), index));
    case DType::ue8m0: return ue8m0_to_f32(load_raw<uint8_t>(base, index));
    case DType::i8: return load_raw<int8_t>(base, index);
    case DType::i32: return load_raw<int32_t>(base, index);
    case DType::i64: return static_cast<double>(load_raw<int64_t>(base, index));
    case DType::u8: return load_raw<uint8_t>(base, index);
    case DType::boolean: return load_raw<uint8_t>(base, index) != 0 ? 1.0 : 0.0;
  }
  DSV4_ASSERT(false, "unknown dtype");
}

void store_element_f64(DType dtype, void* base, int64_t index, double value) {
  const float as_f32 = static_cast<float>(value);
  switch (dtype) {
    case DType::f32: store_raw<float>(base, index, as_f32); return;
    case DType::f64: store_raw<double>(base, index, value); return;
    case DType::bf16: store_raw<uint16_t>(base, index, f32_to_bf16(as_f32)); return;
    case DType::f16: store_raw<uint16_t>(base, index, f32_to_f16(as_f32)); return;
    case DType::f8_e4m3fn: store_raw<uint8_t>(base, index, f32_to_e4m3fn(as_f32)); return;
    case DType::f8_e4m3fnuz: store_raw<uint8_t>(base, index, f32_to_e4m3fnuz(as_f32)); return;
    case DType::f8_e5m2: store_raw<uint8_t>(base, index, f32_to_e5m2(as_f32)); return;
    case DType::f4_e2m1: fp4_set(static_cast<uint8_t*>(base), index, f32_to_e2m1(as_f32)); return;
    case DType::ue8m0: store_raw<uint8_t>(base, index, f32_to_ue8m0_ceil(as_f32)); return;
    case DType::i8: store_raw<int8_t>(base, index, saturate_round<int8_t>(value)); return;
    case DType::i32: store_raw<int32_t>(base, index, saturate_round<int32_t>(value)); return;
    case DType::i64: store_raw<int64_t>(base, index, saturate_round<int64_t>(value)); return;
    case DType::u8: store_raw<uint8_t>(base, index, saturate_round<uint8_t>(value)); return;
    case DType::boolean: store_raw<uint8_t>(base, index, value != 0 ? 1 : 0); return;
  }
  DSV4_ASSERT(false, "unknown dtype");
}

}  // namespace dsv4
