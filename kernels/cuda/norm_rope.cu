// CUDA (and, through port.h, HIP) implementation of kernels/norm_rope.h: one block per row, as the
// host kernels' "thread block" loop. Every value is computed with the host's operations in the
// host's order (kernels/cuda/libm.h and norm_rope_math.h: RoPE through glibc's sinf / cosf, no
// fused multiply-adds), so rows and cache bytes equal the host's bit for bit; the one difference is
// the order of the f64 sum of squares (a fixed tree instead of index order; see norm_rope_math.h).
#include "kernels/norm_rope.h"
#include "kernels/cuda/port.h"  // before formats.h: its device code needs the runtime header

#include <cstdint>

#include "engine/core/formats.h"
#include "kernels/cuda/libm.h"
#include "kernels/cuda/norm_rope_math.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;  // a multiple of 64: whole warps on both warp widths
constexpr float kInvE4m3Max = 1.0f / kE4m3fnMaxF32;

// The f64 sum of squares of a row of bf16 codes over the whole block; every thread gets it.
__device__ float row_inverse_rms(const uint16_t* x, int64_t dim, double eps, double* red) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = bf16_to_f32(x[i]);
    acc += static_cast<double>(v) * v;  // exact in f64 (fused or not)
  }
  return gpu::inverse_rms_from(gpu::block_sum_f64(acc, red), dim, eps);
}

// bf16(x * r * w), the normed value of one element (as a float).
__device__ float normed(uint16_t code, float r, float w) {
  return round_bf16(gpu_math::fmul(gpu_math::fmul(bf16_to_f32(code), r), w));
}

// The normed and rotated rope pair j of row x (bf16-valued floats).
__device__ void normed_rope_pair(const uint16_t* x, int64_t i, float r, const float* weight, float freq, int32_t pos,
                                 float* a, float* b) {
  const float na = normed(x[i], r, weight[i]);
  const float nb = normed(x[i + 1], r, weight[i + 1]);
  float ra, rb;
  gpu::rotate_pair(na, nb, gpu::rope_angle(pos, freq), /*inverse=*/false, &ra, &rb);
  *a = round_bf16(ra);
  *b = round_bf16(rb);
}

// Row t of kv at t * dim (dense rows, as the host kernel and sglang's kernel address them). Every
// element is read by the sum before any thread writes (the sum's barriers), then read and written
// by one thread only, so the update in place is race-free.
__global__ void norm_rope_inplace_kernel(uint16_t* kv, const float* weight, double eps, const float* freqs,
                                         const int32_t* positions, int64_t dim, int64_t rope_dim) {
  __shared__ double red[gpu::kMaxWarps];
  const int64_t t = blockIdx.x;
  uint16_t* x = kv + t * dim;
  const float r = row_inverse_rms(x, dim, eps, red);
  const int64_t nope = dim - rope_dim;
  for (int64_t i = threadIdx.x; i < nope; i += blockDim.x) x[i] = f32_to_bf16(normed(x[i], r, weight[i]));
  const int32_t pos = positions[t];
  for (int64_t j = threadIdx.x; j < rope_dim / 2; j += blockDim.x) {
    const int64_t i = nope + 2 * j;
    float a, b;
    normed_rope_pair(x, i, r, weight, freqs[j], pos, &a, &b);
    x[i] = f32_to_bf16(a);
    x[i + 1] = f32_to_bf16(b);
  }
}

struct Model1Geometry {
  int64_t dim, rope_dim, scale_block, page_size, page_bytes, entries;
};

// The geometry of a launch into `cache` (u8 [pages, page_bytes]).
Model1Geometry model1_geometry(int64_t dim, int64_t rope_dim, int64_t scale_block, int64_t page_size,
                               const Tensor& cache) {
  const Model1Layout l{dim, rope_dim, scale_block};
  return Model1Geometry{dim, rope_dim, scale_block, page_size, l.page_bytes(page_size), cache.size(0) * page_size};
}

