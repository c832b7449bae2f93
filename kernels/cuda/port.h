// What differs between CUDA and HIP, in one place: the runtime header, the stream and error types,
// the warp width (32 on NVIDIA, 64 on CDNA wavefronts such as gfx90a), the lane-mask width of the
// shuffles (32 bits on CUDA, 64 on HIP), the launch checks, and the FP8 e4m3fn encoder (CUDA's
// hardware conversion or formats.h's software round-to-nearest-even). Kernel sources include this
// instead of cuda_runtime.h so that the `hip-check` preset compiles them with hipcc.
//
// The warp collectives are written once (detail::butterfly) over a "lanes" policy: DeviceLanes is
// the hardware shuffle; ModelLanes<32 or 64> is a host model holding every lane's value of one warp
// and implementing __shfl_xor's semantics with an explicit width, so a butterfly can be run on the
// host for both warp sizes (tests/unit/test_port_collectives.cpp). The runtime part (streams,
// Scratch, launch checks) exists only under nvcc / hipcc; a plain C++ compiler sees the collectives'
// model and the software FP8 encoder alone.
#pragma once

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define DSV4_GPU_COMPILER 1
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
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cuda_fp8.h>
#define DSV4_GPU_COMPILER 1
namespace dsv4::gpu {
using Stream = cudaStream_t;
using Error = cudaError_t;
inline constexpr Error kSuccess = cudaSuccess;
inline Error last_error() { return cudaGetLastError(); }
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
inline constexpr int kWarpSize = 32;
}  // namespace dsv4::gpu
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "engine/core/formats.h"  // after the runtime header: its device code uses the runtime's intrinsics
#include "engine/core/hd.h"

namespace dsv4::gpu {

// ---- lane masks ----------------------------------------------------------------------------------
// A mask with one bit per lane of a warp: 64 bits on HIP (wave64), 32 on CUDA. Only the full mask is
// used here: every collective below is called by all lanes of the warp.
#if defined(__HIPCC__)
using LaneMask = unsigned long long;
inline constexpr LaneMask kFullLaneMask = ~0ull;
#else
using LaneMask = unsigned int;
inline constexpr LaneMask kFullLaneMask = 0xffffffffu;
#endif

#if defined(DSV4_GPU_COMPILER)
// ---- launches --------------------------------------------------------------------------------------
// Both compilers take the triple-chevron launch: kernel<<<grid, block, smem_bytes, stream>>>(args),
// followed by check_launch. Launch errors are internal failures (a bad grid, no device), not user
// input: they stop the op.
inline void check_launch(const char* op) {
  const Error e = last_error();
  if (e != kSuccess) throw std::runtime_error(std::string(op) + ": kernel launch failed: " + error_string(e));
}

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
inline int blocks_for(long long n, int threads) { return static_cast<int>(ceil_div(n, threads)); }
// Whether p is a multiple of `bytes` (a power of two): the vector loads a fast path relies on.
inline bool aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

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

// The most dynamic shared memory one block of the current device may opt in to.
inline size_t smem_optin_limit() {
  int device = 0, bytes = 0;
#if defined(__HIPCC__)
  check(hipGetDevice(&device), "hipGetDevice");
  check(hipDeviceGetAttribute(&bytes, hipDeviceAttributeSharedMemPerBlockOptin, device), "hipDeviceGetAttribute");
#else
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
#endif
  return static_cast<size_t>(bytes);
}

// The current device's number of SMs (compute units on HIP).
inline int sm_count() {
  int device = 0, sms = 0;
#if defined(__HIPCC__)
  check(hipGetDevice(&device), "hipGetDevice");
  check(hipDeviceGetAttribute(&sms, hipDeviceAttributeMultiprocessorCount, device), "hipDeviceGetAttribute");
#else
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
#endif
  return sms;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (past the default 48 KiB).
template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes, const char* what) {
#if defined(__HIPCC__)
  check(hipFuncSetAttribute(reinterpret_cast<const void*>(kernel), hipFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(bytes)),
        what);
#else
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), what);
#endif
}

