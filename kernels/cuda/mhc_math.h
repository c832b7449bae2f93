// The scalar arithmetic of the mHC GPU kernels (kernels/cuda/mhc.cu) beyond kernels/cuda/libm.h,
// written so that it equals the host kernels (kernels/host/mhc.cpp) bit for bit. Device code only.
//
// Rounded operations and exp of an f32 (the Sinkhorn softmax) come from libm.h: every product and
// sum rounded on its own, and libm_expf, glibc's expf operation for operation (the host calls
// std::exp(float), which is not correctly rounded).
//
// sigmoid (the pre / post weights). The host computes f32(1 / (1 + exp(-z))) in f64 with glibc's
// exp; the device uses its own f64 exp (both within an ulp of exact). The f64 results can differ in
// the last bit, which changes the f32 result only when it lies within an f64 ulp of an f32 rounding
// boundary: 60 of the 2^32 f32 inputs z are that close (counted on the host); the GPU test compares
// the two over all 2^32 inputs (equal on an H100 with CUDA 13.0).
#pragma once

#include <cmath>

#include "kernels/cuda/libm.h"

namespace dsv4::kernels::mhc_gpu {

// f32(1 / (1 + exp(-z))) in f64, as the host's sigmoid.
__device__ inline float sigmoid(float z) {
  return static_cast<float>(gpu_math::ddiv(1.0, gpu_math::dadd(1.0, ::exp(-static_cast<double>(z)))));
}

}  // namespace dsv4::kernels::mhc_gpu
