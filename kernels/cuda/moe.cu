// CUDA (and, through port.h, HIP) implementation of kernels/moe.h: the gate, the clamped SwiGLU, the
// combine, and the routed experts (a deterministic routing, activation quantization, grouped GEMMs).
// Every kernel follows the host loop's arithmetic order (kernels/host/moe.cpp, quant_gemm.cpp,
// int8_gemm.cpp), so the results are the host's bit for bit (exp and log1p aside: see moe.h), and
// every reduction has a fixed order, so reruns are bitwise identical.
#include "kernels/moe.h"
#include "kernels/cuda/port.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <map>
#include <mutex>
#include <cstdint>
#include <string>
#include <type_traits>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/int8_gemm.h"
#if !defined(__HIPCC__)
#include "kernels/cuda/mma.h"
#include "kernels/cuda/moe_tc.h"
#define DSV4_MOE_TENSOR_CORE 1
#endif

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;

// ---- arithmetic that must not be contracted or approximated -------------------------------------

// fp32 multiply and add, each rounded on its own (never fused into an FMA).
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }

// e^x in double, rounded once to fp32: the correctly rounded fp32 value but for inputs whose e^x
// lies within ~2^-29 relative of an fp32 rounding boundary (the host's expf is within 0.502 ulp).
__device__ inline float exp_f32(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

// Element i of a bf16 or f32 array, as f32.
__device__ inline float load_f(const void* base, bool bf16, long long i) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

// std::clamp(v, lo, hi) and std::min(v, hi) exactly as libstdc++ evaluates them (NaN passes).
__device__ inline float clamp_like_std(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }
__device__ inline float min_like_std(float v, float hi) { return hi < v ? hi : v; }

// ---- gate ----------------------------------------------------------------------------------------

// The host's sqrt_softplus: max(z, 0) + log1p(e^-|z|) in double, rounded to fp32, an fp32 sqrt.
__device__ inline float sqrt_softplus(float z) {
  const double zd = z;
  const double relu = zd < 0.0 ? 0.0 : zd;  // std::max(zd, 0.0): NaN stays NaN
  const double softplus = relu + log1p(exp(-fabs(zd)));
  return __fsqrt_rn(static_cast<float>(softplus));
}

// Whether candidate (ka, ia) ranks before (kb, ib) in the top-k order: the larger key first, ties to
// the lower index (the host's stable sort), NaN keys after every number, index -1 = no candidate.
// A strict total order on distinct indices, so any reduction order finds the same best.
__device__ inline bool ranks_before(float ka, int ia, float kb, int ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool na = isnan(ka), nb = isnan(kb);
  if (na != nb) return nb;
  if (!na && ka != kb) return ka > kb;
  return ia < ib;
}

// One block per token. Dynamic shared memory: s[E], key[E] floats, taken[E], sel[k] ints.
__global__ void gate_kernel(const float* logits, const float* bias, const int32_t* table, const void* ids, bool ids64,
                            long long ids_stride, long long vocab, int E, int k, float route_scale, int32_t* experts,
                            float* weights) {
  extern __shared__ float gate_smem[];
  float* s = gate_smem;
  float* key = s + E;
  int* taken = reinterpret_cast<int*>(key + E);
  int* sel = taken + E;
  __shared__ float red_key[gpu::kMaxWarps];
  __shared__ int red_idx[gpu::kMaxWarps];
  const long long t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % gpu::kWarpSize, warp = tid / gpu::kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / gpu::kWarpSize;
  const float* z = logits + t * E;
  for (int e = tid; e < E; e += static_cast<int>(blockDim.x)) {
    const float se = sqrt_softplus(z[e]);
    s[e] = se;
    key[e] = se + (bias != nullptr ? bias[e] : 0.0f);  // the bias only selects
    taken[e] = 0;
  }
  __syncthreads();
  if (table != nullptr) {
    // Hash routing: the row of the current token id. A bad id or entry becomes expert -1.
    if (tid == 0) {
      const long long id = ids64 ? static_cast<const int64_t*>(ids)[t * ids_stride]
                                 : static_cast<long long>(static_cast<const int32_t*>(ids)[t * ids_stride]);
      for (int j = 0; j < k; ++j) {
        int e = -1;
        if (id >= 0 && id < vocab) {
          e = table[id * k + j];
          if (e < 0 || e >= E) e = -1;
        }
        sel[j] = e;
      }
    }
  } else {
    // k rounds of a block argmax over the experts not yet taken (k <= E: each round finds one).
    for (int j = 0; j < k; ++j) {
      float bk = 0.0f;
      int bi = -1;
      for (int e = tid; e < E; e += static_cast<int>(blockDim.x)) {
        if (taken[e] == 0 && ranks_before(key[e], e, bk, bi)) {
          bk = key[e];
          bi = e;
        }
      }
      for (int o = gpu::kWarpSize / 2; o > 0; o /= 2) {
        const float ok = gpu::shfl_xor(bk, o, gpu::kWarpSize);
        const int oi = gpu::shfl_xor(bi, o, gpu::kWarpSize);
        if (ranks_before(ok, oi, bk, bi)) {
          bk = ok;
          bi = oi;
        }
      }
      if (lane == 0) {
        red_key[warp] = bk;
        red_idx[warp] = bi;
      }
      __syncthreads();
      if (tid == 0) {
        float ck = red_key[0];
        int ci = red_idx[0];
        for (int w = 1; w < warps; ++w) {
          if (ranks_before(red_key[w], red_idx[w], ck, ci)) {
            ck = red_key[w];
            ci = red_idx[w];
          }
        }
        sel[j] = ci;
        if (ci >= 0) taken[ci] = 1;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (tid == 0) {
    // The weights from s alone, summed in routing order in fp32, as the host does.
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      if (sel[j] >= 0) sum += s[sel[j]];
    }
    for (int j = 0; j < k; ++j) {
      const int e = sel[j];
      experts[t * k + j] = e;
      weights[t * k + j] = e >= 0 ? s[e] / sum * route_scale : 0.0f;
    }
  }
}

// ---- SwiGLU and combine --------------------------------------------------------------------------

// The host's swiglu_clamp element: clamp, silu(g) · u in fp32, then the row weight.
__device__ inline float swiglu_value(float gi, float ui, float limit, bool weighted, float w) {
  if (limit > 0.0f) {
    ui = clamp_like_std(ui, -limit, limit);  // up: both sides
    gi = min_like_std(gi, limit);            // gate: from above only
  }
  float hi = gi / (1.0f + exp_f32(-gi)) * ui;
  if (weighted) hi *= w;
  return hi;
}

__global__ void swiglu_kernel(const void* g, bool g_bf16, long long g_stride, const void* u, bool u_bf16,
                              long long u_stride, const float* row_weight, float limit, uint16_t* h, long long h_stride,
                              long long rows, long long cols) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const long long r = idx / cols, i = idx % cols;
  const float gi = load_f(g, g_bf16, r * g_stride + i);
  const float ui = load_f(u, u_bf16, r * u_stride + i);
  const bool weighted = row_weight != nullptr;
  h[r * h_stride + i] = f32_to_bf16(swiglu_value(gi, ui, limit, weighted, weighted ? row_weight[r] : 1.0f));
}

__global__ void combine_kernel(const void* routed, bool routed_bf16, const void* shared, bool shared_bf16,
                               long long shared_stride, uint16_t* out, long long out_stride, long long T, long long k,
                               long long d) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * d) return;
  const long long t = idx / d, i = idx % d;
  float acc = 0.0f;  // routed in routing order, the shared expert last, one bf16 rounding
  for (long long j = 0; j < k; ++j) acc += load_f(routed, routed_bf16, (t * k + j) * d + i);
  if (shared != nullptr) acc += load_f(shared, shared_bf16, t * shared_stride + i);
  out[t * out_stride + i] = f32_to_bf16(acc);
}

