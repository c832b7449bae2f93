// Warp-level tensor-core primitives (mma.sync, ldmatrix) shared by the tensor-core paths
// (sparse_attention_tc.cu, moe.cu's small-batch fp4 kernel). CUDA only, sm_80 and later: below that
// the device code traps, and the hosts never select those paths there.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/port.h"

namespace dsv4::kernels::cuda {

// Whether `kernel` (one using these wrappers) runs its mma.sync on the current device: compute
// capability 8.0 or later, and code of sm_80 or later for it in the binary (not the trap below).
inline bool mma_runs(const void* kernel) {
  int device = 0, major = 0;
  gpu::check(cudaGetDevice(&device), "cudaGetDevice");
  gpu::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  cudaFuncAttributes attributes{};
  gpu::check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  return major >= 8 && attributes.ptxVersion >= 80 && attributes.binaryVersion >= 80;
}

// D = A B + D for one 16 x 8 tile, k 16: A row-major bf16 (a0: row g, cols 2t..2t+1; a1: row g + 8;
// a2: cols + 8; a3: both), B "col" bf16 (b0: k rows 2t..2t+1 of column g; b1: k rows + 8), D f32
// (d0, d1: row g, cols 2t, 2t+1; d2, d3: row g + 8), with g = lane / 4 and t = lane % 4.
__device__ inline void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                 uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host never selects this path below compute capability 8.0
#endif
}

// ldmatrix: four 8 x 8 bf16 matrices from shared memory, lanes 8i..8i+7 giving the rows of matrix i
// (16 bytes each); r[i] is the lane's pair of matrix i (row lane / 4, columns 2 (lane % 4) and the
// next), or with kTrans its pair of the transposed matrix (rows 2 (lane % 4) and the next, column
// lane / 4).
template <bool kTrans>
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto at = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  }
#else
  (void)r;
  (void)row;
  __trap();
#endif
}

}  // namespace dsv4::kernels::cuda
