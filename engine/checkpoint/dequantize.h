// Block-scaled checkpoint weights to f32, exactly (e4m3 or e2m1 codes times power-of-two scales):
// what the reference computes with, and what the engine's w8a8-int8 mode requantizes per channel.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/checkpoint/checkpoint_layout.h"

namespace dsv4 {

// An FP8 weight [out, in] times its [ceil(out / block), ceil(in / block)] ue8m0 scales, row-major.
std::vector<float> dequantize_fp8_weight(const TensorSpec& w, const std::vector<uint8_t>& codes,
                                         const std::vector<uint8_t>& scales, int64_t block);
// FP4 pairs [out, in / 2] times their [out, in / block] ue8m0 scales, unpacked to [out, in] row-major.
std::vector<float> dequantize_fp4_weight(const TensorSpec& w, const std::vector<uint8_t>& packed,
                                         const std::vector<uint8_t>& scales, int64_t block);

}  // namespace dsv4