// ---- routed experts: routing ---------------------------------------------------------------------
//
// Slots (t * k + j) are sorted by expert, ascending slot within an expert, by a counting sort in
// three kernels: per chunk of kChunk slots a histogram and each slot's rank among the chunk's
// earlier slots of its expert; per expert the chunks' exclusive prefix and the experts' offsets;
// then each slot's place. order[p] is the slot of gathered row p; expert e owns rows
// [offsets[e], offsets[e + 1]) and GEMM row tiles [tile_start[e], tile_start[e + 1]).

constexpr int kChunk = 256;  // slots per routing chunk (= the block size of the routing kernels)
constexpr int kBM = 64;      // GEMM tile rows (gathered rows of one expert)
constexpr int kBN = 64;      // GEMM tile columns
constexpr int kMaxKs = 32;   // K elements per shared-memory stage, at most
constexpr int kPitch = kMaxKs + 1;  // padded rows of the shared tiles (no bank conflicts)

__global__ void route_count_kernel(const int32_t* ex, int R, int E, int* hist, int* rank) {
  extern __shared__ int route_smem[];
  int* cnt = route_smem;        // [E]
  int* chunk_e = cnt + E;       // [kChunk]
  const int tid = static_cast<int>(threadIdx.x);
  const int c = static_cast<int>(blockIdx.x);
  const int i = c * kChunk + tid;
  for (int e = tid; e < E; e += kChunk) cnt[e] = 0;
  int e = -1;
  if (i < R) {
    e = ex[i];
    if (e < 0 || e >= E) e = -1;
  }
  chunk_e[tid] = e;
  __syncthreads();
  if (e >= 0) {
    atomicAdd(&cnt[e], 1);  // an integer count: the same total in any order
    int r = 0;
    for (int j = 0; j < tid; ++j) r += chunk_e[j] == e ? 1 : 0;
    rank[i] = r;
  }
  __syncthreads();
  for (int x = tid; x < E; x += kChunk) hist[static_cast<long long>(c) * E + x] = cnt[x];
}

__global__ void route_offsets_kernel(int* hist, int chunks, int E, int* offsets, int* tile_start) {
  extern __shared__ int route_smem[];
  int* cnt = route_smem;  // [E]
  const int tid = static_cast<int>(threadIdx.x);
  for (int e = tid; e < E; e += static_cast<int>(blockDim.x)) {
    int run = 0;
    for (int c = 0; c < chunks; ++c) {
      const long long at = static_cast<long long>(c) * E + e;
      const int h = hist[at];
      hist[at] = run;  // the chunk's first place within the expert
      run += h;
    }
    cnt[e] = run;
  }
  __syncthreads();
  if (tid == 0) {
    int off = 0, tiles = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = off;
      tile_start[e] = tiles;
      off += cnt[e];
      tiles += (cnt[e] + kBM - 1) / kBM;
    }
    offsets[E] = off;
    tile_start[E] = tiles;
  }
}

// Places every slot; a slot whose expert is outside [0, E) gets a routed row of zeros instead.
__global__ void route_scatter_kernel(const int32_t* ex, int R, int E, const int* hist, const int* rank,
                                     const int* offsets, int* order, uint16_t* routed, long long d) {
  const int i = static_cast<int>(blockIdx.x) * kChunk + static_cast<int>(threadIdx.x);
  if (i >= R) return;
  const int e = ex[i];
  if (e < 0 || e >= E) {
    for (long long c = 0; c < d; ++c) routed[static_cast<long long>(i) * d + c] = 0;
    return;
  }
  const int chunk = i / kChunk;
  order[offsets[e] + hist[static_cast<long long>(chunk) * E + e] + rank[i]] = i;
}

// ---- routed experts: activation quantization -----------------------------------------------------

// act_quant_fp8 of bf16 rows (one block per row, a warp per activation block at a time). With
// `live_rows`, rows at or past *live_rows are skipped (the gathered rows of the experts).
__global__ void act_quant_fp8_kernel(const uint16_t* x, long long x_stride, const int* live_rows, int K, int block,
                                     uint8_t* q, uint8_t* scales) {
  const int r = static_cast<int>(blockIdx.x);
  if (live_rows != nullptr && r >= *live_rows) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % gpu::kWarpSize, warp = tid / gpu::kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / gpu::kWarpSize;
  const int nb = K / block;
  const uint16_t* xr = x + static_cast<long long>(r) * x_stride;
  for (int b = warp; b < nb; b += warps) {
    const int k0 = b * block;
    float amax = 0.0f;  // std::max(amax, |x|): a NaN never enters
    for (int kk = lane; kk < block; kk += gpu::kWarpSize) {
      const float v = fabsf(bf16_to_f32(xr[k0 + kk]));
      amax = amax < v ? v : amax;
    }
    amax = gpu::warp_max(amax);  // exact in any order (no NaN)
    const float floored = amax < 1e-4f ? 1e-4f : amax;
    const uint8_t code = f32_to_ue8m0_ceil(floored * (1.0f / 448.0f));
    const float s = ue8m0_to_f32(code);
    if (lane == 0) scales[static_cast<long long>(r) * nb + b] = code;
    for (int kk = lane; kk < block; kk += gpu::kWarpSize) {
      const float v = clamp_like_std(bf16_to_f32(xr[k0 + kk]) / s, -448.0f, 448.0f);
      q[static_cast<long long>(r) * K + k0 + kk] = f32_to_e4m3fn(v);
    }
  }
}

// act_quant_int8 of bf16 rows: one scale per row (kernels/int8_gemm.h), one block per row.
__global__ void act_quant_int8_kernel(const uint16_t* x, long long x_stride, const int* live_rows, int K, int8_t* q,
                                      float* scales) {
  __shared__ float red[gpu::kMaxWarps];
  const int r = static_cast<int>(blockIdx.x);
  if (live_rows != nullptr && r >= *live_rows) return;  // uniform over the block
  const int tid = static_cast<int>(threadIdx.x);
  const uint16_t* xr = x + static_cast<long long>(r) * x_stride;
  int8_t* qr = q + static_cast<long long>(r) * K;
  float amax = 0.0f, bad = 0.0f;
  for (int kk = tid; kk < K; kk += static_cast<int>(blockDim.x)) {
    const float v = bf16_to_f32(xr[kk]);
    if (!isfinite(v)) bad = 1.0f;
    const float a = fabsf(v);
    amax = amax < a ? a : amax;
  }
  amax = gpu::block_max(amax, red);
  bad = gpu::block_max(bad, red);
  if (bad != 0.0f) {  // a row holding inf/NaN: codes 0, scale NaN
    for (int kk = tid; kk < K; kk += static_cast<int>(blockDim.x)) qr[kk] = 0;
    if (tid == 0) scales[r] = f32_from_bits(0x7FC00000u);  // the host's quiet_NaN
    return;
  }
  const float floored = amax < kInt8AmaxFloor ? kInt8AmaxFloor : amax;
  const float inv = 127.0f / floored;
  for (int kk = tid; kk < K; kk += static_cast<int>(blockDim.x)) {
    const float scaled = bf16_to_f32(xr[kk]) * inv;
    qr[kk] = static_cast<int8_t>(clamp_like_std(rintf(scaled), -127.0f, 127.0f));
  }
  if (tid == 0) scales[r] = floored / 127.0f;
}

// ---- routed experts: grouped GEMMs ---------------------------------------------------------------

enum class Fmt : uint8_t { fp4, fp8, int8 };

struct GemmArgs {
  const uint8_t* a = nullptr;         // activation codes [rows, K]: e4m3 (fp4 / fp8) or i8
  const void* a_scales = nullptr;     // ue8m0 [rows, K / a_block] or f32 [rows] (int8)
  int K = 0;
  int N = 0;
  int a_block = 1;                    // the activation scale block along K
  int w_block = 1;                    // the weight scale block along K (fp4: fp4_block, fp8: weight_block)
  int ks = 1;                         // K elements per stage: divides w_block (fp4 / fp8)
  const int32_t* order = nullptr;     // gathered row -> slot
  const int* offsets = nullptr;       // [E + 1]
  const int* tile_start = nullptr;    // [E + 1]
  int E = 0;
  int k_route = 1;                    // slots per token
  const unsigned long long* table = nullptr;  // [E, 6]: w1, s1, w2, s2, w3, s3
  const float* slot_weight = nullptr;  // [T * k] (up)
  float limit = 0.0f;                  // swiglu limit (up)
  uint16_t* out = nullptr;             // up: h [R, N] by gathered row; down: routed [T * k, N] by slot
};

