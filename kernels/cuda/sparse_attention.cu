// CUDA (and, through port.h, HIP) implementation of kernels/sparse_attention.h: attention with the
// sink over the MODEL1 SWA cache and the optional compressed ("extra") cache.
//
// Decomposition: one thread block per (token, group of heads). The token's candidate keys (the SWA
// row's first swa_len columns, then the extra row's first extra_len columns; -1 and out-of-range
// indices are skipped) are streamed in tiles of `tile` keys: the tile's entries are dequantized
// into shared memory (e4m3 * ue8m0 scale for the nope dims, bf16 for the rope dims) and every head
// of the group reads them. Two passes over the tiles, as the host states the numerics (max first,
// then P): pass 0 computes the logits and their max m; pass 1 recomputes the same logits (the same
// code on the same values, so bit-identical), then p = exp(l - m), the denominator and P.V.
//
// Numerics, in the host kernel's order (kernels/host/sparse_attention.cpp):
//   - q . k: one thread per (head, key), a sequential f32 sum over the D dims of rounded products
//     (no FMA contraction: kernels/cuda/libm.h's rounded operations), then scale * dot;
//   - the max over the valid keys in key order, with the host's std::max predicate;
//   - p = exp(l - m): libm.h's libm_expf, glibc's expf operation for operation (the host calls
//     std::exp(float), which is not correctly rounded, so neither CUDA's expf nor a double exp
//     rounded to f32 would equal it);
//   - the denominator: one thread per head adds the f32 p in key order, then exp(sink - m);
//   - P.V: one thread per output element adds round_bf16(p) * v in key order (f32);
//   - out = bf16(acc / denominator); a token with no valid key writes 0.
// So the outputs equal the host's bit for bit, and every reduction has a fixed order, so reruns are
// bitwise identical.
#include "kernels/sparse_attention.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/libm.h"

#include <algorithm>
#include <cstdint>

#include "engine/core/formats.h"
#include "kernels/cuda/sparse_attention_problem.h"
#include "kernels/norm_rope.h"
#if !defined(__HIPCC__)
#include "kernels/cuda/sparse_attention_tc.h"  // the tensor-core path: CUDA only
#endif

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;                                  // a multiple of 64: whole warps on CUDA and HIP
constexpr int kMaxAcc = 16;                                    // output elements per thread (registers)
constexpr int kMaxGroupElements = kThreads * kMaxAcc;          // group * D <= this
constexpr int kMaxTile = 64;                                   // keys per shared-memory tile
constexpr long long kSmemBudget = 48 * 1024;                   // bytes, no opt-in attribute needed
constexpr int kMinBlocks = 256;                                // below this, smaller head groups
static_assert(kMaxGroupElements >= kSparseAttentionGpuMaxDim, "one head per block must fit the accumulators");

using namespace gpu_math;  // rounded operations, glibc's expf

struct Params : AttentionProblem {
  int group = 1;  // heads per block
  int tile = 1;   // keys per tile
};

// Shared memory per block, in 4-byte words: q [group][D], keys [tile][D + 1] (the odd row pitch
// keeps threads of consecutive keys on distinct banks), logits/p and bf16(p) [group][tile], m and
// the denominator [group], the tile's locations and source caches [tile], the valid-key count.
long long smem_words(int group, int tile, int dim) {
  return static_cast<long long>(group) * dim + 2LL * group + 1 +
         static_cast<long long>(tile) * (dim + 1 + 2LL * group + 2);
}

