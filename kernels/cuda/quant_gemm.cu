// CUDA (and, through port.h, HIP) implementation of kernels/quant_gemm.h: the FP8 activation
// quantization, the FP8 x FP8 and FP8 x FP4 block-scaled GEMMs, and linear_fp8's FP8 path (the
// activations quantized into stream-ordered scratch, then the GEMM; no host round trip).
//
// Numerics: bit for bit the host kernels (kernels/host/quant_gemm.cpp).
//   act quant: the block's amax is a max (exact, any order); the scale and codes use formats.h's
//              shared DSV4_HD conversions and a correctly rounded division.
//   GEMMs    : every output element belongs to one thread, which walks K in ascending order: per
//              K-block a partial sum from 0 in fp32 (ascending k), then acc += partial * (s_a * s_w)
//              with explicitly rounded multiplies and add (never contracted into an FMA). Inside a
//              block the products e4m3·e4m3 and e4m3·e2m1 are exact in fp32, so fmaf(a, w, p)
//              rounds exactly like the host's p + a·w. The tile shape only decides which thread
//              owns an element, never the order, so both tile configurations give the same bits.
// (Fault fp8-round-half-up is a host-only software-conversion fault: device code never applies it.)
//
// The FP8 x FP8 GEMM has a second, fast path on CUDA: cuBLASLt's Hopper block scaling
// (kernels/cuda/fp8_gemm_cublaslt.h), taken by gemm_fp8_block_scaled and linear_fp8 when the
// process-wide switch says cublaslt (DSV4_FP8_GEMM, the default on CUDA) and the problem fits; the
// kernel here stays the fallback and the path that is bitwise equal to the host (DSV4_FP8_GEMM=portable).
// HIP builds have only this kernel.
#include "kernels/quant_gemm.h"
#include "kernels/cuda/port.h"

#include <cstdint>

#include "engine/core/formats.h"
#if !defined(__HIPCC__)
#include "kernels/cuda/fp8_gemm_cublaslt.h"
#define DSV4_FP8_GEMM_CUBLASLT 1
#endif

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileK = 32;  // K columns staged in shared memory per step (clipped to the K-block)

// Element i (already row-offset) of a bf16 or f32 matrix, as f32.
__device__ inline float load_act(const void* x, bool bf16, long long i) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

// ---- FP8 activation quantization ----------------------------------------------------------------
// One warp (wavefront) per (token, block) item; its lanes stride across the block's columns.
__global__ void __launch_bounds__(kThreads)
    act_quant_fp8_kernel(const void* x, bool x_bf16, long long x_ld, long long T, long long nb, int block,
                         uint8_t* q, long long q_ld, uint8_t* scales) {
  const int warps = static_cast<int>(blockDim.x) / gpu::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % gpu::kWarpSize;
  const long long item = static_cast<long long>(blockIdx.x) * warps + static_cast<long long>(threadIdx.x) / gpu::kWarpSize;
  if (item >= T * nb) return;  // uniform across the warp: the shuffles below see every lane
  const long long t = item / nb;
  const long long b = item % nb;
  const long long x0 = t * x_ld + b * block;
  float amax = 0.0f;
  for (int k = lane; k < block; k += gpu::kWarpSize) {
    const float a = fabsf(load_act(x, x_bf16, x0 + k));
    amax = amax < a ? a : amax;  // std::max's rule: a NaN never replaces the running max
  }
  amax = gpu::warp_max(amax);  // no NaN left, so the max is exact in any order
  const float clamped = amax < 1e-4f ? 1e-4f : amax;
  const uint8_t code = f32_to_ue8m0_ceil(__fmul_rn(clamped, 1.0f / 448.0f));
  const float s = ue8m0_to_f32(code);
  if (lane == 0) scales[t * nb + b] = code;
  uint8_t* qrow = q + t * q_ld + b * block;
  for (int k = lane; k < block; k += gpu::kWarpSize) {
    const float v = __fdiv_rn(load_act(x, x_bf16, x0 + k), s);
    const float c = v < -448.0f ? -448.0f : (448.0f < v ? 448.0f : v);  // std::clamp (NaN passes)
    qrow[k] = f32_to_e4m3fn(c);
  }
}