// The calling lanes' shared-memory writes made visible to the other lanes of their warp, and the
// lanes met there: __syncwarp on CUDA; on a CDNA wavefront, whose lanes run in lockstep, a fence and
// barrier of wavefront scope. Every lane of the warp calls it.
__device__ inline void sync_lanes() {
#if defined(__HIPCC__)
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
#else
  __syncwarp();
#endif
}
#endif  // DSV4_GPU_COMPILER

// ---- warp and block collectives ---------------------------------------------------------------------
// Every lane of the warp (wavefront) must call them. Results are deterministic: a fixed butterfly
// order within a warp, then warp partials combined in warp order.
inline constexpr int kMaxWarps = 1024 / 32;  // shared floats a block_* collective needs

namespace detail {

// The combining steps of the collectives, applied as op(own value, partner's value).
struct SumOp {
  template <class T>
  DSV4_HD T operator()(T own, T other) const { return own + other; }
};
struct MaxOp {
  template <class T>
  DSV4_HD T operator()(T own, T other) const { return other > own ? other : own; }
};

// The butterfly, written once for every lanes policy: at each step every lane combines its value
// with the one of lane (self ^ offset), offsets first_offset, first_offset / 2, ..., 1, each shuffle
// confined to aligned segments of `width` lanes. With first_offset = width / 2 every lane of a
// segment ends with the segment's reduction, in the same order in every lane (the operations are
// commutative), hence the same bits.
template <class Lanes, class V, class Op>
DSV4_HD inline V butterfly(V v, int first_offset, int width, Op op) {
  for (int o = first_offset; o > 0; o /= 2) v = Lanes::combine(v, Lanes::shfl_xor(v, o, width), op);
  return v;
}

}  // namespace detail

#if defined(DSV4_GPU_COMPILER)
// The hardware: each thread holds its own lane's value. CUDA takes a 32-bit member mask; HIP's
// synchronising shuffles (ROCm 6.2+, opted in with HIP_ENABLE_WARP_SYNC_BUILTINS) a 64-bit one,
// and its classic __shfl_xor implicitly covers the whole wavefront.
struct DeviceLanes {
  template <class T>
  __device__ static T shfl_xor(T v, int lane_mask, int width) {
#if defined(__HIPCC__)
#if defined(HIP_ENABLE_WARP_SYNC_BUILTINS)
    return __shfl_xor_sync(kFullLaneMask, v, lane_mask, width);
#else
    return __shfl_xor(v, lane_mask, width);
#endif
#else
    return __shfl_xor_sync(kFullLaneMask, v, lane_mask, width);
#endif
  }
  template <class T, class Op>
  __device__ static T combine(T own, T other, Op op) { return op(own, other); }
};

template <class T>
__device__ inline T shfl_xor(T v, int lane_mask, int width) { return DeviceLanes::shfl_xor(v, lane_mask, width); }

// Within aligned groups of `width` lanes (a power of two <= kWarpSize); every lane gets its group's result.
template <class T>
__device__ inline T group_sum(T v, int width) { return detail::butterfly<DeviceLanes>(v, width / 2, width, detail::SumOp{}); }
template <class T>
__device__ inline T group_max(T v, int width) { return detail::butterfly<DeviceLanes>(v, width / 2, width, detail::MaxOp{}); }
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
#endif  // DSV4_GPU_COMPILER

// ---- the host model of a warp (tests) ---------------------------------------------------------------
// All kLanes values of one warp, lane i in lane[i]. The collectives below take and return a whole
// warp's values, so a butterfly can be checked on the host for warp size 32 and 64 alike.
template <class T, int kLanes>
struct LaneArray {
  static_assert(kLanes == 32 || kLanes == 64, "a warp has 32 (CUDA) or 64 (CDNA) lanes");
  T lane[kLanes];
};

template <int kLanes>
struct ModelLanes {
  static constexpr int kWarpSize = kLanes;

