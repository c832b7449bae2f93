// CUDA (and, through port.h, HIP) implementation of kernels/int8_gemm.h: the per-token int8
// activation quantization, the int8 x int8 GEMM with per-token and per-channel scales, and
// linear_projection's int8 path (the activations quantized into stream-ordered scratch, then the
// GEMM; no host round trip).
//
// Numerics: bit for bit the host kernels (kernels/host/int8_gemm.cpp).
//   quantization: the row's amax and its "all finite" flag are a max (exact in any order); the
//                 scale, reciprocal and codes follow the row rule with correctly rounded divides and
//                 multiplies and rintf (round half to even).
//   GEMM        : the int32 accumulation is exact (K <= kInt8MaxK), so its order is free; then
//                 bf16((f32(acc) * s_a[t]) * s_w[n]) with two separately rounded multiplies.
#include "kernels/int8_gemm.h"
#include "kernels/cuda/port.h"

#include <cstdint>

#include "engine/core/formats.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileK = 32;  // K columns staged in shared memory per step

// ---- per-token quantization: one thread block per token ---------------------------------------
__global__ void __launch_bounds__(kThreads)
    act_quant_int8_kernel(const void* x, bool x_bf16, long long x_ld, long long K, int8_t* q, long long q_ld,
                          float* scales) {
  __shared__ float red[gpu::kMaxWarps];
  const long long t = blockIdx.x;
  const long long x0 = t * x_ld;
  auto load = [&](long long k) {
    return x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[x0 + k]) : static_cast<const float*>(x)[x0 + k];
  };
  float amax = 0.0f;
  float non_finite = 0.0f;
  for (long long k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = load(k);
    if (!isfinite(v)) non_finite = 1.0f;
    const float a = fabsf(v);
    amax = amax < a ? a : amax;  // std::max's rule: a NaN never replaces the running max
  }
  non_finite = gpu::block_max(non_finite, red);
  amax = gpu::block_max(amax, red);
  int8_t* qrow = q + t * q_ld;
  if (non_finite != 0.0f) {  // the row's outputs become NaN through its scale
    for (long long k = threadIdx.x; k < K; k += blockDim.x) qrow[k] = 0;
    if (threadIdx.x == 0) scales[t] = f32_from_bits(0x7FC00000u);  // std::numeric_limits<float>::quiet_NaN()
    return;
  }
  amax = amax < kInt8AmaxFloor ? kInt8AmaxFloor : amax;
  const float inv = __fdiv_rn(127.0f, amax);
  for (long long k = threadIdx.x; k < K; k += blockDim.x) {
    const float r = rintf(__fmul_rn(load(k), inv));
    qrow[k] = static_cast<int8_t>(r < -127.0f ? -127.0f : (127.0f < r ? 127.0f : r));
  }
  if (threadIdx.x == 0) scales[t] = __fdiv_rn(amax, 127.0f);
}

void launch_act_quant(const void* x, bool x_bf16, long long x_ld, long long T, long long K, int8_t* q, long long q_ld,
                      float* scales, gpu::Stream stream) {
  if (T == 0) return;
  act_quant_int8_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(x, x_bf16, x_ld, K, q, q_ld, scales);
  gpu::check_launch("act_quant_int8");
}

// ---- the GEMM ----------------------------------------------------------------------------------
struct GemmArgs {
  const int8_t* qa;  // [T, K], rows lda apart
  long long lda;
  const float* sa;   // [T]
  const int8_t* w;   // [N, K] contiguous
  const float* sw;   // [N]
  uint16_t* out;     // [T, N] bf16, rows ldo apart
  long long ldo;
  long long T, N, K;
};