void launch_act_quant(const void* x, bool x_bf16, long long x_ld, long long T, long long K, int block, uint8_t* q,
                      long long q_ld, uint8_t* scales, gpu::Stream stream) {
  const long long nb = K / block;
  const long long items = T * nb;
  if (items == 0) return;
  const int per_block = kThreads / gpu::kWarpSize;
  act_quant_fp8_kernel<<<gpu::blocks_for(items, per_block), kThreads, 0, stream>>>(x, x_bf16, x_ld, T, nb, block, q,
                                                                                    q_ld, scales);
  gpu::check_launch("act_quant_fp8");
}

// ---- the block-scaled GEMM ----------------------------------------------------------------------
enum class WeightFormat { e4m3, e2m1 };

struct GemmArgs {
  const uint8_t* qa;   // [T, K] e4m3, rows lda apart
  long long lda;
  const uint8_t* sa;   // [T, na] ue8m0
  long long na;        // activation scale blocks per row (K / act_block)
  long long act_block;
  const uint8_t* w;    // e4m3 [N, K] or packed e2m1 [N, K / 2], contiguous
  const uint8_t* sw;   // ue8m0, row n / w_row_block, column kb
  long long nw;        // weight scale columns (K / kblk)
  long long w_row_block;
  long long kblk;      // the K-block of one partial sum (and one weight scale)
  uint16_t* out;       // [T, N] bf16, rows ldo apart
  long long ldo;
  long long T, N, K;
};

template <WeightFormat F>
__device__ inline float load_weight(const uint8_t* w, long long K, long long n, long long k) {
  if constexpr (F == WeightFormat::e4m3) {
    return e4m3fn_to_f32(w[n * K + k]);
  } else {
    const uint8_t byte = w[n * (K / 2) + k / 2];  // low nibble = even k
    return e2m1_to_f32(static_cast<uint8_t>((k & 1) != 0 ? byte >> 4 : byte & 0xF));
  }
}

// Block (blockIdx.y, blockIdx.x) computes out rows [BM·y, +BM) x columns [BN·x, +BN); thread
// (ty, tx) owns rows ty + TY·i (i < TM) and columns tx + TX·j (j < TN).
template <int BM, int BN, int TM, int TN, WeightFormat F>
__global__ void __launch_bounds__(kThreads) gemm_block_scaled_kernel(GemmArgs g) {
  constexpr int TX = BN / TN;
  constexpr int TY = BM / TM;
  static_assert(TX * TY == kThreads, "one thread per TM x TN micro-tile");
  __shared__ float a_tile[kTileK][BM + 1];  // [k][row]: +1 keeps the transposed stores conflict-free
  __shared__ float w_tile[kTileK][BN + 1];  // [k][column]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const long long m0 = static_cast<long long>(blockIdx.y) * BM;
  const long long n0 = static_cast<long long>(blockIdx.x) * BN;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }
  const long long nkb = g.K / g.kblk;
  for (long long kb = 0; kb < nkb; ++kb) {
    float part[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) part[i][j] = 0.0f;
    }
    const long long kb_end = (kb + 1) * g.kblk;
    for (long long k0 = kb * g.kblk; k0 < kb_end; k0 += kTileK) {
      const int len = static_cast<int>(kb_end - k0 < kTileK ? kb_end - k0 : kTileK);
      for (int e = tid; e < BM * kTileK; e += kThreads) {
        const int r = e / kTileK, kk = e % kTileK;
        const long long t = m0 + r;
        a_tile[kk][r] = (t < g.T && kk < len) ? e4m3fn_to_f32(g.qa[t * g.lda + k0 + kk]) : 0.0f;
      }
      for (int e = tid; e < BN * kTileK; e += kThreads) {
        const int c = e / kTileK, kk = e % kTileK;
        const long long n = n0 + c;
        w_tile[kk][c] = (n < g.N && kk < len) ? load_weight<F>(g.w, g.K, n, k0 + kk) : 0.0f;
      }
      __syncthreads();
      for (int kk = 0; kk < len; ++kk) {  // ascending k
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][ty + TY * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = w_tile[kk][tx + TX * j];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) part[i][j] = fmaf(a[i], b[j], part[i][j]);  // exact products
        }
      }
      __syncthreads();
    }
    // Scale, then accumulate: acc += partial * (s_a * s_w), each step rounded on its own.
    const long long ka = (kb * g.kblk) / g.act_block;  // the activation block holding this K-block
    float s_act[TM], s_w[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const long long t = m0 + ty + TY * i;
      s_act[i] = t < g.T ? ue8m0_to_f32(g.sa[t * g.na + ka]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const long long n = n0 + tx + TX * j;
      s_w[j] = n < g.N ? ue8m0_to_f32(g.sw[(n / g.w_row_block) * g.nw + kb]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(part[i][j], __fmul_rn(s_act[i], s_w[j])));
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const long long t = m0 + ty + TY * i;
    if (t >= g.T) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const long long n = n0 + tx + TX * j;
      if (n < g.N) g.out[t * g.ldo + n] = f32_to_bf16(acc[i][j]);
    }
  }
}

