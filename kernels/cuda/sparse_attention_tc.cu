// The tensor-core sparse attention (kernels/cuda/sparse_attention_tc.h: the switch, when it applies,
// the numerics). CUDA only, sm_80 and later (mma.sync).
//
// Grid: (token, head block, split). A block of 8 warps owns HB = 16, 32 or 64 heads of one token (the
// rows of the mma tiles; heads past H are zero rows, never stored) and one split of the token's
// candidate keys (the window's columns first, then the compressed ones, as the host orders them).
// Per tile of 32 candidates (steps 1 and 2's loads for the next tile are issued before step 3 of
// this one, so they are in flight while it is multiplied):
//   1. the tile's locations (-1, out of range and past the split: no key), and for each key the
//      addresses of its value and scale bytes (the page division done once per key);
//   2. the keys dequantized into shared memory as bf16 [32][D] (exact: e4m3 times a power of two,
//      bf16 rope dims), a missing key as zeros;
//   3. S = scale * Q K^T: (HB / 16) x 4 mma tiles of 16 x 8 over D, spread over the warps, into
//      shared f32 (a missing key's logit is masked in step 4); the fragments come from ldmatrix;
//   4. the online softmax, 4 threads per head: the new max m, alpha = exp(m_old - m),
//      p = exp(s - m), l = l * alpha + sum p (f32), P = bf16(p) into shared memory;
//   5. O = O * alpha + P V (V = K, its fragments from ldmatrix.trans): each warp owns one 16-row m
//      tile and D * (HB / 16) / 8 of its columns, in registers (at most 32 n8 tiles, 128 floats per
//      thread, at D 512 and HB 64).
// One split: out = bf16(O / (l + exp(sink - m))), and 0 for a head with no valid key. Several splits
// (few tokens): each writes its O, m and l (f32) to scratch, and the combine kernel merges them in
// split order: M = max m_s, O = sum O_s exp(m_s - M), l = sum l_s exp(m_s - M) + exp(sink - M).
#include "kernels/cuda/sparse_attention_tc.h"
#include "kernels/cuda/mma.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "engine/core/formats.h"
#include "kernels/cuda/path_switch.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/sparse_attention_problem.h"
#include "kernels/norm_rope.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeyTile = 32;                                             // candidates per tile
constexpr int kMaxDim = 512;                                             // head_dim
constexpr int kMaxHeadBlock = 64;                                        // mma rows per block
constexpr int kMaxOutTiles = kMaxDim * (kMaxHeadBlock / 16) / (8 * kWarps);  // n8 tiles per warp
constexpr int kPad = 8;         // bf16 elements of row padding in the Q, K and P tiles (16 bytes)
constexpr int kSPitch = kKeyTile + 1;     // f32 logits row pitch
constexpr int kPPitch = kKeyTile + kPad;  // bf16 P row pitch
constexpr int kMaxSplits = 32;
constexpr int kCombineThreads = 128;
static_assert(kMaxOutTiles == 32, "the accumulators hold D 512 x 64 heads over 8 warps");
constexpr int kMaxItems = kKeyTile * (kMaxDim / 8) / kThreads;  // 8-dim key chunks per thread and tile
static_assert(kThreads % (kMaxDim / 8) == 0, "a thread's key chunks share their dims at every D | 512");

// Constructed at first use: benchmarks name their registrations by path during static initialization.
PathSwitch& path_switch() {
  static PathSwitch s("DSV4_SPARSE_ATTENTION", {"exact", "tensor_core"});
  return s;
}
std::atomic<uint64_t> g_calls{0};
std::atomic<int> g_head_block{0};  // 0: each launch chooses

struct TcParams : AttentionProblem {
  int head_block = 16;
  int splits = 1;
  int split_keys = kKeyTile;  // candidates per split, a multiple of kKeyTile
  float* part_o = nullptr;    // splits > 1: [T][splits][H][D], unnormalised
  float* part_ml = nullptr;   // splits > 1: [T][splits][H][2], the running max and the sum of p
};

// Shared memory of one block, in bytes from its start (every region 16-byte aligned).
struct TcSmem {
  int ld = 0;  // bf16 elements per Q and K row
  unsigned q = 0, k = 0, s = 0, p = 0, m = 0, l = 0, alpha = 0, loc = 0, values = 0, scales = 0, bytes = 0;
};

