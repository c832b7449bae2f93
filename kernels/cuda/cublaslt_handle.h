// The process's cuBLASLt handle per device, shared by the FP8 (fp8_gemm_cublaslt.cu) and the bf16
// (dense_gemm_cublaslt.cu) GEMM paths. CUDA only.
#pragma once

#include <cublasLt.h>

namespace dsv4::kernels::cuda {

// Created at the first call for `device` and never destroyed (handles outlive static destruction).
// Throws std::runtime_error when cublasLtCreate fails.
cublasLtHandle_t cublaslt_handle(int device);

}  // namespace dsv4::kernels::cuda
