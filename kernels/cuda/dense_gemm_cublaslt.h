// The fast bf16 GEMM: cuBLASLt on the tensor cores (bf16 x bf16 products, f32 accumulation), behind
// the entry points of the plain GEMM (kernels/cuda/dense_gemm.cu: moe_gate_logits, the bf16-weight
// linear_fp8 / linear_projection, grouped_wo_a), which the engine runs for the MoE gate, the
// compressors' and the indexer's projections, the grouped output projection and the head. CUDA only:
// HIP builds never include this header and always run the plain kernel.
//
// The switch (process-wide): DSV4_DENSE_GEMM=portable|cublaslt, read once at the first such GEMM
// (default portable); set_dense_gemm_path overrides it (tests, benchmarks). Any other value of the
// variable is refused (an InputError naming it at the first GEMM).
//   portable : dense_gemm.cu's kernel, bit for bit the host (one f32 chain per output in k order,
//              every product and sum rounded on its own).
//   cublaslt : this file where the problem fits (both operands bf16; rows, strides and pointers
//              16-byte aligned), the plain kernel otherwise. Not bitwise with the host: the products
//              are exact in f32 but summed in the tensor cores' order; tests/gpu/test_kernels_gemm.cu
//              bounds the difference.
//
// Layout handed to cuBLASLt (column-major, TN, one batch per output group): A = the weight, K x N with
// ld K, op(A) = A^T, batches N·K apart; B = the activations, K x T with ld = their row stride,
// batches K apart; D = f32 or bf16 N x T with ld = out's row stride, batches N apart: the row-major
// [T, groups·N] output. The algorithm is the heuristic's first, chosen once per shape and cached, so
// reruns and graph replays of a shape give the same bits; the workspace is stream-ordered scratch, so
// a launch is capturable.
#pragma once

#include <cstdint>

#include "kernels/cuda/path_switch.h"

namespace dsv4::kernels::cuda {

enum class DenseGemmPath : int { portable = 0, cublaslt = 1 };

DenseGemmPath dense_gemm_path();
void set_dense_gemm_path(DenseGemmPath path);
const char* dense_gemm_path_name(DenseGemmPath path);

// Sets the path for its lifetime (tests, benchmarks); restores the previous one.
using DenseGemmPathScope = PathScope<DenseGemmPath, dense_gemm_path, set_dense_gemm_path>;

// groups GEMMs: out[t, g·N + n] = Σ_k x[t, g·K + k] · w[g·N + n, k] (x rows ldx apart, out rows ldo
// apart, w contiguous), bf16 operands, an f32 or a bf16 output.
struct DenseLtProblem {
  const uint16_t* x = nullptr;
  long long ldx = 0;
  const uint16_t* w = nullptr;
  void* out = nullptr;
  bool out_bf16 = false;
  long long ldo = 0;
  long long T = 0, N = 0, K = 0;
  int groups = 1;
};

// Enqueues the GEMMs on `stream` (a cudaStream_t) and returns true, or returns false having enqueued
// nothing when the problem does not fit or cuBLASLt has no algorithm for it (the caller then runs the
// plain kernel). Throws std::runtime_error when a CUDA or cuBLASLt call fails.
bool dense_gemm_cublaslt(const DenseLtProblem& p, void* stream);

// How many GEMMs this process has enqueued through cuBLASLt (tests and benchmarks check the path).
uint64_t dense_gemm_cublaslt_calls();

}  // namespace dsv4::kernels::cuda