// Block (blockIdx.y, blockIdx.x) computes out rows [BM·y, +BM) x columns [BN·x, +BN); thread
// (ty, tx) owns rows ty + TY·i (i < TM) and columns tx + TX·j (j < TN).
template <int BM, int BN, int TM, int TN>
__global__ void __launch_bounds__(kThreads) gemm_int8_kernel(GemmArgs g) {
  constexpr int TX = BN / TN;
  constexpr int TY = BM / TM;
  static_assert(TX * TY == kThreads, "one thread per TM x TN micro-tile");
  __shared__ int a_tile[kTileK][BM + 1];  // [k][row]
  __shared__ int w_tile[kTileK][BN + 1];  // [k][column]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const long long m0 = static_cast<long long>(blockIdx.y) * BM;
  const long long n0 = static_cast<long long>(blockIdx.x) * BN;

  int acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0;
  }
  for (long long k0 = 0; k0 < g.K; k0 += kTileK) {
    const int len = static_cast<int>(g.K - k0 < kTileK ? g.K - k0 : kTileK);
    for (int e = tid; e < BM * kTileK; e += kThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const long long t = m0 + r;
      a_tile[kk][r] = (t < g.T && kk < len) ? static_cast<int>(g.qa[t * g.lda + k0 + kk]) : 0;
    }
    for (int e = tid; e < BN * kTileK; e += kThreads) {
      const int c = e / kTileK, kk = e % kTileK;
      const long long n = n0 + c;
      w_tile[kk][c] = (n < g.N && kk < len) ? static_cast<int>(g.w[n * g.K + k0 + kk]) : 0;
    }
    __syncthreads();
    for (int kk = 0; kk < len; ++kk) {
      int a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][ty + TY * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = w_tile[kk][tx + TX * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];  // exact: |acc| <= K · 128² < 2^31
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const long long t = m0 + ty + TY * i;
    if (t >= g.T) continue;
    const float s_act = g.sa[t];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const long long n = n0 + tx + TX * j;
      if (n >= g.N) continue;
      const float scaled = __fmul_rn(static_cast<float>(acc[i][j]), s_act);  // int -> f32 rounds to nearest even
      g.out[t * g.ldo + n] = f32_to_bf16(__fmul_rn(scaled, g.sw[n]));
    }
  }
}

template <int BM, int BN, int TM, int TN>
void launch_gemm_tiles(const GemmArgs& g, gpu::Stream stream, const char* op) {
  const dim3 grid(static_cast<unsigned>((g.N + BN - 1) / BN), static_cast<unsigned>((g.T + BM - 1) / BM));
  gemm_int8_kernel<BM, BN, TM, TN><<<grid, kThreads, 0, stream>>>(g);
  gpu::check_launch(op);
}

// Few tokens (decode): 8-row tiles 128 columns wide; otherwise 64 x 64 tiles.
void launch_gemm(const GemmArgs& g, gpu::Stream stream, const char* op) {
  if (g.T == 0 || g.N == 0) return;
  if (g.T <= 16) {
    launch_gemm_tiles<8, 128, 1, 4>(g, stream, op);
  } else {
    launch_gemm_tiles<64, 64, 4, 4>(g, stream, op);
  }
}

}  // namespace

void act_quant_int8(const Tensor& x, Tensor& q, Tensor& scales, void* stream) {
  launch_act_quant(x.data_ptr(), x.dtype() == DType::bf16, x.stride(0), x.size(0), x.size(1), q.data<int8_t>(),
                   q.stride(0), scales.data<float>(), static_cast<gpu::Stream>(stream));
}

void gemm_int8_per_channel(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, void* stream) {
  const GemmArgs g{q_act.data<int8_t>(), q_act.stride(0), act_scales.data<float>(), w.data<int8_t>(),
                   w_scales.data<float>(), out.data<uint16_t>(), out.stride(0), q_act.size(0), w.size(0),
                   q_act.size(1)};
  launch_gemm(g, static_cast<gpu::Stream>(stream), "gemm_int8_per_channel");
}

void linear_int8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out, void* stream_ptr) {
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = w.size(0);
  if (T == 0 || N == 0) return;
  auto stream = static_cast<gpu::Stream>(stream_ptr);
  // The quantized activations live only between the two launches: stream-ordered scratch.
  gpu::Scratch q(static_cast<size_t>(T * K), stream);
  gpu::Scratch s(static_cast<size_t>(T) * sizeof(float), stream);
  launch_act_quant(x.data_ptr(), x.dtype() == DType::bf16, x.stride(0), T, K, q.as<int8_t>(), K, s.as<float>(), stream);
  const GemmArgs g{q.as<int8_t>(), K, s.as<float>(), w.data<int8_t>(), w_scale.data<float>(), out.data<uint16_t>(),
                   out.stride(0), T, N, K};
  launch_gemm(g, stream, "linear_projection");
}

}  // namespace dsv4::kernels::cuda