template <int BM, int BN, int TM, int TN, WeightFormat F>
void launch_gemm_tiles(const GemmArgs& g, gpu::Stream stream, const char* op) {
  const dim3 grid(static_cast<unsigned>((g.N + BN - 1) / BN), static_cast<unsigned>((g.T + BM - 1) / BM));
  gemm_block_scaled_kernel<BM, BN, TM, TN, F><<<grid, kThreads, 0, stream>>>(g);
  gpu::check_launch(op);
}

// Few tokens (decode): 8-row tiles 128 columns wide; otherwise 64 x 64 tiles.
template <WeightFormat F>
void launch_gemm(const GemmArgs& g, gpu::Stream stream, const char* op) {
  if (g.T == 0 || g.N == 0) return;
  if (g.T <= 16) {
    launch_gemm_tiles<8, 128, 1, 4, F>(g, stream, op);
  } else {
    launch_gemm_tiles<64, 64, 4, 4, F>(g, stream, op);
  }
}

bool is_bf16(const Tensor& x) { return x.dtype() == DType::bf16; }

}  // namespace

void act_quant_fp8(const Tensor& x, int64_t block, Tensor& q, Tensor& scales, void* stream) {
  launch_act_quant(x.data_ptr(), is_bf16(x), x.stride(0), x.size(0), x.size(1), static_cast<int>(block),
                   q.data<uint8_t>(), q.stride(0), scales.data<uint8_t>(), static_cast<gpu::Stream>(stream));
}

void gemm_fp8_block_scaled(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, int64_t block, void* stream) {
  const int64_t K = q_act.size(1);
#if defined(DSV4_FP8_GEMM_CUBLASLT)
  if (fp8_gemm_path() == Fp8GemmPath::cublaslt) {
    Fp8GemmLtProblem p;
    p.qa = q_act.data<uint8_t>();
    p.lda = q_act.stride(0);
    p.qa_rows = q_act.size(0);
    p.sa = act_scales.data<uint8_t>();
    p.sa_ld = K / block;
    p.w = w.data<uint8_t>();
    p.sw = w_scales.data<uint8_t>();
    p.out = out.data<uint16_t>();
    p.ldo = out.stride(0);
    p.T = q_act.size(0);
    p.N = w.size(0);
    p.K = K;
    if (fp8_gemm_cublaslt_fits(p, block) && fp8_gemm_cublaslt(p, stream)) return;
  }
#endif
  GemmArgs g{q_act.data<uint8_t>(), q_act.stride(0), act_scales.data<uint8_t>(), K / block, block,
             w.data<uint8_t>(), w_scales.data<uint8_t>(), K / block, block, block,
             out.data<uint16_t>(), out.stride(0), q_act.size(0), w.size(0), K};
  launch_gemm<WeightFormat::e4m3>(g, static_cast<gpu::Stream>(stream), "gemm_fp8_block_scaled");
}