__host__ __device__ inline TcSmem tc_smem(int head_block, int dim) {
  TcSmem s;
  s.ld = dim + kPad;
  unsigned off = 0;
  const auto take = [&off](unsigned n) {
    const unsigned at = off;
    off += (n + 15u) / 16u * 16u;
    return at;
  };
  s.q = take(static_cast<unsigned>(head_block * s.ld * 2));
  s.k = take(static_cast<unsigned>(kKeyTile * s.ld * 2));
  s.s = take(static_cast<unsigned>(head_block * kSPitch * 4));
  s.p = take(static_cast<unsigned>(head_block * kPPitch * 2));
  s.m = take(static_cast<unsigned>(head_block * 4));
  s.l = take(static_cast<unsigned>(head_block * 4));
  s.alpha = take(static_cast<unsigned>(head_block * 4));
  s.loc = take(2 * kKeyTile * 4);  // two slots: the current tile's and the next one's
  s.values = take(2 * kKeyTile * sizeof(void*));
  s.scales = take(2 * kKeyTile * sizeof(void*));
  s.bytes = off;
  return s;
}

__device__ inline float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }

__device__ inline uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Eight e4m3 codes (two words, the first code in the low byte) times their block's power-of-two
// scale, as eight bf16 (exact).
__device__ inline uint4 dequant8(uint32_t lo, uint32_t hi, float scale) {
  const uint32_t words[2] = {lo, hi};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto pair = static_cast<__nv_fp8x2_storage_t>((words[i / 2] >> (16 * (i % 2))) & 0xffffu);
    const __half2 h(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
    const float2 f = __half22float2(h);
    out[i] = pack_bf16x2(f.x * scale, f.y * scale);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// kTiles: the accumulators' n8 tiles per warp (at least D * (HB / 16) / 64): registers for 8 tiles
// and the next tile's key bytes in flight leave room for 2 blocks per SM; 16 or 32 tiles allow one.
template <int kTiles>
__global__ void __launch_bounds__(kThreads, kTiles <= 8 ? 2 : 1)
    sparse_attention_tc_kernel(TcParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TcSmem L = tc_smem(p.head_block, p.dim);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem + L.q);  // [HB][ld]
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem + L.k);  // [kKeyTile][ld]
  float* s_s = reinterpret_cast<float*>(smem + L.s);        // [HB][kSPitch]
  uint16_t* p_s = reinterpret_cast<uint16_t*>(smem + L.p);  // [HB][kPPitch]
  float* m_s = reinterpret_cast<float*>(smem + L.m);
  float* l_s = reinterpret_cast<float*>(smem + L.l);
  float* alpha_s = reinterpret_cast<float*>(smem + L.alpha);
  int* loc_s = reinterpret_cast<int*>(smem + L.loc);
  const uint8_t** values_s = reinterpret_cast<const uint8_t**>(smem + L.values);  // [2][kKeyTile]
  const uint8_t** scales_s = reinterpret_cast<const uint8_t**>(smem + L.scales);  // [2][kKeyTile]

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int mat = lane / 8, mat_row = lane % 8;  // the ldmatrix matrix and row this lane addresses
  const int token = static_cast<int>(blockIdx.x);
  const int HB = p.head_block, D = p.dim, ld = L.ld;
  const int h0 = static_cast<int>(blockIdx.y) * HB;
  const int split = static_cast<int>(blockIdx.z);
  const int mtiles = HB / 16;

  const int swa_len = attention_clamp_len(p.swa, token);
  const int candidates = swa_len + attention_clamp_len(p.extra, token);
  const int begin = split * p.split_keys;
  const int end = min(candidates, begin + p.split_keys);

  // Q (zero rows for heads past H) and the running state.
  const int row_chunks = D / 8;
  for (int e = tid; e < HB * row_chunks; e += kThreads) {
    const int r = e / row_chunks, c = e - r * row_chunks;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (h0 + r < p.heads) {
      v = *reinterpret_cast<const uint4*>(p.q + (static_cast<long long>(token) * p.heads + h0 + r) * D + c * 8);
    }
    *reinterpret_cast<uint4*>(q_s + r * ld + c * 8) = v;
  }
  for (int r = tid; r < HB; r += kThreads) {
    m_s[r] = neg_inf();
    l_s[r] = 0.0f;
    alpha_s[r] = 1.0f;
  }

  // This warp's output: one m tile, `ntiles` n8 tiles from column col0.
  const int warps_per_mtile = kWarps / mtiles;
  const int my_mtile = warp / warps_per_mtile;
  const int ntiles = D / warps_per_mtile / 8;
  const int col0 = (warp % warps_per_mtile) * ntiles * 8;
  float acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  // Step 1 for the tile at c0 into slot `slot` of the location arrays (threads < kKeyTile).
  const auto locate = [&](int c0, int slot) {
    if (tid < kKeyTile) {
      int loc = -1;
      const uint8_t* values = nullptr;
      const uint8_t* scales = nullptr;
      if (tid < end - c0) {
        bool from_swa = false;
        loc = attention_candidate(p, token, c0 + tid, swa_len, &from_swa);
        if (loc >= 0) values = attention_entry_values(p, from_swa ? p.swa : p.extra, loc, &scales);
      }
      loc_s[slot * kKeyTile + tid] = loc;
      values_s[slot * kKeyTile + tid] = values;
      scales_s[slot * kKeyTile + tid] = scales;
    }
  };
  // Step 2's loads, 8 dims per item (a nope chunk lies inside one scale block). kThreads is a
  // multiple of row_chunks, so a thread's items share its dims d0 and differ in the key. A missing
  // key loads as zero codes with scale code 0, which convert to zeros.
  const int d0 = (tid % row_chunks) * 8;
  const bool nope_dims = d0 < p.nope;
  const int scale_at = nope_dims ? d0 / p.scale_block : 0;
  const int key0 = tid / row_chunks, key_step = kThreads / row_chunks;
  uint4 raw[kMaxItems];
  const auto load_keys = [&](int slot) {
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) {
      const int k = key0 + i * key_step;
      raw[i] = make_uint4(0u, 0u, 0u, 0u);
      const uint8_t* values = k < kKeyTile ? values_s[slot * kKeyTile + k] : nullptr;
      if (values != nullptr) {
        if (nope_dims) {
          const uint2 codes = *reinterpret_cast<const uint2*>(values + d0);
          raw[i] = make_uint4(codes.x, codes.y, scales_s[slot * kKeyTile + k][scale_at], 0u);
        } else {
          const uint2* rope = reinterpret_cast<const uint2*>(values + p.nope + 2 * (d0 - p.nope));
          const uint2 lo = rope[0], hi = rope[1];
          raw[i] = make_uint4(lo.x, lo.y, hi.x, hi.y);
        }
      }
    }
  };

  // The pipeline: tile i + 1's locations and key bytes are fetched while tile i is multiplied.
  locate(begin, 0);
  __syncthreads();
  load_keys(0);
  int slot = 0;
  for (int c0 = begin; c0 < end; c0 += kKeyTile, slot ^= 1) {
    const bool more = c0 + kKeyTile < end;
    __syncthreads();  // the previous tile's readers are done; Q and the state are in place
    // Step 2: the loaded keys converted into shared memory.
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) {
      const int k = key0 + i * key_step;
      if (k < kKeyTile) {
        const uint4 v = nope_dims ? dequant8(raw[i].x, raw[i].y, ue8m0_to_f32(static_cast<uint8_t>(raw[i].z))) : raw[i];
        *reinterpret_cast<uint4*>(k_s + k * ld + d0) = v;
      }
    }
    if (more) locate(c0 + kKeyTile, slot ^ 1);
    __syncthreads();
    if (more) load_keys(slot ^ 1);  // in flight through steps 3 to 5
    const int* tile_loc = loc_s + slot * kKeyTile;

    // Step 3: S = scale * Q K^T. A (Q, rows m0..m0 + 15): matrix i is rows + 8 (i % 2), dims + 8 (i / 2);
    // B (K, keys n0..n0 + 7): matrix i is dims k0 + 8 i, two k steps per ldmatrix.
    for (int tile = warp; tile < mtiles * (kKeyTile / 8); tile += kWarps) {
      const int m0 = (tile / (kKeyTile / 8)) * 16;
      const int n0 = (tile % (kKeyTile / 8)) * 8;
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint16_t* qa = q_s + (m0 + (mat % 2) * 8 + mat_row) * ld + (mat / 2) * 8;
      const uint16_t* kb = k_s + (n0 + mat_row) * ld + mat * 8;
      for (int k0 = 0; k0 < D; k0 += 32) {
        uint32_t a[4], a_next[4], b[4];
        ldmatrix_x4<false>(a, qa + k0);
        ldmatrix_x4<false>(a_next, qa + k0 + 16);
        ldmatrix_x4<false>(b, kb + k0);
        mma_16816(c, a[0], a[1], a[2], a[3], b[0], b[1]);
        mma_16816(c, a_next[0], a_next[1], a_next[2], a_next[3], b[2], b[3]);
      }
      float* srow = s_s + (m0 + g) * kSPitch + n0 + 2 * t4;
      srow[0] = c[0] * p.scale;
      srow[1] = c[1] * p.scale;
      srow[8 * kSPitch] = c[2] * p.scale;
      srow[8 * kSPitch + 1] = c[3] * p.scale;
    }
    __syncthreads();

    // Step 4: the online softmax; whole warps take part (4 * HB is a multiple of 32).
    if (tid < 4 * HB) {
      const int r = tid / 4, part = tid % 4;
      const float* srow = s_s + r * kSPitch + part * 8;
      float sv[8];
      bool valid[8];
      float mx = neg_inf();
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        valid[j] = tile_loc[part * 8 + j] >= 0;
        sv[j] = valid[j] ? srow[j] : neg_inf();
        mx = mx < sv[j] ? sv[j] : mx;  // the host's std::max predicate
      }