__global__ void __launch_bounds__(kThreads) sparse_attention_kernel(Params p) {
  extern __shared__ float smem[];
  const int tid = static_cast<int>(threadIdx.x);
  const int t = static_cast<int>(blockIdx.x);
  const int h0 = static_cast<int>(blockIdx.y) * p.group;
  const int groups = min(p.group, p.heads - h0);  // heads of this block
  const int D = p.dim;
  const int ld = D + 1;
  const int KT = p.tile;

  float* q_s = smem;                   // [group][D]
  float* k_s = q_s + p.group * D;      // [tile][ld]
  float* l_s = k_s + KT * ld;          // [group][tile]: logits, then p (f32)
  float* w_s = l_s + p.group * KT;     // [group][tile]: round_bf16(p)
  float* m_s = w_s + p.group * KT;     // [group]
  float* den_s = m_s + p.group;        // [group]
  int* loc_s = reinterpret_cast<int*>(den_s + p.group);  // [tile]: entry index, -1 = no key
  int* src_s = loc_s + KT;                                // [tile]: 0 SWA, 1 extra
  int* count_s = src_s + KT;                              // valid keys of the token

  const int swa_len = attention_clamp_len(p.swa, t);
  const int extra_len = attention_clamp_len(p.extra, t);
  const int candidates = swa_len + extra_len;

  const long long head_base = (static_cast<long long>(t) * p.heads + h0) * D;  // the group's heads are adjacent
  const int elements = groups * D;
  for (int e = tid; e < elements; e += kThreads) q_s[e] = bf16_to_f32(p.q[head_base + e]);
  if (tid < groups) {
    m_s[tid] = f32_from_bits(0xFF800000u);  // -inf
    den_s[tid] = 0.0f;
  }
  if (tid == 0) *count_s = 0;
  __syncthreads();

  float acc[kMaxAcc];
#pragma unroll
  for (int r = 0; r < kMaxAcc; ++r) acc[r] = 0.0f;

  for (int pass = 0; pass < 2; ++pass) {
    for (int c0 = 0; c0 < candidates; c0 += KT) {
      const int kt = min(KT, candidates - c0);
      // The tile's locations, in candidate order; anything outside its cache is no key.
      if (tid < kt) {
        bool from_swa = false;
        loc_s[tid] = attention_candidate(p, t, c0 + tid, swa_len, &from_swa);
        src_s[tid] = from_swa ? 0 : 1;
      }
      __syncthreads();
      // Dequantize the tile (consecutive threads read consecutive bytes of one entry).
      for (int e = tid; e < kt * D; e += kThreads) {
        const int k = e / D;
        const int d = e - k * D;
        const int loc = loc_s[k];
        float v = 0.0f;
        if (loc >= 0) {
          const uint8_t* scales = nullptr;
          const uint8_t* values = attention_entry_values(p, src_s[k] == 0 ? p.swa : p.extra, loc, &scales);
          if (d < p.nope) {
            v = fmul(e4m3fn_to_f32(values[d]), ue8m0_to_f32(scales[d / p.scale_block]));
          } else {
            const int i = d - p.nope;
            v = bf16_to_f32(static_cast<uint16_t>(values[p.nope + 2 * i] | (values[p.nope + 2 * i + 1] << 8)));
          }
        }
        k_s[k * ld + d] = v;
      }
      __syncthreads();
      // Logits: one thread per (head, key), the host's sequential dot product.
      for (int e = tid; e < groups * kt; e += kThreads) {
        const int g = e / kt;
        const int k = e - g * kt;
        if (loc_s[k] < 0) continue;
        const float* qg = q_s + g * D;
        const float* key = k_s + k * ld;
        float dot = 0.0f;
        for (int i = 0; i < D; ++i) dot = fadd(dot, fmul(qg[i], key[i]));
        l_s[g * KT + k] = fmul(p.scale, dot);
      }
      __syncthreads();
      if (pass == 0) {
        // The max per head in key order (std::max(m, l) == (m < l) ? l : m), and the valid count.
        if (tid < groups) {
          float m = m_s[tid];
          for (int k = 0; k < kt; ++k) {
            if (loc_s[k] < 0) continue;
            const float l = l_s[tid * KT + k];
            m = m < l ? l : m;
          }
          m_s[tid] = m;
        }
        if (tid == 0) {
          int n = *count_s;
          for (int k = 0; k < kt; ++k) n += loc_s[k] >= 0 ? 1 : 0;
          *count_s = n;
        }
      } else {
        for (int e = tid; e < groups * kt; e += kThreads) {
          const int g = e / kt;
          const int k = e - g * kt;
          if (loc_s[k] < 0) continue;
          const float pr = libm_expf(fsub(l_s[g * KT + k], m_s[g]));
          l_s[g * KT + k] = pr;
          w_s[g * KT + k] = round_bf16(pr);  // P is bf16 before P.V
        }
        __syncthreads();
        // The denominator sums the f32 probabilities in key order.
        if (tid < groups) {
          float den = den_s[tid];
          for (int k = 0; k < kt; ++k) {
            if (loc_s[k] >= 0) den = fadd(den, l_s[tid * KT + k]);
          }
          den_s[tid] = den;
        }
        // P.V (V = K): thread tid owns elements tid + r * kThreads of the group's [groups][D] output.
        for (int k = 0; k < kt; ++k) {
          if (loc_s[k] < 0) continue;
          const float* key = k_s + k * ld;
#pragma unroll
          for (int r = 0; r < kMaxAcc; ++r) {
            const int e = tid + r * kThreads;
            if (e < elements) {
              const int g = e / D;
              acc[r] = fadd(acc[r], fmul(w_s[g * KT + k], key[e - g * D]));
            }
          }
        }
      }
      __syncthreads();  // the next tile overwrites loc_s, k_s, l_s and w_s
    }
    if (pass == 0 && *count_s == 0) {
      // No valid key: the output is 0 (the sink alone carries no value). Uniform across the block.
      for (int e = tid; e < elements; e += kThreads) p.out[head_base + e] = f32_to_bf16(0.0f);
      return;
    }
  }
  // The sink only enlarges the denominator, added after the last key.
  if (tid < groups) den_s[tid] = fadd(den_s[tid], libm_expf(fsub(p.sink[h0 + tid], m_s[tid])));
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kMaxAcc; ++r) {
    const int e = tid + r * kThreads;
    if (e < elements) p.out[head_base + e] = f32_to_bf16(fdiv(acc[r], den_s[e / D]));
  }
}

}  // namespace