void gemm_fp4_weights(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                      Tensor& out, int64_t act_block, int64_t w_block, void* stream) {
  const int64_t K = q_act.size(1);
  GemmArgs g{q_act.data<uint8_t>(), q_act.stride(0), act_scales.data<uint8_t>(), K / act_block, act_block,
             w.data<uint8_t>(), w_scales.data<uint8_t>(), K / w_block, 1, w_block,
             out.data<uint16_t>(), out.stride(0), q_act.size(0), w.size(0), K};
  launch_gemm<WeightFormat::e2m1>(g, static_cast<gpu::Stream>(stream), "gemm_fp4_weights");
}

void linear_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out, int64_t block, void* stream_ptr) {
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = w.size(0);
  if (T == 0 || N == 0) return;
  auto stream = static_cast<gpu::Stream>(stream_ptr);
#if defined(DSV4_FP8_GEMM_CUBLASLT)
  if (fp8_gemm_path() == Fp8GemmPath::cublaslt) {
    // cuBLASLt reads the activations in row blocks of 4: quantize into scratch of T rounded up to 4
    // rows, the padding rows zero, so it reads them in place.
    const int64_t rows = (T + 3) / 4 * 4;
    gpu::Scratch q(static_cast<size_t>(rows * K), stream);
    gpu::Scratch s(static_cast<size_t>(T * (K / block)), stream);
    Fp8GemmLtProblem p;
    p.qa = q.as<uint8_t>();
    p.lda = K;
    p.qa_rows = rows;
    p.sa = s.as<uint8_t>();
    p.sa_ld = K / block;
    p.w = w.data<uint8_t>();
    p.sw = w_scale.data<uint8_t>();
    p.out = out.data<uint16_t>();
    p.ldo = out.stride(0);
    p.T = T;
    p.N = N;
    p.K = K;
    if (fp8_gemm_cublaslt_fits(p, block)) {
      if (rows > T) gpu::check(cudaMemsetAsync(q.as<uint8_t>() + T * K, 0, static_cast<size_t>((rows - T) * K), stream), "cudaMemsetAsync (linear_fp8 padding)");
      launch_act_quant(x.data_ptr(), is_bf16(x), x.stride(0), T, K, static_cast<int>(block), q.as<uint8_t>(), K,
                       s.as<uint8_t>(), stream);
      if (fp8_gemm_cublaslt(p, stream)) return;
      // No algorithm: the portable kernel on the same quantized activations.
      GemmArgs g{q.as<uint8_t>(), K, s.as<uint8_t>(), K / block, block,
                 w.data<uint8_t>(), w_scale.data<uint8_t>(), K / block, block, block,
                 out.data<uint16_t>(), out.stride(0), T, N, K};
      launch_gemm<WeightFormat::e4m3>(g, stream, "linear_fp8");
      return;
    }
  }
#endif
  // The quantized activations live only between the two launches: stream-ordered scratch.
  gpu::Scratch q(static_cast<size_t>(T * K), stream);
  gpu::Scratch s(static_cast<size_t>(T * (K / block)), stream);
  launch_act_quant(x.data_ptr(), is_bf16(x), x.stride(0), T, K, static_cast<int>(block), q.as<uint8_t>(), K,
                   s.as<uint8_t>(), stream);
  GemmArgs g{q.as<uint8_t>(), K, s.as<uint8_t>(), K / block, block,
             w.data<uint8_t>(), w_scale.data<uint8_t>(), K / block, block, block,
             out.data<uint16_t>(), out.stride(0), T, N, K};
  launch_gemm<WeightFormat::e4m3>(g, stream, "linear_fp8");
}

}  // namespace dsv4::kernels::cuda