#pragma unroll
      for (int width = 1; width < 4; width *= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, mx, width);
        mx = mx < other ? other : mx;
      }
      const float m_old = m_s[r];
      const float m_new = m_old < mx ? mx : m_old;
      // Every valid key gets p = exp(s - m), as on the host: a NaN logit (a corrupt entry) makes l and
      // the output NaN, and l stays 0 exactly while the split has no valid key.
      const float alpha = m_old == m_new ? 1.0f : expf(m_old - m_new);
      float sum = 0.0f;
      uint16_t* prow = p_s + r * kPPitch + part * 8;
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        const float pa = valid[j] ? expf(sv[j] - m_new) : 0.0f;
        const float pb = valid[j + 1] ? expf(sv[j + 1] - m_new) : 0.0f;
        sum += pa;
        sum += pb;
        *reinterpret_cast<uint32_t*>(prow + j) = pack_bf16x2(pa, pb);
      }
#pragma unroll
      for (int width = 1; width < 4; width *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, width);
      if (part == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // Step 5: O = O * alpha + P V.
    {
      const int row = my_mtile * 16 + g;
      const float a_lo = alpha_s[row], a_hi = alpha_s[row + 8];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (j < ntiles) {
          acc[j][0] *= a_lo;
          acc[j][1] *= a_lo;
          acc[j][2] *= a_hi;
          acc[j][3] *= a_hi;
        }
      }
      // A (P): matrix i is rows + 8 (i % 2), keys + 8 (i / 2). B (V, transposed): matrix i is keys
      // ks + 8 (i % 2), columns + 8 (i / 2): the b0, b1 of two n8 tiles per ldmatrix.
      const uint16_t* pa = p_s + (my_mtile * 16 + (mat % 2) * 8 + mat_row) * kPPitch + (mat / 2) * 8;
#pragma unroll
      for (int ks = 0; ks < kKeyTile; ks += 16) {
        uint32_t a[4];
        ldmatrix_x4<false>(a, pa + ks);
        const uint16_t* vb = k_s + (ks + (mat % 2) * 8 + mat_row) * ld + col0 + (mat / 2) * 8;
#pragma unroll
        for (int j = 0; j < kTiles; j += 2) {
          if (j < ntiles) {
            // An odd last tile: matrices 2 and 3 read tile j again, unused.
            const int back = j + 1 < ntiles ? 0 : (mat / 2) * 8;
            uint32_t b[4];
            ldmatrix_x4<true>(b, vb + j * 8 - back);
            mma_16816(acc[j], a[0], a[1], a[2], a[3], b[0], b[1]);
            if (j + 1 < ntiles) mma_16816(acc[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
          }
        }
      }
    }
  }
  __syncthreads();  // the last tile's state

  const int row = my_mtile * 16 + g;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row + 8 * half;
    const int h = h0 + r;
    if (h >= p.heads) continue;
    const float m = m_s[r], l = l_s[r];
    const long long head_row = static_cast<long long>(token) * p.heads + h;
    if (p.splits == 1) {
      const bool empty = l == 0.0f;  // no valid key (a valid key's p is 1 at the max, or NaN)
      const float den = empty ? 1.0f : l + expf(p.sink[h] - m);
      uint16_t* o = p.out + head_row * D + col0 + 2 * t4;
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (j < ntiles) {
          const float x0 = empty ? 0.0f : acc[j][2 * half] / den;
          const float x1 = empty ? 0.0f : acc[j][2 * half + 1] / den;
          *reinterpret_cast<uint32_t*>(o + 8 * j) = pack_bf16x2(x0, x1);
        }
      }
    } else {
      const long long part_row = (static_cast<long long>(token) * p.splits + split) * p.heads + h;
      float* o = p.part_o + part_row * D + col0 + 2 * t4;
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (j < ntiles) *reinterpret_cast<float2*>(o + 8 * j) = make_float2(acc[j][2 * half], acc[j][2 * half + 1]);
      }
      if (col0 == 0 && t4 == 0) {
        p.part_ml[part_row * 2] = m;
        p.part_ml[part_row * 2 + 1] = l;
      }
    }
  }
}