void sparse_attention(const SparseAttentionArgs& a, void* stream) {
  const int64_t tokens = a.q.size(0);
  const int64_t heads = a.q.size(1);
  const int64_t dim = a.q.size(2);
  if (tokens == 0 || heads == 0) return;
#if !defined(__HIPCC__)
  // DSV4_SPARSE_ATTENTION=tensor_core: the tensor-core path where the problem fits (sparse_attention_tc.h).
  if (sparse_attention_path() == SparseAttentionPath::tensor_core && sparse_attention_tensor_core(a, stream)) return;
#endif
  const Model1Layout layout = model1_layout(kSparseAttentionOp, dim, a.rope_dim, a.kv_block, "kv_block");

  Params p;
  fill_attention_problem(p, a, layout);

  // Heads per block: as many as the accumulators hold, fewer when that leaves too few blocks
  // (decode). The numerics do not depend on the grouping.
  int64_t group = std::min<int64_t>(heads, std::max<int64_t>(1, kMaxGroupElements / dim));
  while (group > 1 && tokens * ((heads + group - 1) / group) < kMinBlocks) group = (group + 1) / 2;
  // Keys per tile: what the shared-memory budget leaves after the group's queries.
  const long long fixed_words = smem_words(static_cast<int>(group), 0, p.dim);
  const long long per_key_words = smem_words(static_cast<int>(group), 1, p.dim) - fixed_words;
  const long long tile = std::min<long long>(kMaxTile, (kSmemBudget / 4 - fixed_words) / per_key_words);
  p.group = static_cast<int>(group);
  p.tile = static_cast<int>(std::max<long long>(1, tile));
  const size_t smem = static_cast<size_t>(smem_words(p.group, p.tile, p.dim)) * 4;

  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>((heads + group - 1) / group));
  sparse_attention_kernel<<<grid, kThreads, smem, static_cast<gpu::Stream>(stream)>>>(p);
  gpu::check_launch(kSparseAttentionOp);
}

}  // namespace dsv4::kernels::cuda