template <class P>
__device__ inline P table_ptr(const unsigned long long* row, int column) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(row[column]));
}

// Expert e's weights and scales of the up GEMM (w1 and w3: two planes) or the down one (w2).
template <bool kUp>
struct ExpertPlanes {
  const uint8_t* w[kUp ? 2 : 1];
  const void* s[kUp ? 2 : 1];
};

template <bool kUp>
__device__ inline ExpertPlanes<kUp> expert_planes(const GemmArgs& args, int e) {
  const unsigned long long* row = args.table + static_cast<long long>(e) * 6;
  ExpertPlanes<kUp> p;
  p.w[0] = table_ptr<const uint8_t*>(row, kUp ? 0 : 2);
  p.s[0] = table_ptr<const void*>(row, kUp ? 1 : 3);
  if constexpr (kUp) {
    p.w[1] = table_ptr<const uint8_t*>(row, 4);
    p.s[1] = table_ptr<const void*>(row, 5);
  }
  return p;
}

// One tile of kBM gathered rows of one expert x kBN output columns. kUp: w1 and w3 together (g and
// u), A rows are token rows of the quantized input, the epilogue is SwiGLU with the slot's weight
// (bf16 h by gathered row). Down: w2, A rows are the quantized h, the epilogue writes bf16 routed
// rows by slot. Each output is one thread's: per weight-scale block an fp32 partial over ascending
// k, then acc += partial · (s_a · s_w) in fp32, blocks ascending (int8: an exact int32 sum, then the
// two scales), exactly the host GEMMs' order.
template <Fmt F, bool kUp>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const GemmArgs args) {
  using V = std::conditional_t<F == Fmt::int8, int, float>;
  constexpr int kPlanes = kUp ? 2 : 1;
  __shared__ V a_tile[kBM * kPitch];
  __shared__ V w_tile[kPlanes][kBN * kPitch];
  __shared__ float lut[256];
  __shared__ int rows_a[kBM];  // A row of each tile row (token or gathered row), -1 past the count
  __shared__ int rows_p[kBM];  // gathered row of each tile row, -1 past the count

  const int b = static_cast<int>(blockIdx.x);
  if (b >= args.tile_start[args.E]) return;  // the grid covers the worst case; uniform per block
  int lo = 0, hi = args.E;                   // tile_start[lo] <= b < tile_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (args.tile_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int e = lo;
  const int row0 = args.offsets[e] + (b - args.tile_start[e]) * kBM;
  const int row_end = args.offsets[e + 1];
  const int n0 = static_cast<int>(blockIdx.y) * kBN;
  const int K = args.K, N = args.N, ks = args.ks;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kBM) {
    const int p = row0 + tid;
    const bool live = p < row_end;
    rows_p[tid] = live ? p : -1;
    rows_a[tid] = !live ? -1 : (kUp ? args.order[p] / args.k_route : p);
  }
  if constexpr (F != Fmt::int8) {
    for (int c = tid; c < 256; c += kThreads) lut[c] = e4m3fn_to_f32(static_cast<uint8_t>(c));
  }
  __syncthreads();

  const ExpertPlanes<kUp> planes = expert_planes<kUp>(args, e);

  const int tx = tid % 16, ty = tid / 16;  // outputs (ty + 16 i, tx + 16 j), i, j < 4
  V part[kPlanes][4][4];
  float acc[kPlanes][4][4];
  for (int pl = 0; pl < kPlanes; ++pl) {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        part[pl][i][j] = 0;
        acc[pl][i][j] = 0.0f;
      }
    }
  }

  for (int k0 = 0; k0 < K; k0 += ks) {
    for (int idx = tid; idx < kBM * ks; idx += kThreads) {
      const int r = idx / ks, kk = idx % ks, kg = k0 + kk;
      const int ar = rows_a[r];
      V v = 0;
      if (ar >= 0 && kg < K) {
        const uint8_t code = args.a[static_cast<long long>(ar) * K + kg];
        if constexpr (F == Fmt::int8) {
          v = static_cast<int>(static_cast<int8_t>(code));
        } else {
          v = lut[code];
        }
      }
      a_tile[r * kPitch + kk] = v;
    }
    for (int pl = 0; pl < kPlanes; ++pl) {
      for (int idx = tid; idx < kBN * ks; idx += kThreads) {
        const int c = idx / ks, kk = idx % ks, kg = k0 + kk;
        const int n = n0 + c;
        V v = 0;
        if (n < N && kg < K) {
          if constexpr (F == Fmt::fp4) {
            const uint8_t byte = planes.w[pl][static_cast<long long>(n) * (K / 2) + kg / 2];
            v = e2m1_to_f32(static_cast<uint8_t>((kg & 1) != 0 ? byte >> 4 : byte & 0xF));  // low nibble = even k
          } else if constexpr (F == Fmt::fp8) {
            v = lut[planes.w[pl][static_cast<long long>(n) * K + kg]];
          } else {
            v = static_cast<int>(static_cast<int8_t>(planes.w[pl][static_cast<long long>(n) * K + kg]));
          }
        }
        w_tile[pl][c * kPitch + kk] = v;
      }
    }
    __syncthreads();
    for (int kk = 0; kk < ks; ++kk) {
      V a[4];
      for (int i = 0; i < 4; ++i) a[i] = a_tile[(ty + 16 * i) * kPitch + kk];
      for (int pl = 0; pl < kPlanes; ++pl) {
        for (int j = 0; j < 4; ++j) {
          const V w = w_tile[pl][(tx + 16 * j) * kPitch + kk];
          // fp4 / fp8: e4m3 x e2m1 and e4m3 x e4m3 products are exact in fp32, so a fused
          // multiply-add rounds exactly as the host's multiply-then-add. int8: exact.
          for (int i = 0; i < 4; ++i) part[pl][i][j] += a[i] * w;
        }
      }
    }
    __syncthreads();
    if constexpr (F != Fmt::int8) {
      if ((k0 + ks) % args.w_block == 0) {  // the end of a weight-scale block: scale and accumulate
        const int kb = (k0 + ks) / args.w_block - 1;
        const int ka = (kb * args.w_block) / args.a_block;
        const auto* sa_codes = static_cast<const uint8_t*>(args.a_scales);
        const int na = K / args.a_block, nw = K / args.w_block;
        for (int i = 0; i < 4; ++i) {
          const int ar = rows_a[ty + 16 * i];
          const float sa = ar >= 0 ? ue8m0_to_f32(sa_codes[static_cast<long long>(ar) * na + ka]) : 0.0f;
          for (int pl = 0; pl < kPlanes; ++pl) {
            const auto* sw_codes = static_cast<const uint8_t*>(planes.s[pl]);
            for (int j = 0; j < 4; ++j) {
              const int n = n0 + tx + 16 * j;
              float sw = 0.0f;
              if (n < N) {
                const long long at = F == Fmt::fp4 ? static_cast<long long>(n) * nw + kb
                                                   : static_cast<long long>(n / args.w_block) * nw + kb;
                sw = ue8m0_to_f32(sw_codes[at]);
              }
              const float scale = mul_rn(sa, sw);
              acc[pl][i][j] = add_rn(acc[pl][i][j], mul_rn(part[pl][i][j], scale));
              part[pl][i][j] = 0.0f;
            }
          }
        }
      }
    }
  }

  // The GEMM outputs in fp32 before their bf16 rounding.
  auto result = [&](int pl, int i, int j, int ar, int n) -> float {
    if constexpr (F == Fmt::int8) {
      const float sa = static_cast<const float*>(args.a_scales)[ar];
      const float sw = static_cast<const float*>(planes.s[pl])[n];
      return mul_rn(mul_rn(static_cast<float>(part[pl][i][j]), sa), sw);
    } else {
      (void)ar;
      (void)n;
      return acc[pl][i][j];
    }
  };
  for (int i = 0; i < 4; ++i) {
    const int p = rows_p[ty + 16 * i];
    if (p < 0) continue;
    const int ar = rows_a[ty + 16 * i];
    const int slot = args.order[p];
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      if constexpr (kUp) {
        const float gi = round_bf16(result(0, i, j, ar, n));  // the host's bf16 g and u
        const float ui = round_bf16(result(1, i, j, ar, n));
        args.out[static_cast<long long>(p) * N + n] =
            f32_to_bf16(swiglu_value(gi, ui, args.limit, true, args.slot_weight[slot]));
      } else {
        args.out[static_cast<long long>(slot) * N + n] = f32_to_bf16(result(0, i, j, ar, n));
      }
    }
  }
}

