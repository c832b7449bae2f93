// CUDA (and, through port.h, HIP) implementation of kernels/compressor.h: the pool, the state write
// and the cache store of the KV compressor, reading the encoded plan (compress_plan_words) from
// device memory when they run. The block count B lives in the plan only, so each launch covers the
// output's capacity and the CUDA blocks past B return.
//
// Every value equals compressor_pool_host's (and model1_pack's) bit for bit: the same operations in
// the same order, each rounded once (kernels/cuda/libm.h's operations, never contracted into an
// FMA), the double sums of the reference run by one thread in source / channel order, and exp, sin
// and cos through libm.h's glibc-equivalent functions. Per compress block (one CUDA block): a thread
// per channel pools the S sources, then thread 0 sums the squares for the RMSNorm, then the threads
// share the RoPE pairs, the Hadamard butterflies (one stage at a time) and the quantization blocks.
#include "kernels/compressor.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/libm.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "engine/core/error.h"
#include "engine/core/formats.h"

#if defined(__HIPCC__)
#pragma clang fp contract(off)
#endif

namespace dsv4::kernels {
namespace {

using namespace gpu_math;  // rounded operations, std_max / std_clamp, glibc's expf / sinf / cosf

// A state row's float at a byte address: a direct load when rows keep 4-byte alignment, else bytes.
__device__ inline uint32_t load_u32(const uint8_t* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const uint32_t*>(p);
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
__device__ inline void store_u32(uint8_t* p, uint32_t v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<uint32_t*>(p) = v;
    return;
  }
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

// ---- the encoded plan ----------------------------------------------------------------------------

// The header of an encoded plan, valid only when it fits the buffer and S matches the ratio (what
// the host entry points refuse with a ContractError, the kernels answer by writing nothing).
struct PlanHeader {
  long long T = 0, B = 0, S = 0;
  bool ok = false;
  __device__ long long write_rows() const { return 3 + T; }
  __device__ long long blocks() const { return 3 + 2 * T; }
  __device__ long long sources() const { return 3 + 2 * T + 3 * B; }
  __device__ long long dest() const { return 3 + 2 * T + 3 * B + 2 * B * S; }
};

__device__ inline PlanHeader read_plan_header(const int64_t* w, long long words, long long S_expected) {
  PlanHeader h;
  if (words < 3) return h;
  h.T = w[0];
  h.B = w[1];
  h.S = w[2];
  if (h.T < 0 || h.B < 0 || h.S != S_expected || h.T > words || h.B > words) return h;
  h.ok = 3 + 2 * h.T + 3 * h.B + 2 * h.B * h.S + h.B <= words;
  return h;
}

constexpr int kThreads = 256;  // a multiple of 64: whole warps on CUDA and wavefronts on HIP
constexpr int kKindNone = static_cast<int>(CompressSource::Kind::none);
constexpr int kKindState = static_cast<int>(CompressSource::Kind::state);
constexpr int kKindInput = static_cast<int>(CompressSource::Kind::input);

// ---- compressor_pool -------------------------------------------------------------------------------

struct PoolArgs {
  const int64_t* plan;
  long long plan_words;
  long long ratio;
  int coff;
  int S;
  const float* kv;
  const float* score;
  long long kv_rows;
  const uint8_t* state;
  long long state_rows;
  long long row_bytes;
  bool state_aligned;
  long long kv_offset[2];
  long long score_offset[2];
  int hd;
  int rd;
  const float* norm;
  const float* freqs;
  bool bf16_act;
  bool rotate;
  CompressQuant quant;
  int quant_block;
  bool fp8_rounding;
  double eps;
  float* out;
};

__device__ inline float act(bool bf16, float x) { return bf16 ? round_bf16(x) : x; }

// fp8_quant_dequant_blocks / fp4_quant_dequant_blocks of host_common.h on o[0, n), one block per
// thread, then the activation rounding of the span.
__device__ inline void quant_blocks(float* o, int n, int block, bool fp4, bool round_to_e4m3, bool bf16) {
  constexpr float kInv448 = 1.0f / 448.0f;
  constexpr float kInv6 = 1.0f / 6.0f;
  const int count = (n + block - 1) / block;
  for (int q = static_cast<int>(threadIdx.x); q < count; q += static_cast<int>(blockDim.x)) {
    const int b = q * block;
    const int end = n < b + block ? n : b + block;
    float amax = 0.0f;
    for (int i = b; i < end; ++i) amax = std_max(amax, fabsf(o[i]));
    if (fp4) {
      const float s = round_ue8m0_ceil(fmul(std_max(amax, 6.0f * 0x1.0p-126f), kInv6));
      for (int i = b; i < end; ++i) o[i] = act(bf16, fmul(round_e2m1(std_clamp(fdiv(o[i], s), -6.0f, 6.0f)), s));
    } else {
      const float s = round_ue8m0_ceil(fmul(std_max(amax, 1e-4f), kInv448));
      for (int i = b; i < end; ++i) {
        const float q8 = std_clamp(fdiv(o[i], s), -448.0f, 448.0f);
        o[i] = act(bf16, fmul(round_to_e4m3 ? round_e4m3fn(q8) : q8, s));
      }
    }
  }
}

__global__ void pool_kernel(PoolArgs a) {
  extern __shared__ unsigned long long pool_smem[];  // 8-byte aligned
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long k = blockIdx.x;
  if (!h.ok || k >= h.B) return;
  const int S = a.S, hd = a.hd, tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const uint8_t** src_kv = reinterpret_cast<const uint8_t**>(pool_smem);
  const uint8_t** src_sc = src_kv + S;
  int* src_kind = reinterpret_cast<int*>(src_sc + S);
  float* o = reinterpret_cast<float*>(src_kind + S);
  __shared__ float inv_rms;

  // Where each source's channel 0 lives; an index outside its tensor pools as an empty source.
  for (int i = tid; i < S; i += nt) {
    const long long kind = a.plan[h.sources() + 2 * (k * S + i)];
    const long long index = a.plan[h.sources() + 2 * (k * S + i) + 1];
    const int part = (a.coff == 2 && i >= a.ratio) ? 1 : 0;  // c4: A halves first, then B halves
    int use = kKindNone;
    const uint8_t* pk = nullptr;
    const uint8_t* ps = nullptr;
    if (kind == kKindState && index >= 0 && index < a.state_rows) {
      use = kKindState;
      pk = a.state + index * a.row_bytes + a.kv_offset[part];
      ps = a.state + index * a.row_bytes + a.score_offset[part];
    } else if (kind == kKindInput && index >= 0 && index < a.kv_rows) {
      use = kKindInput;
      const long long width = static_cast<long long>(a.coff) * hd;
      pk = reinterpret_cast<const uint8_t*>(a.kv + index * width + part * hd);
      ps = reinterpret_cast<const uint8_t*>(a.score + index * width + part * hd);
    }
    src_kind[i] = use;
    src_kv[i] = pk;
    src_sc[i] = ps;
  }
  __syncthreads();

  // The reference's arithmetic per channel, in source order: fp32 exp, double sums.
  for (int j = tid; j < hd; j += nt) {
    auto score_of = [&](int i) -> float {
      const int kind = src_kind[i];
      if (kind == kKindState) return f32_from_bits(load_u32(src_sc[i] + 4 * j, a.state_aligned));
      if (kind == kKindInput) return reinterpret_cast<const float*>(src_sc[i])[j];
      return -INFINITY;  // the clean row: weight exactly 0
    };
    auto value_of = [&](int i) -> float {
      const int kind = src_kind[i];
      if (kind == kKindState) return f32_from_bits(load_u32(src_kv[i] + 4 * j, a.state_aligned));
      if (kind == kKindInput) return reinterpret_cast<const float*>(src_kv[i])[j];
      return 0.0f;
    };
    float m = score_of(0);  // std::max_element: the first of the largest
    for (int i = 1; i < S; ++i) {
      const float s = score_of(i);
      if (m < s) m = s;
    }
    double denom = 0.0;
    for (int i = 0; i < S; ++i) denom = dadd(denom, static_cast<double>(libm_expf(fsub(score_of(i), m))));
    const float sum = static_cast<float>(denom);
    double c = 0.0;
    for (int i = 0; i < S; ++i) {
      const float p = fdiv(libm_expf(fsub(score_of(i), m)), sum);
      c = dadd(c, static_cast<double>(fmul(p, value_of(i))));
    }
    o[j] = act(a.bf16_act, static_cast<float>(c));
  }
  __syncthreads();

  // RMSNorm with weight: the squares summed in double in channel order, as the host does.
  if (tid == 0) {
    double sum_sq = 0.0;
    for (int i = 0; i < hd; ++i) {
      const double x = static_cast<double>(o[i]);
      sum_sq = dadd(sum_sq, dmul(x, x));
    }
    inv_rms = static_cast<float>(ddiv(1.0, dsqrt(dadd(ddiv(sum_sq, static_cast<double>(hd)), a.eps))));
  }
  __syncthreads();
  const float inv = inv_rms;
  for (int i = tid; i < hd; i += nt) o[i] = act(a.bf16_act, fmul(fmul(o[i], inv), a.norm[i]));
  __syncthreads();

  // RoPE on the last rd dims at the block's first position b * ratio.
  const long long b = a.plan[h.blocks() + 3 * k + 1];
  const float pos = static_cast<float>(b * a.ratio);
  float* rope = o + (hd - a.rd);
  for (int j = tid; j < a.rd / 2; j += nt) {
    const float angle = fmul(pos, a.freqs[j]);
    const SinCos sc = libm_sincosf(angle);
    const float cs = sc.cos, sn = sc.sin;
    const float x0 = rope[2 * j], x1 = rope[2 * j + 1];
    rope[2 * j] = act(a.bf16_act, fsub(fmul(x0, cs), fmul(x1, sn)));
    rope[2 * j + 1] = act(a.bf16_act, fadd(fmul(x0, sn), fmul(x1, cs)));
  }
  __syncthreads();

  // The indexer's normalised Walsh-Hadamard transform (Sylvester order), one stage at a time.
  if (a.rotate) {
    for (int hstep = 1; hstep < hd; hstep *= 2) {
      for (int p = tid; p < hd / 2; p += nt) {
        const int i = (p / hstep) * 2 * hstep + p % hstep;
        const float x0 = o[i], x1 = o[i + hstep];
        o[i] = fadd(x0, x1);
        o[i + hstep] = fsub(x0, x1);
      }
      __syncthreads();
    }
    const float scale = fdiv(1.0f, fsqrt(static_cast<float>(hd)));
    for (int i = tid; i < hd; i += nt) o[i] = act(a.bf16_act, fmul(o[i], scale));
    __syncthreads();
  }

  switch (a.quant) {
    case CompressQuant::none:
      break;
    case CompressQuant::fp8_nope:  // the rope dims stay bf16
      quant_blocks(o, hd - a.rd, a.quant_block, false, a.fp8_rounding, a.bf16_act);
      break;
    case CompressQuant::fp4:
      quant_blocks(o, hd, a.quant_block, true, true, a.bf16_act);
      break;
    case CompressQuant::fp8_vector:
      quant_blocks(o, hd, hd, false, true, a.bf16_act);
      break;
  }
  __syncthreads();
  float* dst = a.out + k * hd;
  for (int i = tid; i < hd; i += nt) dst[i] = o[i];
}

// ---- compressor_write_state ---------------------------------------------------------------------

struct WriteArgs {
  const int64_t* plan;
  long long plan_words;
  int S;
  long long kv_rows;
  const uint32_t* kv;  // f32 bits: copied, never computed on
  const uint32_t* score;
  uint8_t* state;
  long long state_rows;
  long long row_bytes;
  bool state_aligned;
  long long kv_offset[2];
  long long score_offset[2];
  int coff;
  int hd;
};

// True (in every thread) when one of words[first + self + 1, first + count) equals `value`: the host
// writes in order, so the last writer of a state row or cache location wins, and so does the GPU.
// Call from every thread of the block.
__device__ inline bool written_later(const int64_t* words, long long first, long long count, long long self,
                                     long long value) {
  int found = 0;
  for (long long u = self + 1 + threadIdx.x; u < count; u += blockDim.x) {
    if (words[first + u] == value) found = 1;
  }
  return __syncthreads_or(found) != 0;
}

__global__ void write_state_kernel(WriteArgs a) {
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long t = blockIdx.x;
  const long long tokens = h.T < a.kv_rows ? h.T : a.kv_rows;
  if (!h.ok || t >= tokens) return;
  const long long row = a.plan[h.write_rows() + t];
  if (row < 0 || row >= a.state_rows) return;  // -1: consumed within its own batch
  if (written_later(a.plan, h.write_rows(), tokens, t, row)) return;
  uint8_t* dst = a.state + row * a.row_bytes;
  const int width = a.coff * a.hd;
  // Full width for c4: the A half is read by the next block's overlap, the B half by this block.
  for (int e = static_cast<int>(threadIdx.x); e < width; e += static_cast<int>(blockDim.x)) {
    const int part = e / a.hd, j = e % a.hd;
    store_u32(dst + a.kv_offset[part] + 4 * j, a.kv[t * width + e], a.state_aligned);
    store_u32(dst + a.score_offset[part] + 4 * j, a.score[t * width + e], a.state_aligned);
  }
}

// ---- compressor_store ------------------------------------------------------------------------------

struct StoreArgs {
  const int64_t* plan;
  long long plan_words;
  int S;
  const float* entries;
  long long capacity;  // entries rows
  int dims;
  long long locations;
  bool model1;
  // f32 rows
  float* rows;
  // MODEL1 pages
  uint8_t* cache;
  long long page_size;
  long long page_bytes;
  int rope_dim;
  int scale_block;
  int scale_count;
  int value_bytes;
  int scale_bytes;
};

__global__ void store_kernel(StoreArgs a) {
  extern __shared__ float block_scale[];  // MODEL1: scale_count
  const PlanHeader h = read_plan_header(a.plan, a.plan_words, a.S);
  const long long k = blockIdx.x;
  const long long blocks = h.B < a.capacity ? h.B : a.capacity;
  if (!h.ok || k >= blocks) return;
  const long long loc = a.plan[h.dest() + k];
  if (loc < 0 || loc >= a.locations) return;
  if (written_later(a.plan, h.dest(), blocks, k, loc)) return;
  const float* e = a.entries + k * a.dims;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  if (!a.model1) {
    float* dst = a.rows + loc * a.dims;
    for (int i = tid; i < a.dims; i += nt) dst[i] = e[i];
    return;
  }
  // model1_pack_entry at page loc / page_size, slot loc % page_size.
  uint8_t* page = a.cache + (loc / a.page_size) * a.page_bytes;
  const long long slot = loc % a.page_size;
  uint8_t* values = page + slot * a.value_bytes;
  uint8_t* scales = page + a.page_size * a.value_bytes + slot * a.scale_bytes;
  constexpr float kInv448 = 1.0f / kE4m3fnMaxF32;
  for (int q = tid; q < a.scale_count; q += nt) {
    float amax = 0.0f;
    for (int i = q * a.scale_block; i < (q + 1) * a.scale_block; ++i) amax = std_max(amax, fabsf(e[i]));
    const float scale = round_ue8m0_ceil(fmul(std_max(amax, 1e-4f), kInv448));  // e4m3_block_scale
    block_scale[q] = scale;
    scales[q] = f32_to_ue8m0_ceil(scale);  // exact: the scale is a power of two
  }
  for (int q = a.scale_count + tid; q < a.scale_bytes; q += nt) scales[q] = 0;
  __syncthreads();
  const int nope = a.dims - a.rope_dim;
  for (int i = tid; i < nope; i += nt) {
    values[i] = f32_to_e4m3fn(std_clamp(fdiv(e[i], block_scale[i / a.scale_block]), -kE4m3fnMaxF32, kE4m3fnMaxF32));
  }
  for (int i = tid; i < a.rope_dim; i += nt) {
    const uint16_t code = f32_to_bf16(e[nope + i]);
    values[nope + 2 * i] = static_cast<uint8_t>(code & 0xFFu);
    values[nope + 2 * i + 1] = static_cast<uint8_t>(code >> 8);
  }
}

bool aligned4(const void* p, long long row_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 4 == 0 && row_bytes % 4 == 0;
}

constexpr long long kSmemLimit = 48 * 1024;  // no opt-in attribute needed

}  // namespace

namespace cuda {

void compressor_pool(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, const Tensor& state,
                     const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                     const CompressPostprocess& post, Tensor& entries_out, void* stream) {
  const long long capacity = entries_out.size(0);
  if (capacity == 0) return;
  PoolArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.ratio = ratio;
  a.coff = static_cast<int>(layout.coff);
  a.S = static_cast<int>(layout.coff * ratio);
  a.kv = kv.data<float>();
  a.score = score.data<float>();
  a.kv_rows = kv.size(0);
  a.state = state.data<uint8_t>();
  a.state_rows = state.size(0);
  a.row_bytes = layout.row_bytes;
  a.state_aligned = aligned4(a.state, layout.row_bytes);
  for (int p = 0; p < 2; ++p) {
    a.kv_offset[p] = layout.kv_offset_bytes[p];
    a.score_offset[p] = layout.score_offset_bytes[p];
  }
  a.hd = static_cast<int>(layout.dims);
  a.rd = static_cast<int>(2 * rope_freqs.size(0));
  a.norm = norm_weight.data<float>();
  a.freqs = rope_freqs.data<float>();
  a.bf16_act = post.bf16_act;
  a.rotate = post.rotate;
  a.quant = post.quant;
  a.quant_block = static_cast<int>(post.quant_block);
  a.fp8_rounding = post.fp8_rounding;
  a.eps = post.norm_eps;
  a.out = entries_out.data<float>();
  const long long smem = static_cast<long long>(a.S) * (2 * sizeof(void*) + sizeof(int)) + 4LL * a.hd;
  if (smem > kSmemLimit) {
    throw ContractError("compressor_pool", "layout", "dims " + std::to_string(a.hd) + " and " + std::to_string(a.S) +
                                                         " sources need more shared memory than the GPU kernel has");
  }
  pool_kernel<<<static_cast<unsigned>(capacity), kThreads, static_cast<size_t>(smem), static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_pool");
}

void compressor_write_state(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, Tensor& state,
                            const CompressStateLayout& layout, void* stream) {
  const long long tokens = kv.size(0);
  if (tokens == 0 || state.size(0) == 0) return;
  WriteArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.S = static_cast<int>(layout.coff * ratio);
  a.kv_rows = tokens;
  a.kv = static_cast<const uint32_t*>(kv.data_ptr());
  a.score = static_cast<const uint32_t*>(score.data_ptr());
  a.state = state.data<uint8_t>();
  a.state_rows = state.size(0);
  a.row_bytes = layout.row_bytes;
  a.state_aligned = aligned4(a.state, layout.row_bytes);
  for (int p = 0; p < 2; ++p) {
    a.kv_offset[p] = layout.kv_offset_bytes[p];
    a.score_offset[p] = layout.score_offset_bytes[p];
  }
  a.coff = static_cast<int>(layout.coff);
  a.hd = static_cast<int>(layout.dims);
  write_state_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_write_state");
}

void compressor_store(const Tensor& plan, int64_t ratio, const Tensor& entries, Tensor& cache,
                      const Model1Layout& model1, int64_t page_size, void* stream) {
  const long long capacity = entries.size(0);
  StoreArgs a{};
  a.plan = plan.data<int64_t>();
  a.plan_words = plan.numel();
  a.S = static_cast<int>((ratio == 4 ? 2 : 1) * ratio);
  a.entries = entries.data<float>();
  a.capacity = capacity;
  a.dims = static_cast<int>(entries.size(1));
  a.model1 = cache.dtype() == DType::u8;
  size_t smem = 0;
  if (a.model1) {
    a.cache = cache.data<uint8_t>();
    a.page_size = page_size;
    a.page_bytes = model1.page_bytes(page_size);
    a.locations = cache.size(0) * page_size;
    a.rope_dim = static_cast<int>(model1.rope_dim);
    a.scale_block = static_cast<int>(model1.scale_block);
    a.scale_count = static_cast<int>(model1.scale_count());
    a.value_bytes = static_cast<int>(model1.value_bytes());
    a.scale_bytes = static_cast<int>(model1.scale_bytes());
    smem = static_cast<size_t>(a.scale_count) * sizeof(float);
  } else {
    a.rows = cache.data<float>();
    a.locations = a.dims > 0 ? cache.numel() / a.dims : 0;
  }
  if (capacity == 0 || a.locations == 0) return;
  store_kernel<<<static_cast<unsigned>(capacity), kThreads, smem, static_cast<gpu::Stream>(stream)>>>(a);
  gpu::check_launch("compressor_store");
}

}  // namespace cuda
}  // namespace dsv4::kernels
