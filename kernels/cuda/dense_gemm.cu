// CUDA (and, through port.h, HIP) implementation of the plain fp32-accumulated GEMM out = x · w^T
// behind three entry points: moe_gate_logits (kernels/moe.h: f32 logits; the engine runs the MoE
// gate, the compressor's wkv/wgate and the head through it), the bf16-weight path of linear_fp8 /
// linear_projection (kernels/quant_gemm.h: bf16 output) and grouped_wo_a (kernels/attn_output.h:
// one GEMM per output group, the grid's z dimension, bf16 output). On CUDA a switch sends bf16 x bf16
// problems to cuBLASLt's tensor cores instead (kernels/cuda/dense_gemm_cublaslt.h, DSV4_DENSE_GEMM).
//
// Numerics: bit for bit the host loops. Every output element belongs to one thread, which keeps one
// fp32 accumulator from 0 and walks k in ascending order: acc = acc + x[t, k] · w[n, k], the
// multiply and the add each rounded on their own (__fmul_rn / __fadd_rn are never contracted into
// an FMA, which would differ from the host whenever a product is inexact: f32 inputs, or bf16
// products that underflow). The tile shape only decides which thread owns an element.
#include "kernels/cuda/port.h"
#include "kernels/attn_output.h"
#include "kernels/moe.h"
#include "kernels/quant_gemm.h"

#include <cstdint>

#include "engine/core/formats.h"
#if !defined(__HIPCC__)
#include "kernels/cuda/dense_gemm_cublaslt.h"
#define DSV4_DENSE_GEMM_CUBLASLT 1
#endif

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileK = 32;  // K columns staged in shared memory per step

struct DenseArgs {
  const void* x;  // [T, K] bf16 or f32, rows ldx apart
  bool x_bf16;
  long long ldx;
  const void* w;  // [N, K] bf16 or f32, contiguous
  bool w_bf16;
  void* out;      // [T, N] f32 or bf16, rows ldo apart
  long long ldo;
  long long T, N, K;  // per group: group z reads x columns [K z, + K) and w rows [N z, + N), writes out
                      // columns [N z, + N) (one group: z = 0)
};

__device__ inline float load(const void* p, bool bf16, long long i) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Block (blockIdx.y, blockIdx.x) computes out rows [BM·y, +BM) x columns [BN·x, +BN); thread
// (ty, tx) owns rows ty + TY·i (i < TM) and columns tx + TX·j (j < TN).
template <int BM, int BN, int TM, int TN, bool kOutBf16>
__global__ void __launch_bounds__(kThreads) dense_gemm_kernel(DenseArgs g) {
  constexpr int TX = BN / TN;
  constexpr int TY = BM / TM;
  static_assert(TX * TY == kThreads, "one thread per TM x TN micro-tile");
  __shared__ float x_tile[kTileK][BM + 1];  // [k][row]: +1 keeps the transposed stores conflict-free
  __shared__ float w_tile[kTileK][BN + 1];  // [k][column]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const long long m0 = static_cast<long long>(blockIdx.y) * BM;
  const long long n0 = static_cast<long long>(blockIdx.x) * BN;
  const long long gx = g.K * blockIdx.z, gw = g.N * g.K * blockIdx.z, go = g.N * blockIdx.z;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }
  for (long long k0 = 0; k0 < g.K; k0 += kTileK) {
    const int len = static_cast<int>(g.K - k0 < kTileK ? g.K - k0 : kTileK);
    for (int e = tid; e < BM * kTileK; e += kThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const long long t = m0 + r;
      x_tile[kk][r] = (t < g.T && kk < len) ? load(g.x, g.x_bf16, gx + t * g.ldx + k0 + kk) : 0.0f;
    }
    for (int e = tid; e < BN * kTileK; e += kThreads) {
      const int c = e / kTileK, kk = e % kTileK;
      const long long n = n0 + c;
      w_tile[kk][c] = (n < g.N && kk < len) ? load(g.w, g.w_bf16, gw + n * g.K + k0 + kk) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < len; ++kk) {  // ascending k
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = x_tile[kk][ty + TY * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = w_tile[kk][tx + TX * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(a[i], b[j]));
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const long long t = m0 + ty + TY * i;
    if (t >= g.T) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const long long n = n0 + tx + TX * j;
      if (n >= g.N) continue;
      if constexpr (kOutBf16) {
        static_cast<uint16_t*>(g.out)[go + t * g.ldo + n] = f32_to_bf16(acc[i][j]);
      } else {
        static_cast<float*>(g.out)[go + t * g.ldo + n] = acc[i][j];
      }
    }
  }
}