// ---- routed experts at decode batch sizes: fp4 weights, a few rows per expert ---------------------
//
// At decode, an expert has a handful of rows, and the tiled kernel above, whose threads load the
// weights one scalar at a time into mostly empty 64-row tiles, is far from the memory bound. Here a
// block takes kSbCols output columns of one expert and that expert's rows kSbRows at a time: the
// rows' codes are staged in shared memory as bf16 (every e4m3 value is one), each lane reads its
// 32-element chunks of a weight row as 16 bytes, and each output still follows the host's order. A
// chunk holds whole weight-scale blocks (kWb divides 32), so the partial of a block is one lane's
// fused multiply-add chain over ascending k (the e4m3 x e2m1 products are exact, so this rounds as
// the host's multiply-then-add); the lane scales it (fp32 partial · (s_a · s_w)) into shared memory,
// and lane r then adds row r's scaled partials in ascending block order. The same operations in the
// same order as grouped_gemm_kernel: the same bits.

constexpr int kSbRows = 8;                          // rows of one expert per pass
constexpr int kSbWarps = 8;                         // warps per block (a warp's width: kChunkLanes)
constexpr int kChunkLanes = 32;                     // lanes sharing a weight row (of a 32- or 64-wide warp)
constexpr int kSbColsPerWarp = 4;                   // output columns per warp
constexpr int kSbCols = kSbWarps * kSbColsPerWarp;  // output columns per block
constexpr int kSbChunk = 32;                        // K elements of a lane step: 16 bytes of fp4
constexpr int kSbChunkPitch = kSbChunk;             // bf16 per staged chunk: 64 bytes, 16-byte slots swizzled

// The 16-byte slot (8 bf16) where slot v of staged chunk ch lies: v ^ ((ch / 2) % 4). A quarter warp
// reads slot v of 8 consecutive chunks, 64 bytes apart: swizzled, they hit 8 distinct 16-byte bank
// groups, so the reads are conflict-free without padding (which would cost the second block per SM).
__device__ inline int sb_slot(int ch, int v) { return v ^ ((ch >> 1) & 3); }

// Dynamic shared memory of small_batch_fp4_kernel for K, the number of weight blocks nw and of
// activation blocks na: staged rows, their scales, each warp's scaled partials, the e2m1 table.
size_t small_batch_smem(int K, int nw, int na) {
  return static_cast<size_t>(kSbRows) * static_cast<size_t>(K / kSbChunk) * kSbChunkPitch * 2 +
         static_cast<size_t>(kSbRows) * static_cast<size_t>(na) * 4 +
         static_cast<size_t>(kSbWarps) * kSbRows * static_cast<size_t>(nw) * 4 + 16 * 4 + 2 * kSbRows * 4;
}

