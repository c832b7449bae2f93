#include "engine/core/dtype.h"

#include "engine/core/error.h"

namespace dsv4 {

int dtype_bits(DType dtype) {
  switch (dtype) {
    case DType::f64:
    case DType::i64:
      return 64;
    case DType::f32:
    case DType::i32:
      return 32;
    case DType::bf16:
    case DType::f16:
      return 16;
    case DType::f8_e4m3fn:
    case DType::f8_e4m3fnuz:
    case DType::f8_e5m2:
    case DType::ue8m0:
    case DType::i8:
    case DType::u8:
    case DType::boolean:
      return 8;
    case DType::f4_e2m1:
      return 4;
  }
  DSV4_ASSERT(false, "unknown dtype");
}

int64_t dtype_storage_bytes(DType dtype, int64_t numel) {
  DSV4_ASSERT(numel >= 0, "negative element count");
  const int bits = dtype_bits(dtype);
  if (bits == 4) return (numel + 1) / 2;
  return numel * (bits / 8);
}

bool dtype_is_floating(DType dtype) {
  switch (dtype) {
    case DType::f32:
    case DType::f64:
    case DType::bf16:
    case DType::f16:
    case DType::f8_e4m3fn:
    case DType::f8_e4m3fnuz:
    case DType::f8_e5m2:
    case DType::f4_e2m1:
    case DType::ue8m0:
      return true;
    default:
      return false;
  }
}

bool dtype_is_integer(DType dtype) {
  return !dtype_is_floating(dtype);
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::f8_e4m3fn: return "f8_e4m3fn";
    case DType::f8_e4m3fnuz: return "f8_e4m3fnuz";
    case DType::f8_e5m2: return "f8_e5m2";
    case DType::f4_e2m1: return "f4_e2m1";
    case DType::ue8m0: return "ue8m0";
    case DType::i8: return "i8";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::boolean: return "bool";
  }
  DSV4_ASSERT(false, "unknown dtype");
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : kAllDTypes) {
    if (dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

}  // namespace dsv4
