// The fast FP8 x FP8 block-scaled GEMM: cuBLASLt's Hopper block scaling (CUDA 12.9+, sm_90:
// CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F for the 128 x 128 weight scales,
// CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F for the 1 x 128 activation scales), behind the same entry
// points as the portable kernel (kernels/quant_gemm.h: gemm_fp8_block_scaled, linear_fp8 and
// linear_projection's FP8 path). CUDA only: HIP builds never include this header (quant_gemm.cu
// guards it with !defined(__HIPCC__)) and always run the portable kernel.
//
// The switch (process-wide): the environment variable DSV4_FP8_GEMM=portable|cublaslt, read once at
// the first FP8 GEMM (default portable); set_fp8_gemm_path overrides it (tests, benchmarks). Any
// other value of the variable is refused (an InputError naming it at the first GEMM).
//   portable : kernels/cuda/quant_gemm.cu's kernel, bit for bit the host kernel (every output element
//              summed by one thread in the host's order).
//   cublaslt : this file wherever the problem fits (block 128, K % 128 == 0, an sm_90 device, and
//              cuBLASLt returning an algorithm), the portable kernel otherwise. Not bitwise with the
//              host: the tensor cores sum each 128-deep K-block in their own order (products exact,
//              the partial sums rounded differently), then scale and accumulate in fp32 as the host
//              does. tests/gpu/test_kernels_gemm.cu bounds the difference (see there).
//
// Layout handed to cuBLASLt (column-major, TN): A = the weight, K x N with ld K, op(A) = A^T; B = the
// activations, K x M with ld = their row stride; D = bf16 N x M with ld = out's row stride, i.e. the
// row-major [T, N] output. The ue8m0 scales are widened to f32 by one small kernel into stream-ordered
// scratch: the weight's as [ceil(N / 128)][round_up(K / 128, 4)] (the 128x128 mode's K-block index
// fastest, its leading dimension a multiple of 4), the activations' as [K / 128][M] (the 1x128 mode's
// "outer-dimension-major" layout: token fastest). M is the token count rounded up to a multiple of 4
// (16-byte rows of the activation scales): when T is not, the activations are staged in padded
// scratch (zero rows) and the output goes through scratch too; so does an output whose row stride or
// address is not 16-byte aligned.
//
// Determinism: the algorithm is chosen once per problem shape (M, N, K, strides) and cached, so
// reruns and graph replays of one shape give the same bits. Launches are stream-ordered and
// capturable (no synchronization; scratch and workspace from cudaMallocAsync).
#pragma once

#include <cstdint>

#include "kernels/cuda/path_switch.h"

namespace dsv4::kernels::cuda {

enum class Fp8GemmPath : int { portable = 0, cublaslt = 1 };

// The path the FP8 entry points take now (the environment's at first use, or the last set).
Fp8GemmPath fp8_gemm_path();
void set_fp8_gemm_path(Fp8GemmPath path);
const char* fp8_gemm_path_name(Fp8GemmPath path);

// Sets the path for its lifetime (tests, benchmarks); restores the previous one.
using Fp8GemmPathScope = PathScope<Fp8GemmPath, fp8_gemm_path, set_fp8_gemm_path>;

// One problem: out [T, N] bf16 = qa [T, K] e4m3 · w [N, K]^T with 1 x 128 activation scales sa
// [T, K / 128] ue8m0 (rows sa_ld apart) and 128 x 128 weight scales sw [ceil(N / 128), K / 128]
// ue8m0 (contiguous). `qa_rows` is how many rows of qa may be read (>= T): when it covers T rounded up
// to 4, the padding rows are read in place (their products land only in output rows that are never
// stored), else qa is staged into padded scratch.
struct Fp8GemmLtProblem {
  const uint8_t* qa = nullptr;
  long long lda = 0;
  long long qa_rows = 0;
  const uint8_t* sa = nullptr;
  long long sa_ld = 0;
  const uint8_t* w = nullptr;
  const uint8_t* sw = nullptr;
  uint16_t* out = nullptr;
  long long ldo = 0;
  long long T = 0, N = 0, K = 0;
};

// Whether the cuBLASLt path may take the problem at all (block 128, K a multiple of 128 and of 16
// bytes, 16-byte aligned weight and activation rows, a device of compute capability 9.0).
bool fp8_gemm_cublaslt_fits(const Fp8GemmLtProblem& p, int64_t block);

// Enqueues the GEMM on `stream` (a cudaStream_t). Returns false, having enqueued no kernel (only a
// stream-ordered scratch allocation and its release), when cuBLASLt has no algorithm for the problem:
// the caller then runs the portable kernel. Throws std::runtime_error when a CUDA or cuBLASLt call
// fails.
bool fp8_gemm_cublaslt(const Fp8GemmLtProblem& p, void* stream);

// Autotuning (off by default; DSV4_FP8_GEMM_TUNE=1 or set_fp8_gemm_autotune): for problems of 512 or
// more tokens issued outside a graph capture, the first call of a shape times the heuristic's first
// eight algorithms on its own operands (synchronizing the stream) and keeps the fastest for the
// process. Off, the heuristic's first algorithm is used: the same choice, hence the same bits, in
// every process on the same GPU and library; on, the choice can differ between processes.
bool fp8_gemm_autotune();
void set_fp8_gemm_autotune(bool on);

// How many GEMMs this process has enqueued through cuBLASLt (tests and benchmarks check which path ran).
uint64_t fp8_gemm_cublaslt_calls();

}  // namespace dsv4::kernels::cuda