  // __shfl_xor(v, lane_mask, width) as the hardware does it: lane `self` reads lane
  // src = self ^ lane_mask, unless src lies past the end of self's aligned width-segment (in a later
  // segment, or past the warp), in which case it gets its own value; an earlier segment may be read.
  // A 32-lane warp is CUDA's shfl.bfly, which takes the mask's low 5 bits; a 64-lane one is HIP's
  // __shfl_xor, which takes the whole mask. (tests/gpu/test_kernels_mhc.cu checks the 32-lane model
  // against the hardware for every mask 0..63 and width.) Width must be a power of two <= the warp size (undefined
  // on the hardware otherwise): the model throws std::logic_error.
  template <class T>
  static LaneArray<T, kLanes> shfl_xor(const LaneArray<T, kLanes>& v, int lane_mask, int width) {
    if (width < 1 || width > kLanes || (width & (width - 1)) != 0) {
      throw std::logic_error("shfl_xor: width " + std::to_string(width) + " is not a power of two <= " +
                             std::to_string(kLanes));
    }
    const int mask = kLanes == 32 ? (lane_mask & 31) : lane_mask;
    LaneArray<T, kLanes> out;
    for (int self = 0; self < kLanes; ++self) {
      const int src = self ^ mask;
      const int segment_end = (self + width) & ~(width - 1);
      out.lane[self] = (src < 0 || src >= segment_end) ? v.lane[self] : v.lane[src];
    }
    return out;
  }

  template <class T, class Op>
  static LaneArray<T, kLanes> combine(const LaneArray<T, kLanes>& own, const LaneArray<T, kLanes>& other, Op op) {
    LaneArray<T, kLanes> out;
    for (int i = 0; i < kLanes; ++i) out.lane[i] = op(own.lane[i], other.lane[i]);
    return out;
  }
};

// The collectives on a modelled warp: the same butterfly as the device ones, the model's shuffle.
template <class T, int kLanes>
LaneArray<T, kLanes> shfl_xor(const LaneArray<T, kLanes>& v, int lane_mask, int width) {
  return ModelLanes<kLanes>::shfl_xor(v, lane_mask, width);
}
template <class T, int kLanes>
LaneArray<T, kLanes> group_sum(const LaneArray<T, kLanes>& v, int width) {
  return detail::butterfly<ModelLanes<kLanes>>(v, width / 2, width, detail::SumOp{});
}
template <class T, int kLanes>
LaneArray<T, kLanes> group_max(const LaneArray<T, kLanes>& v, int width) {
  return detail::butterfly<ModelLanes<kLanes>>(v, width / 2, width, detail::MaxOp{});
}
template <class T, int kLanes>
LaneArray<T, kLanes> warp_sum(const LaneArray<T, kLanes>& v) { return group_sum(v, kLanes); }
template <class T, int kLanes>
LaneArray<T, kLanes> warp_max(const LaneArray<T, kLanes>& v) { return group_max(v, kLanes); }

// ---- FP8 e4m3fn encoding ------------------------------------------------------------------------------
// f32 -> e4m3fn, round to nearest even, saturating to ±448 (CUDA's __NV_SATFINITE), NaN -> a NaN of
// the input's sign. Two implementations with the same codes for every f32 input:
//   - e4m3fn_software: formats.h's bit-exact software encoder; host and device, CUDA and HIP;
//   - e4m3fn_intrinsic (CUDA device code only): __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3),
//     one cvt instruction on sm_89+, with the NaN sign restored (the hardware returns one NaN code
//     for every NaN; tests/gpu/test_kernels_mhc.cu checks both over all 2^32 inputs).
// to_e4m3fn picks the intrinsic in CUDA device code unless DSV4_GPU_FP8_INTRINSIC is defined to 0,
// and the software encoder everywhere else (host code, HIP).
#if !defined(DSV4_GPU_FP8_INTRINSIC)
#define DSV4_GPU_FP8_INTRINSIC 1
#endif

DSV4_HD inline uint8_t e4m3fn_software(float x) { return f32_to_e4m3fn(x); }

#if defined(__CUDACC__) && !defined(__HIPCC__)
#define DSV4_GPU_HAS_FP8_INTRINSIC 1
__device__ inline uint8_t e4m3fn_intrinsic(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint8_t>(((bits >> 24) & 0x80u) | 0x7Fu);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}
#endif

DSV4_HD inline uint8_t to_e4m3fn(float x) {
#if defined(__CUDA_ARCH__) && defined(DSV4_GPU_HAS_FP8_INTRINSIC) && DSV4_GPU_FP8_INTRINSIC
  return e4m3fn_intrinsic(x);
#else
  return e4m3fn_software(x);
#endif
}

}  // namespace dsv4::gpu
