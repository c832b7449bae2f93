// What differs between CUDA and HIP, in one place: the runtime header, the stream and error types,
// and the warp width (32 on NVIDIA, 64 on CDNA wavefronts such as gfx90a). Kernel sources include
// this instead of cuda_runtime.h so that the `hip-check` preset compiles them with hipcc.
#pragma once

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
namespace dsv4::gpu {
using Stream = hipStream_t;
using Error = hipError_t;
inline constexpr Error kSuccess = hipSuccess;
inline Error last_error() { return hipGetLastError(); }
inline const char* error_string(Error e) { return hipGetErrorString(e); }
#if defined(__AMDGCN_WAVEFRONT_SIZE)
inline constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE;
#else
inline constexpr int kWarpSize = 64;
#endif
}  // namespace dsv4::gpu
#else
#include <cuda_runtime.h>
namespace dsv4::gpu {
using Stream = cudaStream_t;
using Error = cudaError_t;
inline constexpr Error kSuccess = cudaSuccess;
inline Error last_error() { return cudaGetLastError(); }
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
inline constexpr int kWarpSize = 32;
}  // namespace dsv4::gpu
#endif

#include <stdexcept>
#include <string>

namespace dsv4::gpu {

// Launch errors are internal failures (a bad grid, no device), not user input: they stop the op.
inline void check_launch(const char* op) {
  const Error e = last_error();
  if (e != kSuccess) throw std::runtime_error(std::string(op) + ": kernel launch failed: " + error_string(e));
}

inline int blocks_for(long long n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

}  // namespace dsv4::gpu