// The location block t writes, or -1 for none: its location is -1 (or, unchecked on the GPU, outside
// the cache), or a later row names the same location, whose bytes win as in the host's sequential
// loop. Uniform across the block; contains __syncthreads_or (call from every thread).
__device__ int64_t written_location(const int64_t* locs, int64_t t, int64_t rows, int64_t entries) {
  const int64_t loc = locs[t];
  if (loc < 0 || loc >= entries) return -1;  // uniform across the block
  int overwritten = 0;
  for (int64_t u = t + 1 + threadIdx.x; u < rows; u += blockDim.x) overwritten |= locs[u] == loc ? 1 : 0;
  return __syncthreads_or(overwritten) != 0 ? -1 : loc;
}

// Packs one row at `loc` of the cache, model1_pack_entry's bytes. The row is f32-valued: `row.nope(i)`
// is nope dim i, `row.rope_pair(j, &a, &b)` rope dims 2j and 2j + 1. The one MODEL1 packer of both
// stores (the fused kernel's row is normed and rotated on the fly, store_kv_model1's is read as it
// is). Called by every thread of the block; block-strided loops, no barrier.
template <class Row>
__device__ void pack_model1_row(const Row& row, const Model1Geometry& g, uint8_t* cache, int64_t loc) {
  const int64_t nope = g.dim - g.rope_dim;
  const int64_t block = g.scale_block;
  const int64_t scale_count = nope / block;
  const int64_t value_bytes = nope + 2 * g.rope_dim;
  const int64_t scale_bytes = (scale_count + 7) / 8 * 8;
  uint8_t* page = cache + (loc / g.page_size) * g.page_bytes;
  const int64_t slot = loc % g.page_size;
  uint8_t* values = page + slot * value_bytes;
  uint8_t* scales = page + g.page_size * value_bytes + slot * scale_bytes;

  // One thread per scale block: its amax, its power-of-two scale, its e4m3 codes.
  for (int64_t s = threadIdx.x; s < scale_count; s += blockDim.x) {
    const int64_t first = s * block;
    float amax = 0.0f;
    for (int64_t i = first; i < first + block; ++i) amax = gpu_math::std_max(amax, fabsf(row.nope(i)));
    // e4m3_block_scale: 2^ceil(log2(max(amax, 1e-4) * f32(1/448))).
    const float scale = round_ue8m0_ceil(gpu_math::fmul(gpu_math::std_max(amax, 1e-4f), kInvE4m3Max));
    scales[s] = f32_to_ue8m0_ceil(scale);  // exact: the scale is a power of two
    for (int64_t i = first; i < first + block; ++i) {
      const float v = gpu_math::fdiv(row.nope(i), scale);
      values[i] = f32_to_e4m3fn(gpu_math::std_clamp(v, -kE4m3fnMaxF32, kE4m3fnMaxF32));
    }
  }
  for (int64_t k = scale_count + threadIdx.x; k < scale_bytes; k += blockDim.x) scales[k] = 0;
  // The rope dims as bf16, little-endian.
  uint8_t* rope = values + nope;
  for (int64_t j = threadIdx.x; j < g.rope_dim / 2; j += blockDim.x) {
    float a, b;
    row.rope_pair(j, &a, &b);
    const uint16_t ca = f32_to_bf16(a);
    const uint16_t cb = f32_to_bf16(b);
    rope[4 * j] = static_cast<uint8_t>(ca & 0xFFu);
    rope[4 * j + 1] = static_cast<uint8_t>(ca >> 8);
    rope[4 * j + 2] = static_cast<uint8_t>(cb & 0xFFu);
    rope[4 * j + 3] = static_cast<uint8_t>(cb >> 8);
  }
}

// Row x of the fused store: normed with inverse rms r and weight, the rope pairs rotated at pos.
struct NormedRopeRow {
  const uint16_t* x;
  float r;
  const float* weight;
  const float* freqs;
  int32_t pos;
  int64_t nope_dim;
  __device__ float nope(int64_t i) const { return normed(x[i], r, weight[i]); }
  __device__ void rope_pair(int64_t j, float* a, float* b) const {
    normed_rope_pair(x, nope_dim + 2 * j, r, weight, freqs[j], pos, a, b);
  }
};

