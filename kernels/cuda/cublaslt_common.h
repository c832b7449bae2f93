// What the cuBLASLt GEMM paths share (fp8_gemm_cublaslt.cu, dense_gemm_cublaslt.cu): the process's
// handle per device, the descriptors of one problem, the alignment promised for an operand and the
// heuristic query. CUDA only.
#pragma once

#include <cublasLt.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dsv4::kernels::cuda {

// Created at the first call for `device` and never destroyed (handles outlive static destruction).
// Throws std::runtime_error when cublasLtCreate fails.
cublasLtHandle_t cublaslt_handle(int device);

// The operation and the A, B and D layouts of one problem (C is D), destroyed with it.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  LtDescs() = default;
  LtDescs(const LtDescs&) = delete;
  LtDescs& operator=(const LtDescs&) = delete;
  ~LtDescs() {
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

// The alignment promised to cuBLASLt for an operand: 256 bytes (its default assumption) when the
// address has it, else 16 (every operand handed to it has at least that). Two classes keep the
// algorithm choice of a shape stable.
inline uint32_t lt_alignment(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 255u) == 0 ? 256u : 16u; }

// The heuristic's best `wanted` algorithms for `ds` within `max_workspace` bytes and the operands'
// alignments (a, b, d), into `results`; returns how many it gave (0: cuBLASLt does not take the
// problem). Throws std::runtime_error when the preference cannot be created.
inline int lt_heuristic(cublasLtHandle_t h, const LtDescs& ds, size_t max_workspace, uint32_t align_a, uint32_t align_b,
                        uint32_t align_d, int wanted, cublasLtMatmulHeuristicResult_t* results) {
  cublasLtMatmulPreference_t pref = nullptr;
  const cublasStatus_t created = cublasLtMatmulPreferenceCreate(&pref);
  if (created != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error("cublasLtMatmulPreferenceCreate failed with cublasStatus " +
                             std::to_string(static_cast<int>(created)));
  }
  cublasStatus_t st =
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d},
  };
  for (const auto& [attr, value] : aligns) {
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value));
  }
  int returned = 0;
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(h, ds.op, ds.a, ds.b, ds.d, ds.d, pref, wanted, results, &returned);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  return st == CUBLAS_STATUS_SUCCESS ? returned : 0;
}

}  // namespace dsv4::kernels::cuda