// One block per (head, token): the splits merged in split order.
__global__ void __launch_bounds__(kCombineThreads) sparse_attention_tc_combine(TcParams p) {
  const int h = static_cast<int>(blockIdx.x);
  const int token = static_cast<int>(blockIdx.y);
  const int D = p.dim;
  const auto part_row = [&](int s) { return (static_cast<long long>(token) * p.splits + s) * p.heads + h; };
  // A split with no valid key has l == 0 exactly and is left out; any other one counts (a NaN l
  // from a corrupt entry makes the output NaN, as on the host).
  float m = neg_inf();
  bool any = false;
  for (int s = 0; s < p.splits; ++s) {
    if (p.part_ml[part_row(s) * 2 + 1] == 0.0f) continue;
    const float ms = p.part_ml[part_row(s) * 2];
    m = m < ms ? ms : m;
    any = true;
  }
  uint16_t* out = p.out + (static_cast<long long>(token) * p.heads + h) * D;
  if (!any) {
    for (int d = static_cast<int>(threadIdx.x); d < D; d += kCombineThreads) out[d] = 0;  // no valid key
    return;
  }
  const auto weight = [&](int s) { return expf(p.part_ml[part_row(s) * 2] - m); };
  float den = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const float ls = p.part_ml[part_row(s) * 2 + 1];
    if (ls != 0.0f) den += ls * weight(s);
  }
  den += expf(p.sink[h] - m);
  for (int d = static_cast<int>(threadIdx.x); d < D; d += kCombineThreads) {
    float o = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      if (p.part_ml[part_row(s) * 2 + 1] != 0.0f) o += p.part_o[part_row(s) * D + d] * weight(s);
    }
    out[d] = f32_to_bf16(o / den);
  }
}

