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

inline void check(Error e, const char* what) {
  if (e != kSuccess) throw std::runtime_error(std::string(what) + ": " + error_string(e));
}

// Stream-ordered scratch memory for one op (cudaMallocAsync / hipMallocAsync): legal inside a graph
// capture, where it becomes the graph's own allocation, and freed on the stream when it goes.
class Scratch {
 public:
  Scratch(size_t bytes, Stream stream) : stream_(stream) {
    if (bytes == 0) return;
#if defined(__HIPCC__)
    check(hipMallocAsync(&ptr_, bytes, stream), "hipMallocAsync (op scratch)");
#else
    check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync (op scratch)");
#endif
  }
  ~Scratch() {
    if (ptr_ == nullptr) return;
#if defined(__HIPCC__)
    (void)hipFreeAsync(ptr_, stream_);
#else
    (void)cudaFreeAsync(ptr_, stream_);
#endif
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  Stream stream_;
};

// ---- warp and block collectives (device code) ---------------------------------------------------
// Every lane of the warp (wavefront) must call them. Results are deterministic: a fixed butterfly
// order within a warp, then warp partials combined in warp order.
inline constexpr int kMaxWarps = 1024 / 32;  // shared floats a block_* collective needs

#if defined(__CUDACC__) || defined(__HIPCC__)
template <class T>
__device__ inline T shfl_xor(T v, int lane_mask, int width) {
#if defined(__HIPCC__)
  return __shfl_xor(v, lane_mask, width);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#endif
}

// Within aligned groups of `width` lanes (a power of two <= kWarpSize); every lane gets its group's result.
template <class T>
__device__ inline T group_sum(T v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v += shfl_xor(v, o, width);
  return v;
}
template <class T>
__device__ inline T group_max(T v, int width) {
  for (int o = width / 2; o > 0; o /= 2) {
    const T other = shfl_xor(v, o, width);
    v = other > v ? other : v;
  }
  return v;
}
template <class T>
__device__ inline T warp_sum(T v) { return group_sum(v, kWarpSize); }
template <class T>
__device__ inline T warp_max(T v) { return group_max(v, kWarpSize); }

// Block-wide, blockDim.x a multiple of kWarpSize; `smem` holds kMaxWarps floats. Every thread gets
// the result. Contains __syncthreads (call from all threads).
__device__ inline float block_sum(float v, float* smem) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += smem[w];
  return total;
}
__device__ inline float block_max(float v, float* smem) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float m = smem[0];
  for (int w = 1; w < warps; ++w) m = smem[w] > m ? smem[w] : m;
  return m;
}
#endif

}  // namespace dsv4::gpu