// 16 bytes of a weight row: one vector load when the row is 16-byte aligned, else byte loads.
__device__ inline uint4 load_16(const uint8_t* p, bool vector) {
  if (vector) return *reinterpret_cast<const uint4*>(p);
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) {
    w[i] = static_cast<uint32_t>(p[4 * i]) | static_cast<uint32_t>(p[4 * i + 1]) << 8 |
           static_cast<uint32_t>(p[4 * i + 2]) << 16 | static_cast<uint32_t>(p[4 * i + 3]) << 24;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The two bf16 of a 32-bit word as fp32 (the low half is the earlier element).
__device__ inline float bf16_lo(uint32_t w) { return bf16_to_f32(static_cast<uint16_t>(w)); }
__device__ inline float bf16_hi(uint32_t w) { return bf16_to_f32(static_cast<uint16_t>(w >> 16)); }

// Rows r and r + 1 of a staged chunk against the chunk's 32 weights: the scaled partial of each of
// the chunk's weight blocks into `terms` (row-major [kSbRows][nw]); `pair` false: row r alone.
template <int kWb>
__device__ inline void chunk_terms(const uint16_t* a_tile, int chunks, int ch, int r, bool pair, const float (&w)[32],
                                   const float* sa_tile, int na, int a_block, const uint8_t* srow, float* terms,
                                   int nw) {
  constexpr int kSub = kSbChunk / kWb;
  const uint4* a0 = reinterpret_cast<const uint4*>(a_tile + (r * chunks + ch) * kSbChunkPitch);
  const uint4* a1 = reinterpret_cast<const uint4*>(a_tile + ((pair ? r + 1 : r) * chunks + ch) * kSbChunkPitch);
  float p0[kSub], p1[kSub];
#pragma unroll
  for (int j = 0; j < kSub; ++j) p0[j] = p1[j] = 0.0f;
#pragma unroll
  for (int v = 0; v < 4; ++v) {  // 8 elements per 16-byte read, ascending k
    const uint4 x0 = a0[sb_slot(ch, v)], x1 = a1[sb_slot(ch, v)];
    const uint32_t u0[4] = {x0.x, x0.y, x0.z, x0.w}, u1[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = 8 * v + 2 * q;
      const int j = k / kWb;
      p0[j] = __fmaf_rn(bf16_lo(u0[q]), w[k], p0[j]);
      p1[j] = __fmaf_rn(bf16_lo(u1[q]), w[k], p1[j]);
      p0[j] = __fmaf_rn(bf16_hi(u0[q]), w[k + 1], p0[j]);
      p1[j] = __fmaf_rn(bf16_hi(u1[q]), w[k + 1], p1[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kSub; ++j) {
    const int b = ch * kSub + j;
    const int ka = (b * kWb) / a_block;
    const float sw = ue8m0_to_f32(srow[b]);
    terms[r * nw + b] = mul_rn(p0[j], mul_rn(sa_tile[r * na + ka], sw));
    if (pair) terms[(r + 1) * nw + b] = mul_rn(p1[j], mul_rn(sa_tile[(r + 1) * na + ka], sw));
  }
}

// A small-batch pass's rows: the slot of each of `rows` gathered rows from `first` on, and the row of
// A it reads (up: the slot's token; down: the gathered row). Block-wide, between two barriers (the
// previous pass is done with the staged rows before they change).
template <bool kUp>
__device__ inline void load_pass_rows(const GemmArgs& args, int first, int rows, int* slots, int* rows_a) {
  __syncthreads();
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < rows) {
    const int p = first + tid;
    slots[tid] = args.order[p];
    rows_a[tid] = kUp ? slots[tid] / args.k_route : p;
  }
  __syncthreads();
}

template <bool kUp, int kWb>
__global__ void __launch_bounds__(kSbWarps * kChunkLanes) small_batch_fp4_kernel(const GemmArgs args) {
  extern __shared__ __align__(16) unsigned char sb_smem[];
  constexpr int kPlanes = kUp ? 2 : 1;
  const int e = static_cast<int>(blockIdx.y);
  const int first = args.offsets[e];
  const int count = args.offsets[e + 1] - first;
  if (count <= 0) return;  // uniform per block
  const int K = args.K, N = args.N, na = K / args.a_block, nw = K / kWb, chunks = K / kSbChunk;
  auto* a_tile = reinterpret_cast<uint16_t*>(sb_smem);                                  // [rows][chunks][pitch]
  auto* sa_tile = reinterpret_cast<float*>(sb_smem + static_cast<size_t>(kSbRows) * chunks * kSbChunkPitch * 2);
  float* terms_all = sa_tile + kSbRows * na;                                            // [warps][rows][nw]
  float* lut = terms_all + kSbWarps * kSbRows * nw;                                     // [16]
  int* rows_a = reinterpret_cast<int*>(lut + 16);                                       // [rows]
  int* slots = rows_a + kSbRows;                                                        // [rows]
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kChunkLanes, lane = tid % kChunkLanes;
  if (tid < 16) lut[tid] = e2m1_to_f32(static_cast<uint8_t>(tid));

  const ExpertPlanes<kUp> planes = expert_planes<kUp>(args, e);
  bool vector[kPlanes];
#pragma unroll
  for (int pl = 0; pl < kPlanes; ++pl) vector[pl] = (reinterpret_cast<uintptr_t>(planes.w[pl]) & 15u) == 0;
  const auto* sa_codes = static_cast<const uint8_t*>(args.a_scales);
  float* terms = terms_all + warp * kSbRows * nw;

  for (int r0 = 0; r0 < count; r0 += kSbRows) {
    const int rows = count - r0 < kSbRows ? count - r0 : kSbRows;
    load_pass_rows<kUp>(args, first + r0, rows, slots, rows_a);
    for (int idx = tid; idx < rows * K; idx += static_cast<int>(blockDim.x)) {
      const int r = idx / K, k = idx - r * K;
      const uint8_t code = args.a[static_cast<long long>(rows_a[r]) * K + k];
      const int ch = k / kSbChunk, e = k % kSbChunk;
      a_tile[(r * chunks + ch) * kSbChunkPitch + sb_slot(ch, e / 8) * 8 + e % 8] =
          static_cast<uint16_t>(__float_as_uint(e4m3fn_to_f32(code)) >> 16);  // exact: e4m3 fits bf16
    }
    for (int idx = tid; idx < rows * na; idx += static_cast<int>(blockDim.x)) {
      const int r = idx / na, kb = idx - r * na;
      sa_tile[idx] = ue8m0_to_f32(sa_codes[static_cast<long long>(rows_a[r]) * na + kb]);
    }
    __syncthreads();

    for (int c = 0; c < kSbColsPerWarp; ++c) {
      const int n = static_cast<int>(blockIdx.x) * kSbCols + warp * kSbColsPerWarp + c;
      if (n >= N) break;  // uniform per warp
      float result[kPlanes];
#pragma unroll
      for (int pl = 0; pl < kPlanes; ++pl) {
        const uint8_t* wrow = planes.w[pl] + static_cast<long long>(n) * (K / 2);
        const uint8_t* srow = static_cast<const uint8_t*>(planes.s[pl]) + static_cast<long long>(n) * nw;
        for (int ch = lane; ch < chunks; ch += kChunkLanes) {
          const uint4 packed = load_16(wrow + ch * 16, vector[pl]);
          const uint32_t bytes4[4] = {packed.x, packed.y, packed.z, packed.w};
          float w[32];
#pragma unroll
          for (int i = 0; i < 16; ++i) {  // byte i holds k = 2i (low nibble) and 2i + 1
            const uint32_t byte = (bytes4[i / 4] >> (8 * (i % 4))) & 0xffu;
            w[2 * i] = lut[byte & 0xfu];
            w[2 * i + 1] = lut[byte >> 4];
          }
          for (int r = 0; r < rows; r += 2) {
            chunk_terms<kWb>(a_tile, chunks, ch, r, r + 1 < rows, w, sa_tile, na, args.a_block, srow, terms, nw);
          }
        }
        gpu::sync_lanes();
        result[pl] = 0.0f;
        if (lane < rows) {
          float acc = 0.0f;
          for (int b = 0; b < nw; ++b) acc = add_rn(acc, terms[lane * nw + b]);
          result[pl] = acc;
        }
        gpu::sync_lanes();  // terms are rewritten by the next plane or column
      }
      if (lane < rows) {
        const int p = first + r0 + lane;
        if constexpr (kUp) {
          const float gi = round_bf16(result[0]);  // the host's bf16 g and u
          const float ui = round_bf16(result[1]);
          args.out[static_cast<long long>(p) * N + n] =
              f32_to_bf16(swiglu_value(gi, ui, args.limit, true, args.slot_weight[slots[lane]]));
        } else {
          args.out[static_cast<long long>(slots[lane]) * N + n] = f32_to_bf16(result[0]);
        }
      }
    }
  }
}

std::atomic<uint64_t> g_small_batch_gemms{0};

// Decode-sized: few rows per expert on average (R <= kSbRows * E: one pass for most experts) and
// one grid row per expert. Both small-batch kernels (exact and tensor-core) take only these.
bool decode_sized(const GemmArgs& g, int64_t R) { return R <= static_cast<int64_t>(kSbRows) * g.E && g.E <= 65535; }

// Whether the small-batch kernel takes a GEMM of inner size K: fp4, a 16- or 32-wide weight block,
// K in whole chunks, decode-sized, and its shared memory within the device's limit.
bool small_batch_fits(const GemmArgs& g, int64_t R, size_t* smem) {
  if (g.w_block != 16 && g.w_block != 32) return false;
  if (g.K % kSbChunk != 0 || g.K % g.a_block != 0 || !decode_sized(g, R)) return false;
  *smem = small_batch_smem(g.K, g.K / g.w_block, g.K / g.a_block);
  return *smem <= gpu::smem_optin_limit();
}

template <bool kUp, int kWb>
void launch_small_batch(const GemmArgs& g, size_t smem, gpu::Stream stream) {
  auto kernel = small_batch_fp4_kernel<kUp, kWb>;
  gpu::allow_smem(kernel, smem, "cudaFuncSetAttribute (moe_experts)");
  const dim3 grid(static_cast<unsigned>(gpu::ceil_div(g.N, kSbCols)), static_cast<unsigned>(g.E));
  kernel<<<grid, kSbWarps * kChunkLanes, smem, stream>>>(g);
  gpu::check_launch(kUp ? "moe_experts (w1, w3; small batch)" : "moe_experts (w2; small batch)");
  g_small_batch_gemms.fetch_add(1, std::memory_order_relaxed);
}

#if defined(DSV4_MOE_TENSOR_CORE)
// ---- the tensor-core variant of the small-batch fp4 kernel (kernels/cuda/moe_tc.h) ----------------
//
// A block takes kTcCols output columns of one expert, its rows kTcRows at a time (the upper half of
// the m16 tile; the lower half is zero registers), staged in shared memory as bf16. Each warp owns
// TcShape::kTiles n8 tiles. Per 32-wide weight block, lane (g, t) (g = lane / 4, t = lane % 4) feeds both
// mma.sync steps from one 16-byte read of row g's activations k = 8t .. 8t + 7 and one 4-byte read of
// column g's packed weights (the same eight k): the first step takes k 8t .. 8t + 3, the second
// 8t + 4 .. 8t + 7, a permutation of k inside the block that A and B share, so each step's sum is a
// sum over the block's products. The partial (row g, columns 2t and 2t + 1 of the tile) is then scaled
// and accumulated in f32 in block order, the host's epilogue.

// Per warp four (plane, n8 tile) pairs: the up GEMM's warps take 2 tiles of both planes, the down
// GEMM's 4 tiles of its one; 8 or 4 warps make 128 output columns per block either way.
template <bool kUp>
struct TcShape {
  static constexpr int kPlanes = kUp ? 2 : 1;
  static constexpr int kTiles = 4 / kPlanes;
  static constexpr int kWarps = kUp ? 8 : 4;
};
constexpr int kTcCols = 128;                         // output columns per block
static_assert(TcShape<true>::kWarps * TcShape<true>::kTiles * 8 == kTcCols, "up: 128 columns per block");
static_assert(TcShape<false>::kWarps * TcShape<false>::kTiles * 8 == kTcCols, "down: 128 columns per block");
constexpr int kTcRows = 8;                           // rows per pass
constexpr int kTcPad = 32;                           // bf16 per staged row beyond K: rows 64 bytes apart mod 128

size_t tc_smem(int K, int na) {
  return static_cast<size_t>(kTcRows) * static_cast<size_t>(K + kTcPad) * 2 + static_cast<size_t>(kTcRows * na) * 4 +
         256 * 4 + 2 * kTcRows * 4;
}

// Four bytes of a weight row: one load when aligned, else byte loads.
template <bool kAligned>
__device__ inline uint32_t load_4(const uint8_t* p) {
  if constexpr (kAligned) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
           static_cast<uint32_t>(p[3]) << 24;
  }
}

constexpr int kTcGroup = 4;  // weight blocks fetched together

// One warp's kTiles n8 tiles of kPlanes planes over the staged rows: per 32-wide weight block the
// two mma.sync steps and the host's scaled f32 accumulation, in block order. Weight words and scale
// codes come kTcGroup blocks at a time, the next group's loads in flight while the current group is
// multiplied. Offsets are from each plane's base (-1: a column past N, whose weights read as zeros
// and whose outputs are never stored). kWords: weight rows 4-byte aligned and scale rows whole words
// (nw % 4 == 0, aligned), so scale codes load four blocks to a word; else byte loads.
template <int kPlanes, int kTiles, bool kWords>
__device__ inline void tc_warp_tiles(const uint8_t* const (&wbase)[kPlanes], const uint8_t* const (&sbase)[kPlanes],
                                     const int (&wo)[kTiles], const int (&so0)[kTiles], const int (&so1)[kTiles],
                                     const uint16_t* a_row, const float* sa_row, const uint32_t* lut, int nw,
                                     int a_block, float (&acc)[kPlanes][kTiles][2]) {
  uint32_t wn[kPlanes][kTiles][kTcGroup], sn[kPlanes][kTiles][2];
  const auto codes4 = [&](const uint8_t* row, int b4) {  // byte i: block b4 + i's code (0 past nw)
    if constexpr (kWords) {
      return *reinterpret_cast<const uint32_t*>(row + b4);
    } else {
      uint32_t v = 0;
#pragma unroll
      for (int i = 0; i < kTcGroup; ++i) v |= b4 + i < nw ? static_cast<uint32_t>(row[b4 + i]) << (8 * i) : 0u;
      return v;
    }
  };
  const auto fetch = [&](int b4) {
#pragma unroll
    for (int pl = 0; pl < kPlanes; ++pl) {
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
#pragma unroll
        for (int i = 0; i < kTcGroup; ++i) {
          wn[pl][j][i] = wo[j] >= 0 && b4 + i < nw ? load_4<kWords>(wbase[pl] + wo[j] + (b4 + i) * 16) : 0u;
        }
        sn[pl][j][0] = so0[j] >= 0 ? codes4(sbase[pl] + so0[j], b4) : 0u;
        sn[pl][j][1] = so1[j] >= 0 ? codes4(sbase[pl] + so1[j], b4) : 0u;
      }
    }
  };
  const bool group_shares_sa = a_block % (32 * kTcGroup) == 0;  // a group's blocks lie in one activation block
  fetch(0);
  for (int b4 = 0; b4 < nw; b4 += kTcGroup) {
    uint32_t wc[kPlanes][kTiles][kTcGroup], sc[kPlanes][kTiles][2];
#pragma unroll
    for (int pl = 0; pl < kPlanes; ++pl) {
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
#pragma unroll
        for (int i = 0; i < kTcGroup; ++i) wc[pl][j][i] = wn[pl][j][i];
        sc[pl][j][0] = sn[pl][j][0];
        sc[pl][j][1] = sn[pl][j][1];
      }
    }
    if (b4 + kTcGroup < nw) fetch(b4 + kTcGroup);
    const float sa_group = sa_row[(b4 * 32) / a_block];
#pragma unroll
    for (int i = 0; i < kTcGroup; ++i) {
      const int b = b4 + i;
      if (b >= nw) break;  // uniform
      const uint4 av = *reinterpret_cast<const uint4*>(a_row + b * 32);
      const float sa = group_shares_sa ? sa_group : sa_row[(b * 32) / a_block];
#pragma unroll
      for (int pl = 0; pl < kPlanes; ++pl) {
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const uint32_t wd = wc[pl][j][i];
          float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma_16816(c, av.x, 0u, av.y, 0u, lut[wd & 0xffu], lut[(wd >> 8) & 0xffu]);
          mma_16816(c, av.z, 0u, av.w, 0u, lut[(wd >> 16) & 0xffu], lut[wd >> 24]);
          const auto code0 = static_cast<uint8_t>(sc[pl][j][0] >> (8 * i));
          const auto code1 = static_cast<uint8_t>(sc[pl][j][1] >> (8 * i));
          acc[pl][j][0] = add_rn(acc[pl][j][0], mul_rn(c[0], mul_rn(sa, ue8m0_to_f32(code0))));
          acc[pl][j][1] = add_rn(acc[pl][j][1], mul_rn(c[1], mul_rn(sa, ue8m0_to_f32(code1))));
        }
      }
    }
  }
}