// Row x of store_kv_model1: its bf16 values as they are.
struct PlainRow {
  const uint16_t* x;
  int64_t nope_dim;
  __device__ float nope(int64_t i) const { return bf16_to_f32(x[i]); }
  __device__ void rope_pair(int64_t j, float* a, float* b) const {
    *a = bf16_to_f32(x[nope_dim + 2 * j]);
    *b = bf16_to_f32(x[nope_dim + 2 * j + 1]);
  }
};

// Row t (at t * row_stride) normed, rotated and packed at swa_locs[t].
__global__ void norm_rope_store_kernel(const uint16_t* kv, int64_t row_stride, int64_t rows, const float* weight,
                                       double eps, const float* freqs, const int32_t* positions, const int64_t* locs,
                                       uint8_t* cache, Model1Geometry g) {
  __shared__ double red[gpu::kMaxWarps];
  const int64_t t = blockIdx.x;
  const int64_t loc = written_location(locs, t, rows, g.entries);
  if (loc < 0) return;  // uniform across the block
  const uint16_t* x = kv + t * row_stride;
  const float r = row_inverse_rms(x, g.dim, eps, red);
  pack_model1_row(NormedRopeRow{x, r, weight, freqs, positions[t], g.dim - g.rope_dim}, g, cache, loc);
}

// Row t (at t * row_stride) packed as it is at locs[t].
__global__ void store_model1_kernel(const uint16_t* kv, int64_t row_stride, int64_t rows, const int64_t* locs,
                                    uint8_t* cache, Model1Geometry g) {
  const int64_t t = blockIdx.x;
  const int64_t loc = written_location(locs, t, rows, g.entries);
  if (loc < 0) return;  // uniform across the block
  pack_model1_row(PlainRow{kv + t * row_stride, g.dim - g.rope_dim}, g, cache, loc);
}

}  // namespace

void fused_norm_rope_inplace(Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                             const Tensor& positions, void* stream) {
  const int64_t rows = kv.size(0);
  if (rows == 0) return;
  norm_rope_inplace_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      kv.data<uint16_t>(), weight.data<const float>(), eps, freqs.data<const float>(),
      positions.data<const int32_t>(), kv.size(1), 2 * freqs.size(0));
  gpu::check_launch(kNormRopeOp);
}

void fused_norm_rope_store_kv(const Tensor& kv, const Tensor& weight, double eps, const Tensor& freqs,
                              const Tensor& positions, const Tensor& swa_locs, Tensor& cache, int64_t page_size,
                              int64_t scale_block, void* stream) {
  const int64_t rows = kv.size(0);
  if (rows == 0) return;
  const Model1Geometry g = model1_geometry(kv.size(1), 2 * freqs.size(0), scale_block, page_size, cache);
  norm_rope_store_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      kv.data<const uint16_t>(), kv.stride(0), rows, weight.data<const float>(), eps, freqs.data<const float>(),
      positions.data<const int32_t>(), swa_locs.data<const int64_t>(), cache.data<uint8_t>(), g);
  gpu::check_launch(kNormRopeStoreOp);
}

void store_kv_model1(const Tensor& kv, int64_t rope_dim, const Tensor& locs, Tensor& cache, int64_t page_size,
                     int64_t scale_block, void* stream) {
  const int64_t rows = kv.size(0);
  if (rows == 0) return;
  const Model1Geometry g = model1_geometry(kv.size(1), rope_dim, scale_block, page_size, cache);
  store_model1_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<gpu::Stream>(stream)>>>(
      kv.data<const uint16_t>(), kv.stride(0), rows, locs.data<const int64_t>(), cache.data<uint8_t>(), g);
  gpu::check_launch(kStoreKvModel1Op);
}

}  // namespace dsv4::kernels::cuda