// ---- host -------------------------------------------------------------------------------------------

struct DeviceInfo {
  bool known = false;
  int sms = 0, smem_optin = 0;
  bool mma = false;  // the kernel's mma.sync runs here (mma_runs)
};

// Whether the kernel runs here, the SM count and shared-memory opt-in; on first use per device also
// lets the kernel take as much dynamic shared memory as the largest block needs (or the device has).
DeviceInfo device_info() {
  static std::mutex mu;
  static std::array<DeviceInfo, 64> infos{};
  int device = 0;
  gpu::check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= static_cast<int>(infos.size())) return DeviceInfo{};
  DeviceInfo& info = infos[static_cast<size_t>(device)];
  if (!info.known) {
    info.mma = mma_runs(reinterpret_cast<const void*>(sparse_attention_tc_kernel<kMaxOutTiles>));
    info.sms = gpu::sm_count();
    info.smem_optin = static_cast<int>(gpu::smem_optin_limit());
    if (info.mma) {
      const int most = std::min(info.smem_optin, static_cast<int>(tc_smem(kMaxHeadBlock, kMaxDim).bytes));
      for (const void* kernel : {reinterpret_cast<const void*>(sparse_attention_tc_kernel<8>),
                                 reinterpret_cast<const void*>(sparse_attention_tc_kernel<16>),
                                 reinterpret_cast<const void*>(sparse_attention_tc_kernel<kMaxOutTiles>)}) {
        gpu::allow_smem(kernel, static_cast<size_t>(most), "cudaFuncSetAttribute (sparse_attention_tc)");
      }
      info.smem_optin = most;
    }
    info.known = true;
  }
  return info;
}

using gpu::aligned;
using gpu::ceil_div;

}  // namespace

SparseAttentionPath sparse_attention_path() { return static_cast<SparseAttentionPath>(path_switch().get()); }
void set_sparse_attention_path(SparseAttentionPath path) { path_switch().set(static_cast<int>(path)); }
const char* sparse_attention_path_name(SparseAttentionPath path) { return path_switch().name(static_cast<int>(path)); }
uint64_t sparse_attention_tensor_core_calls() { return g_calls.load(std::memory_order_relaxed); }
void set_sparse_attention_tc_head_block(int heads) {
  if (heads != 0 && heads != 16 && heads != 32 && heads != kMaxHeadBlock) {
    throw std::invalid_argument("set_sparse_attention_tc_head_block: " + std::to_string(heads) +
                                " is not 0, 16, 32 or 64");
  }
  g_head_block.store(heads, std::memory_order_relaxed);
}
int sparse_attention_tc_head_block() { return g_head_block.load(std::memory_order_relaxed); }