template <int BM, int BN, int TM, int TN, bool kOutBf16>
void launch_tiles(const DenseArgs& g, int groups, gpu::Stream stream, const char* op) {
  const dim3 grid(static_cast<unsigned>((g.N + BN - 1) / BN), static_cast<unsigned>((g.T + BM - 1) / BM),
                  static_cast<unsigned>(groups));
  dense_gemm_kernel<BM, BN, TM, TN, kOutBf16><<<grid, kThreads, 0, stream>>>(g);
  gpu::check_launch(op);
}

#if defined(DSV4_DENSE_GEMM_CUBLASLT)
// cuBLASLt's tensor-core GEMM when the switch says so and it takes the problem (true: enqueued).
bool try_cublaslt(const DenseArgs& g, bool out_bf16, int groups, gpu::Stream stream) {
  if (dense_gemm_path() != DenseGemmPath::cublaslt || !g.x_bf16 || !g.w_bf16) return false;
  DenseLtProblem p;
  p.x = static_cast<const uint16_t*>(g.x);
  p.ldx = g.ldx;
  p.w = static_cast<const uint16_t*>(g.w);
  p.out = g.out;
  p.out_bf16 = out_bf16;
  p.ldo = g.ldo;
  p.T = g.T;
  p.N = g.N;
  p.K = g.K;
  p.groups = groups;
  return dense_gemm_cublaslt(p, stream);
}
#endif

// cuBLASLt when the switch says so and it takes the problem; else the plain kernel with the tile of
// the most reuse that still fills the GPU: each output is one sequential chain over K, so a grid of
// fewer blocks than SMs leaves SMs idle for the whole GEMM (a decode-sized MoE gate or compressor
// projection). 64 x 64 tiles first, then 8-row tiles 128 wide (1 x 4 per thread), 64 wide (1 x 2)
// and 32 wide (1 x 1), the last one taken whatever its grid.
template <bool kOutBf16>
void launch_dense(const DenseArgs& g, gpu::Stream stream, const char* op, int groups = 1) {
  if (g.T == 0 || g.N == 0) return;
#if defined(DSV4_DENSE_GEMM_CUBLASLT)
  if (try_cublaslt(g, kOutBf16, groups, stream)) return;
#endif
  const long long sms = gpu::sm_count();
  const auto blocks = [&](long long bm, long long bn) {
    return ((g.T + bm - 1) / bm) * ((g.N + bn - 1) / bn) * groups;
  };
  if (g.T > 16 && blocks(64, 64) >= sms) {
    launch_tiles<64, 64, 4, 4, kOutBf16>(g, groups, stream, op);
  } else if (blocks(8, 128) >= sms) {
    launch_tiles<8, 128, 1, 4, kOutBf16>(g, groups, stream, op);
  } else if (blocks(8, 64) >= sms) {
    launch_tiles<8, 64, 1, 2, kOutBf16>(g, groups, stream, op);
  } else {
    launch_tiles<8, 32, 1, 1, kOutBf16>(g, groups, stream, op);
  }
}

DenseArgs dense_args(const Tensor& x, const Tensor& w, Tensor& out) {
  return DenseArgs{x.data_ptr(), x.dtype() == DType::bf16, x.stride(0), w.data_ptr(), w.dtype() == DType::bf16,
                   out.data_ptr(), out.stride(0), x.size(0), w.size(0), x.size(1)};
}

}  // namespace

void moe_gate_logits(const Tensor& x, const Tensor& gate_w, Tensor& logits, void* stream) {
  launch_dense<false>(dense_args(x, gate_w, logits), static_cast<gpu::Stream>(stream), "moe_gate_logits");
}

void linear_bf16(const Tensor& x, const Tensor& w, Tensor& out, void* stream) {
  launch_dense<true>(dense_args(x, w, out), static_cast<gpu::Stream>(stream), "linear_fp8");
}

void grouped_wo_a(const Tensor& o, const Tensor& wo_a, int64_t groups, Tensor& out, void* stream) {
  const int64_t width = o.size(1) / groups;
  const int64_t rank = wo_a.size(0) / groups;
  const DenseArgs g{o.data_ptr(), true, o.stride(0), wo_a.data_ptr(), true, out.data_ptr(), out.stride(0),
                    o.size(0),    rank, width};
  launch_dense<true>(g, static_cast<gpu::Stream>(stream), kGroupedWoAOp, static_cast<int>(groups));
}

}  // namespace dsv4::kernels::cuda
