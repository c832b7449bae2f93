// A compile check of kernels/cuda/port.h, not a kernel of the engine: it instantiates every warp and
// block collective for the element types the kernels use, and the FP8 encoder, so that the
// `hip-check` preset compiles them for gfx90a (wave64) even where no kernel source uses one yet.
#include "kernels/cuda/port.h"

#include <cstdint>

namespace dsv4::gpu {
namespace {

template <class T>
__device__ T every_warp_collective(T v) {
  T acc = shfl_xor(v, 1, kWarpSize);
  for (int width = 1; width <= kWarpSize; width *= 2) acc = acc + group_sum(v, width) + group_max(v, width);
  return acc + warp_sum(v) + warp_max(v);
}

__global__ void port_check_kernel(float* f, double* d, int* i, unsigned long long* u, uint8_t* q) {
  __shared__ float red[kMaxWarps];
  const unsigned t = threadIdx.x;
  f[t] = every_warp_collective(f[t]);
  d[t] = every_warp_collective(d[t]);
  i[t] = every_warp_collective(i[t]);
  u[t] = every_warp_collective(u[t]);
  f[t] = block_sum(f[t], red) + block_max(f[t], red);
  q[t] = static_cast<uint8_t>(to_e4m3fn(f[t]) ^ e4m3fn_software(f[t]));
}

}  // namespace

void port_check_launch(float* f, double* d, int* i, unsigned long long* u, uint8_t* q, Stream stream) {
  port_check_kernel<<<1, 2 * kWarpSize, 0, stream>>>(f, d, i, u, q);
  check_launch("port_check");
}

}  // namespace dsv4::gpu
