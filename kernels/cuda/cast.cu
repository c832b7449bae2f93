// CUDA (and, through port.h, HIP) implementation of kernels/cast.h. One thread per output byte for
// fp4 (two elements, so no two threads write one byte), one thread per element otherwise.
#include "kernels/cast.h"
#include "kernels/cuda/port.h"

#include <cstdint>

#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4::kernels {

namespace {

constexpr int kThreads = 256;

__global__ void encode_kernel(const float* in, uint8_t* out, long long n, DType to) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (to == DType::f4_e2m1) {
    const long long lo = 2 * i;
    if (lo >= n) return;
    const uint32_t a = encode_narrow(to, in[lo]);
    const uint32_t b = lo + 1 < n ? encode_narrow(to, in[lo + 1]) : 0u;
    out[i] = static_cast<uint8_t>(a | (b << 4));
    return;
  }
  if (i >= n) return;
  store_code(to, out, i, encode_narrow(to, in[i]));
}

__global__ void decode_kernel(const uint8_t* in, float* out, long long n, DType from) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = decode_narrow(from, load_code(from, in, i));
}

__global__ void copy_kernel(const float* in, float* out, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

}  // namespace

void cast_cuda(const Tensor& src, Tensor& dst, void* stream_ptr) {
  check_cast_contract(src, dst);
  if (src.device().kind != DeviceKind::cuda) throw ContractError("cast_cuda", "src", "needs device tensors");
  const long long n = src.numel();
  if (n == 0) return;
  auto stream = static_cast<gpu::Stream>(stream_ptr);
  if (src.dtype() == DType::f32 && dst.dtype() == DType::f32) {
    copy_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, stream>>>(src.data<float>(), dst.data<float>(), n);
  } else if (src.dtype() == DType::f32) {
    const long long threads_needed = dst.dtype() == DType::f4_e2m1 ? (n + 1) / 2 : n;
    encode_kernel<<<gpu::blocks_for(threads_needed, kThreads), kThreads, 0, stream>>>(
        src.data<float>(), dst.data<uint8_t>(), n, dst.dtype());
  } else {
    decode_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, stream>>>(src.data<uint8_t>(), dst.data<float>(), n,
                                                                         src.dtype());
  }
  gpu::check_launch("cast_cuda");
}

}  // namespace dsv4::kernels