template <bool kUp>
__global__ void __launch_bounds__(TcShape<kUp>::kWarps * 32) small_batch_fp4_tc_kernel(const GemmArgs args) {
  extern __shared__ __align__(16) unsigned char tc_smem_raw[];
  constexpr int kPlanes = TcShape<kUp>::kPlanes;
  constexpr int kTiles = TcShape<kUp>::kTiles;
  const int e = static_cast<int>(blockIdx.y);
  const int first = args.offsets[e];
  const int count = args.offsets[e + 1] - first;
  if (count <= 0) return;  // uniform per block
  const int K = args.K, N = args.N, na = K / args.a_block, nw = K / 32, pitch = K + kTcPad;
  auto* a_tile = reinterpret_cast<uint16_t*>(tc_smem_raw);                                      // [rows][pitch]
  auto* sa_tile = reinterpret_cast<float*>(tc_smem_raw + static_cast<size_t>(kTcRows) * pitch * 2);  // [rows][na]
  auto* lut = reinterpret_cast<uint32_t*>(sa_tile + kTcRows * na);  // a byte's two e2m1 as bf16, low nibble low
  int* rows_a = reinterpret_cast<int*>(lut + 256);
  int* slots = rows_a + kTcRows;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (int i = tid; i < 256; i += static_cast<int>(blockDim.x)) {
    const uint32_t lo = __float_as_uint(e2m1_to_f32(static_cast<uint8_t>(i & 15))) >> 16;
    const uint32_t hi = __float_as_uint(e2m1_to_f32(static_cast<uint8_t>(i >> 4))) >> 16;
    lut[i] = lo | hi << 16;
  }
  // This lane's B column of each tile (its weight words) and its two output columns (their scales),
  // as offsets from the planes' bases (an expert plane is far below 2^31 bytes: N * K / 2).
  const ExpertPlanes<kUp> planes = expert_planes<kUp>(args, e);
  const int n_warp = static_cast<int>(blockIdx.x) * kTcCols + warp * kTiles * 8;
  const uint8_t* wbase[kPlanes];
  const uint8_t* sbase[kPlanes];
  bool word_loads = nw % 4 == 0;
#pragma unroll
  for (int pl = 0; pl < kPlanes; ++pl) {
    wbase[pl] = planes.w[pl];
    sbase[pl] = static_cast<const uint8_t*>(planes.s[pl]);
    word_loads = word_loads && (reinterpret_cast<uintptr_t>(wbase[pl]) & 3u) == 0 && (reinterpret_cast<uintptr_t>(sbase[pl]) & 3u) == 0;
  }
  int wo[kTiles], so0[kTiles], so1[kTiles];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    const int n_b = n_warp + 8 * j + g, n_c = n_warp + 8 * j + 2 * t;
    wo[j] = n_b < N ? n_b * (K / 2) + 4 * t : -1;
    so0[j] = n_c < N ? n_c * nw : -1;
    so1[j] = n_c + 1 < N ? (n_c + 1) * nw : -1;
  }
  const auto* sa_codes = static_cast<const uint8_t*>(args.a_scales);

  for (int r0 = 0; r0 < count; r0 += kTcRows) {
    const int rows = count - r0 < kTcRows ? count - r0 : kTcRows;
    load_pass_rows<kUp>(args, first + r0, rows, slots, rows_a);
    // Four codes per step (K % 32 == 0: whole words); rows past `rows` are zeros (never stored).
    const int k_words = K / 4;
#pragma unroll 4
    for (int idx = tid; idx < kTcRows * k_words; idx += static_cast<int>(blockDim.x)) {
      const int r = idx / k_words, k = 4 * (idx - r * k_words);
      uint32_t codes = 0;
      if (r < rows) codes = *reinterpret_cast<const uint32_t*>(args.a + static_cast<long long>(rows_a[r]) * K + k);
      uint32_t bf[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const auto lo = static_cast<uint8_t>(codes >> (16 * h)), hi = static_cast<uint8_t>(codes >> (16 * h + 8));
        bf[h] = (__float_as_uint(e4m3fn_to_f32(lo)) >> 16) | (__float_as_uint(e4m3fn_to_f32(hi)) & 0xffff0000u);
      }
      *reinterpret_cast<uint2*>(a_tile + r * pitch + k) = make_uint2(bf[0], bf[1]);  // exact: e4m3 fits bf16
    }
    for (int idx = tid; idx < kTcRows * na; idx += static_cast<int>(blockDim.x)) {
      const int r = idx / na, kb = idx - r * na;
      sa_tile[idx] = r < rows ? ue8m0_to_f32(sa_codes[static_cast<long long>(rows_a[r]) * na + kb]) : 0.0f;
    }
    __syncthreads();

    float acc[kPlanes][kTiles][2];
#pragma unroll
    for (int pl = 0; pl < kPlanes; ++pl) {
#pragma unroll
      for (int j = 0; j < kTiles; ++j) acc[pl][j][0] = acc[pl][j][1] = 0.0f;
    }
    const uint16_t* a_row = a_tile + g * pitch + 8 * t;
    if (word_loads) {
      tc_warp_tiles<kPlanes, kTiles, true>(wbase, sbase, wo, so0, so1, a_row, sa_tile + g * na, lut, nw, args.a_block, acc);
    } else {
      tc_warp_tiles<kPlanes, kTiles, false>(wbase, sbase, wo, so0, so1, a_row, sa_tile + g * na, lut, nw, args.a_block, acc);
    }
    if (g < rows) {
      const int p = first + r0 + g;
      const int slot = slots[g];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n_warp + 8 * j + 2 * t + q;
          if (n >= N) continue;
          if constexpr (kUp) {
            const float gi = round_bf16(acc[0][j][q]);  // the host's bf16 g and u
            const float ui = round_bf16(acc[1][j][q]);
            args.out[static_cast<long long>(p) * N + n] =
                f32_to_bf16(swiglu_value(gi, ui, args.limit, true, args.slot_weight[slot]));
          } else {
            args.out[static_cast<long long>(slot) * N + n] = f32_to_bf16(acc[0][j][q]);
          }
        }
      }
    }
  }
}