bool sparse_attention_tensor_core(const SparseAttentionArgs& a, void* stream) {
  const int64_t T = a.q.size(0), H = a.q.size(1), D = a.q.size(2);
  const Model1Layout layout = model1_layout(kSparseAttentionOp, D, a.rope_dim, a.kv_block, "kv_block");
  if (D % 64 != 0 || D > kMaxDim || layout.nope_dim() % 8 != 0 || layout.scale_block % 8 != 0) return false;
  if (!aligned(a.q.data<const uint16_t>(), 16) || !aligned(a.out.data<uint16_t>(), 16)) return false;
  if (!aligned(a.swa_cache.data<const uint8_t>(), 8)) return false;
  if (a.extra_cache.defined() && !aligned(a.extra_cache.data<const uint8_t>(), 8)) return false;
  if (T > 0x7fffffffLL || H > 65535) return false;
  const DeviceInfo info = device_info();
  if (!info.mma) return false;

  // Heads per block: all of them up to 64, fewer while the tokens leave SMs idle (each block then
  // dequantizes the keys again, from L2) or the shared memory does not fit.
  int hb = H <= 16 ? 16 : (H <= 32 ? 32 : kMaxHeadBlock);
  const auto blocks = [&](int b) { return T * ceil_div(H, b); };
  const auto too_big = [&](int b) { return static_cast<int>(tc_smem(b, static_cast<int>(D)).bytes) > info.smem_optin; };
  const int forced = sparse_attention_tc_head_block();
  if (forced != 0) {
    hb = std::min(hb, forced);
    while (hb > 16 && too_big(hb)) hb /= 2;
  } else {
    while (hb > 16 && (blocks(hb) < info.sms || too_big(hb))) hb /= 2;
  }
  const unsigned smem = tc_smem(hb, static_cast<int>(D)).bytes;
  if (static_cast<int>(smem) > info.smem_optin) return false;
  // Splits of the candidates while the blocks still leave SMs idle (decode at small batch).
  const int64_t max_candidates = a.swa_indices.size(1) + (a.extra_cache.defined() ? a.extra_indices.size(1) : 0);
  const int64_t tiles = std::max<int64_t>(1, ceil_div(max_candidates, kKeyTile));
  int64_t splits = 1;
  if (blocks(hb) < info.sms) splits = std::min<int64_t>({ceil_div(info.sms, blocks(hb)), tiles, kMaxSplits});
  const int64_t split_tiles = ceil_div(tiles, splits);
  splits = ceil_div(tiles, split_tiles);

  TcParams p;
  fill_attention_problem(p, a, layout);
  p.head_block = hb;
  p.splits = static_cast<int>(splits);
  p.split_keys = static_cast<int>(split_tiles * kKeyTile);

  const auto st = static_cast<gpu::Stream>(stream);
  const size_t part_floats = splits > 1 ? static_cast<size_t>(T * splits * H * (D + 2)) : 0;
  gpu::Scratch part(part_floats * sizeof(float), st);
  if (splits > 1) {
    p.part_o = part.as<float>();
    p.part_ml = p.part_o + T * splits * H * D;
  }
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(ceil_div(H, hb)), static_cast<unsigned>(splits));
  const int64_t tiles_per_warp = D * (hb / 16) / 64;
  if (tiles_per_warp <= 8) {
    sparse_attention_tc_kernel<8><<<grid, kThreads, smem, st>>>(p);
  } else if (tiles_per_warp <= 16) {
    sparse_attention_tc_kernel<16><<<grid, kThreads, smem, st>>>(p);
  } else {
    sparse_attention_tc_kernel<kMaxOutTiles><<<grid, kThreads, smem, st>>>(p);
  }
  gpu::check_launch(kSparseAttentionOp);
  if (splits > 1) {
    sparse_attention_tc_combine<<<dim3(static_cast<unsigned>(H), static_cast<unsigned>(T)), kCombineThreads, 0, st>>>(p);
    gpu::check_launch(kSparseAttentionOp);
  }
  g_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace dsv4::kernels::cuda
