// Element types of tensors and checkpoints.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dsv4 {

enum class DType : uint8_t {
  f32,
  f64,
  bf16,
  f16,
  f8_e4m3fn,    // OCP FP8 E4M3: bias 7, max 448, NaN = S.1111.111, no infinity
  f8_e4m3fnuz,  // E4M3 "fnuz": bias 8, max 240, NaN = 0x80, no infinity, no negative zero
  f8_e5m2,      // OCP FP8 E5M2: bias 15, max 57344, IEEE-like infinities and NaNs
  f4_e2m1,      // OCP MX FP4 E2M1: max 6, no inf/NaN; packed two per byte, low nibble first
  ue8m0,        // OCP MX E8M0 scale: 2^(e-127), 0xFF = NaN
  i8,
  i32,
  i64,
  u8,
  boolean,
};

inline constexpr DType kAllDTypes[] = {
    DType::f32,     DType::f64,         DType::bf16,    DType::f16,     DType::f8_e4m3fn,
    DType::f8_e4m3fnuz, DType::f8_e5m2, DType::f4_e2m1, DType::ue8m0,   DType::i8,
    DType::i32,     DType::i64,         DType::u8,      DType::boolean,
};

// Bits per element (4 for f4_e2m1).
int dtype_bits(DType dtype);
// Bytes that `numel` elements occupy when densely packed (fp4: two per byte, rounded up).
int64_t dtype_storage_bytes(DType dtype, int64_t numel);
bool dtype_is_floating(DType dtype);
bool dtype_is_integer(DType dtype);
// Our name: "f32", "bf16", "f8_e4m3fn", ...
std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);

}  // namespace dsv4