PathSwitch& moe_path_switch() {
  static PathSwitch s("DSV4_MOE_GEMM", {"exact", "tensor_core"});
  return s;
}
std::atomic<uint64_t> g_tc_gemms{0};

// Whether this device runs the tensor-core kernel (mma_runs, cached per device).
bool tc_device_ok() {
  static std::mutex mu;
  static std::map<int, bool> known;
  int device = 0;
  gpu::check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(device);
  if (it != known.end()) return it->second;
  return known[device] = mma_runs(reinterpret_cast<const void*>(small_batch_fp4_tc_kernel<true>));
}

// The tensor-core kernel for this GEMM when the switch says so and it fits (true), else nothing.
template <bool kUp>
bool try_tensor_core(const GemmArgs& g, int64_t R, gpu::Stream stream) {
  if (moe_gemm_path() != MoeGemmPath::tensor_core) return false;
  if (g.w_block != 32 || g.K % 32 != 0 || g.a_block % 32 != 0 || g.K % g.a_block != 0) return false;
  if (!decode_sized(g, R) || !tc_device_ok()) return false;
  if (static_cast<int64_t>(g.N) * (g.K / 2) > INT_MAX) return false;  // the kernel's 32-bit plane offsets
  const size_t smem = tc_smem(g.K, g.K / g.a_block);
  if (smem > gpu::smem_optin_limit()) return false;
  auto kernel = small_batch_fp4_tc_kernel<kUp>;
  gpu::allow_smem(kernel, smem, "cudaFuncSetAttribute (moe_experts, tensor cores)");
  const dim3 grid(static_cast<unsigned>(gpu::ceil_div(g.N, kTcCols)), static_cast<unsigned>(g.E));
  kernel<<<grid, TcShape<kUp>::kWarps * 32, smem, stream>>>(g);
  gpu::check_launch(kUp ? "moe_experts (w1, w3; tensor cores)" : "moe_experts (w2; tensor cores)");
  g_tc_gemms.fetch_add(1, std::memory_order_relaxed);
  return true;
}
#endif

// The small-batch kernel for this GEMM when it fits (true), else nothing (false).
template <bool kUp>
bool try_small_batch(const GemmArgs& g, int64_t R, gpu::Stream stream) {
#if defined(DSV4_MOE_TENSOR_CORE)
  if (try_tensor_core<kUp>(g, R, stream)) return true;
#endif
  size_t smem = 0;
  if (!small_batch_fits(g, R, &smem)) return false;
  if (g.w_block == 32) {
    launch_small_batch<kUp, 32>(g, smem, stream);
  } else {
    launch_small_batch<kUp, 16>(g, smem, stream);
  }
  return true;
}

// The largest power of two <= kMaxKs dividing `block`.
int stage_for(int64_t block) {
  int ks = kMaxKs;
  while (ks > 1 && block % ks != 0) ks /= 2;
  return ks;
}

template <Fmt F>
void launch_up(const GemmArgs& up, int tiles, gpu::Stream stream) {
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((up.N + kBN - 1) / kBN));
  grouped_gemm_kernel<F, true><<<grid, kThreads, 0, stream>>>(up);
  gpu::check_launch("moe_experts (w1, w3)");
}

template <Fmt F>
void launch_down(const GemmArgs& down, int tiles, gpu::Stream stream) {
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((down.N + kBN - 1) / kBN));
  grouped_gemm_kernel<F, false><<<grid, kThreads, 0, stream>>>(down);
  gpu::check_launch("moe_experts (w2)");
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------

void moe_gate(const Tensor& logits, const Tensor& bias, const Tensor& tid2eid, const Tensor& token_ids, int64_t k,
              float route_scale, Tensor& experts, Tensor& weights, void* stream_ptr) {
  const char* op = "moe_gate";
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const size_t smem = static_cast<size_t>(3 * E + k) * 4;
  if (smem > 48 * 1024) throw ContractError(op, "logits", std::to_string(E) + " experts exceed the GPU gate's shared memory");
  if (T == 0) return;
  if (T > INT_MAX) throw ContractError(op, "logits", "more rows than one grid holds");
  const bool hash = tid2eid.defined();
  gate_kernel<<<static_cast<unsigned>(T), 128, smem, static_cast<gpu::Stream>(stream_ptr)>>>(
      logits.data<float>(), bias.defined() ? bias.data<float>() : nullptr, hash ? tid2eid.data<int32_t>() : nullptr,
      hash ? token_ids.data_ptr() : nullptr, hash && token_ids.dtype() == DType::i64, hash ? token_ids.stride(0) : 0,
      hash ? tid2eid.size(0) : 0, static_cast<int>(E), static_cast<int>(k), route_scale, experts.data<int32_t>(),
      weights.data<float>());
  gpu::check_launch(op);
}

void swiglu_clamp(const Tensor& g, const Tensor& u, float limit, const Tensor& row_weight, Tensor& h,
                  void* stream_ptr) {
  const long long rows = g.size(0), cols = g.size(1);
  if (rows * cols == 0) return;
  swiglu_kernel<<<gpu::blocks_for(rows * cols, kThreads), kThreads, 0, static_cast<gpu::Stream>(stream_ptr)>>>(
      g.data_ptr(), g.dtype() == DType::bf16, g.stride(0), u.data_ptr(), u.dtype() == DType::bf16, u.stride(0),
      row_weight.defined() ? row_weight.data<float>() : nullptr, limit, h.data<uint16_t>(), h.stride(0), rows, cols);
  gpu::check_launch("swiglu_clamp");
}

void moe_combine(const Tensor& routed, const Tensor& shared, Tensor& out, void* stream_ptr) {
  const long long T = routed.size(0), k = routed.size(1), d = routed.size(2);
  if (T * d == 0) return;
  combine_kernel<<<gpu::blocks_for(T * d, kThreads), kThreads, 0, static_cast<gpu::Stream>(stream_ptr)>>>(
      routed.data_ptr(), routed.dtype() == DType::bf16, shared.defined() ? shared.data_ptr() : nullptr,
      shared.defined() && shared.dtype() == DType::bf16, shared.defined() ? shared.stride(0) : 0, out.data<uint16_t>(),
      out.stride(0), T, k, d);
  gpu::check_launch("moe_combine");
}

void moe_experts(const Tensor& xn, const Tensor& experts, const Tensor& weights, int64_t num_experts, int64_t inter,
                 const Tensor& table, const MoeExpertsConfig& config, Tensor& routed, void* stream_ptr) {
  const char* op = "moe_experts";
  const int64_t T = xn.size(0), d = xn.size(1), k = experts.size(1), E = num_experts, I = inter;
  const int64_t R = T * k;
  if (R == 0 || d == 0) return;
  // Row and column indices are ints on the GPU; element offsets are 64-bit.
  if (R > INT_MAX / 2 || E > INT_MAX / 2 || d > INT_MAX / 2 || I > INT_MAX / 2) {
    throw ContractError(op, "xn", "T * k, E, d and I must each stay below 2^30 on the GPU");
  }
  const auto stream = static_cast<gpu::Stream>(stream_ptr);
  const int64_t chunks = (R + kChunk - 1) / kChunk;
  const size_t count_smem = static_cast<size_t>(E + kChunk) * 4;
  if (count_smem > 48 * 1024) throw ContractError(op, "experts_w", std::to_string(E) + " experts exceed the GPU routing's shared memory");

  // Routing: hist [chunks, E], rank [R], offsets [E + 1], tile_start [E + 1], order [R].
  gpu::Scratch hist(static_cast<size_t>(chunks * E) * 4, stream);
  gpu::Scratch rank(static_cast<size_t>(R) * 4, stream);
  gpu::Scratch offsets(static_cast<size_t>(E + 1) * 4, stream);
  gpu::Scratch tile_start(static_cast<size_t>(E + 1) * 4, stream);
  gpu::Scratch order(static_cast<size_t>(R) * 4, stream);
  const auto* ex = experts.data<int32_t>();
  auto* out = routed.data<uint16_t>();
  route_count_kernel<<<static_cast<unsigned>(chunks), kChunk, count_smem, stream>>>(
      ex, static_cast<int>(R), static_cast<int>(E), hist.as<int>(), rank.as<int>());
  gpu::check_launch("moe_experts (route count)");
  route_offsets_kernel<<<1, kThreads, static_cast<size_t>(E) * 4, stream>>>(
      hist.as<int>(), static_cast<int>(chunks), static_cast<int>(E), offsets.as<int>(), tile_start.as<int>());
  gpu::check_launch("moe_experts (route offsets)");
  route_scatter_kernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(
      ex, static_cast<int>(R), static_cast<int>(E), hist.as<int>(), rank.as<int>(), offsets.as<int>(),
      order.as<int>(), out, d);
  gpu::check_launch("moe_experts (route scatter)");

  // The worst case of Σ_e ceil(count_e / kBM) over counts summing to at most R.
  const int64_t tiles = std::min<int64_t>(R, (R + kBM - 1) / kBM + E);
  const bool int8 = config.format == ExpertFormat::int8;
  const int64_t a_block = config.format == ExpertFormat::fp4 ? config.act_block : config.weight_block;
  const int64_t w_block = config.format == ExpertFormat::fp4 ? config.fp4_block : config.weight_block;

  // Quantized input rows (per token), h by gathered row, and its quantization.
  gpu::Scratch xq(static_cast<size_t>(T * d), stream);
  gpu::Scratch xs(int8 ? static_cast<size_t>(T) * 4 : static_cast<size_t>(T * (d / a_block)), stream);
  gpu::Scratch h(static_cast<size_t>(R * I) * 2, stream);
  gpu::Scratch hq(static_cast<size_t>(R * I), stream);
  gpu::Scratch hs(int8 ? static_cast<size_t>(R) * 4 : static_cast<size_t>(R * (I / a_block)), stream);
  const int* live = offsets.as<int>() + E;  // rows gathered in all
  if (int8) {
    act_quant_int8_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
        xn.data<uint16_t>(), xn.stride(0), nullptr, static_cast<int>(d), xq.as<int8_t>(), xs.as<float>());
  } else {
    act_quant_fp8_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
        xn.data<uint16_t>(), xn.stride(0), nullptr, static_cast<int>(d), static_cast<int>(a_block), xq.as<uint8_t>(),
        xs.as<uint8_t>());
  }
  gpu::check_launch("moe_experts (input quantization)");

  GemmArgs up;
  up.a = xq.as<uint8_t>();
  up.a_scales = xs.as<void>();
  up.K = static_cast<int>(d);
  up.N = static_cast<int>(I);
  up.a_block = static_cast<int>(a_block);
  up.w_block = static_cast<int>(w_block);
  up.ks = int8 ? kMaxKs : stage_for(w_block);
  up.order = order.as<int32_t>();
  up.offsets = offsets.as<int>();
  up.tile_start = tile_start.as<int>();
  up.E = static_cast<int>(E);
  up.k_route = static_cast<int>(k);
  up.table = static_cast<const unsigned long long*>(table.data_ptr());
  up.slot_weight = weights.data<float>();
  up.limit = config.swiglu_limit;
  up.out = h.as<uint16_t>();
  GemmArgs down = up;
  down.a = hq.as<uint8_t>();
  down.a_scales = hs.as<void>();
  down.K = static_cast<int>(I);
  down.N = static_cast<int>(d);
  down.out = out;

  switch (config.format) {
    case ExpertFormat::fp4:
      if (!try_small_batch<true>(up, R, stream)) launch_up<Fmt::fp4>(up, static_cast<int>(tiles), stream);
      break;
    case ExpertFormat::fp8: launch_up<Fmt::fp8>(up, static_cast<int>(tiles), stream); break;
    case ExpertFormat::int8: launch_up<Fmt::int8>(up, static_cast<int>(tiles), stream); break;
  }
  if (int8) {
    act_quant_int8_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        h.as<uint16_t>(), I, live, static_cast<int>(I), hq.as<int8_t>(), hs.as<float>());
  } else {
    act_quant_fp8_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        h.as<uint16_t>(), I, live, static_cast<int>(I), static_cast<int>(a_block), hq.as<uint8_t>(), hs.as<uint8_t>());
  }
  gpu::check_launch("moe_experts (h quantization)");
  switch (config.format) {
    case ExpertFormat::fp4:
      if (!try_small_batch<false>(down, R, stream)) launch_down<Fmt::fp4>(down, static_cast<int>(tiles), stream);
      break;
    case ExpertFormat::fp8: launch_down<Fmt::fp8>(down, static_cast<int>(tiles), stream); break;
    case ExpertFormat::int8: launch_down<Fmt::int8>(down, static_cast<int>(tiles), stream); break;
  }
}

uint64_t moe_small_batch_gemms() { return g_small_batch_gemms.load(std::memory_order_relaxed); }

#if defined(DSV4_MOE_TENSOR_CORE)
MoeGemmPath moe_gemm_path() { return static_cast<MoeGemmPath>(moe_path_switch().get()); }
void set_moe_gemm_path(MoeGemmPath path) { moe_path_switch().set(static_cast<int>(path)); }
const char* moe_gemm_path_name(MoeGemmPath path) { return moe_path_switch().name(static_cast<int>(path)); }
uint64_t moe_tensor_core_gemms() { return g_tc_gemms.load(std::memory_order_relaxed); }
#endif

}  // namespace dsv4::kernels::cuda
