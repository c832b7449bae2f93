// CUDA (and, through port.h, HIP) implementations of kernels/token_ops.h. The entry points in
// kernels/host/token_ops.cpp have checked the contracts; these only launch.
#include "kernels/token_ops.h"
#include "kernels/cuda/port.h"

#include <cmath>
#include <cstdint>

#include "engine/core/formats.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;

gpu::Stream as_stream(void* s) { return static_cast<gpu::Stream>(s); }

// One block per token; a row whose id is outside the table is filled with NaN (0x7fc0).
__global__ void embed_kernel(const int32_t* ids, const uint16_t* table, long long vocab, long long d, long long copies,
                             uint16_t* out) {
  const long long t = blockIdx.x;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < vocab;
  for (long long i = threadIdx.x; i < copies * d; i += blockDim.x) {
    out[t * copies * d + i] = ok ? table[static_cast<long long>(id) * d + i % d] : static_cast<uint16_t>(0x7fc0);
  }
}

// One block per output row, byte-wise; rows whose index is outside are left unwritten.
__global__ void gather_kernel(const uint8_t* src, long long rows, long long row_stride_bytes, const int32_t* index,
                              long long row_bytes, uint8_t* out) {
  const long long r = blockIdx.x;
  const int32_t i = index[r];
  if (i < 0 || i >= rows) return;
  for (long long b = threadIdx.x; b < row_bytes; b += blockDim.x) out[r * row_bytes + b] = src[i * row_stride_bytes + b];
}

// One block per row, std::max_element's choice: the first index of the maximum, where a NaN never
// replaces the running best and a NaN first element is never replaced. Each thread scans one
// contiguous chunk, and thread 0 combines the chunks' first maxima left to right by the same rule.
__global__ void argmax_kernel(const float* logits, long long V, int32_t* out) {
  __shared__ float best_v[1024];
  __shared__ long long best_i[1024];
  const long long r = blockIdx.x;
  const float* row = logits + r * V;
  const long long chunk = (V + blockDim.x - 1) / blockDim.x;
  const long long begin = threadIdx.x * chunk;
  const long long end = begin + chunk < V ? begin + chunk : V;
  float bv = 0.0f;
  long long bi = -1;
  for (long long j = begin; j < end; ++j) {
    // A NaN is never chosen after row[0]; a NaN row[0] is never replaced (thread 0 below).
    if (row[j] != row[j]) continue;
    if (bi < 0 || row[j] > bv) {
      bv = row[j];
      bi = j;
    }
  }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = row[0];
    long long i = 0;
    for (unsigned k = 0; k < blockDim.x; ++k) {
      if (best_i[k] >= 0 && best_v[k] > v) {
        v = best_v[k];
        i = best_i[k];
      }
    }
    out[r] = static_cast<int32_t>(i);
  }
}

// One thread per row r: its tokens are (last[r - 1], last[r]].
__global__ void next_ids_kernel(const int32_t* ids, long long T, const int32_t* last, long long R, const int32_t* hint,
                                const int32_t* sampled, int32_t* next) {
  const long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const long long begin = r == 0 ? 0 : static_cast<long long>(last[r - 1]) + 1;
  const long long end = last[r];
  if (begin < 0 || end >= T || end < begin) return;  // not increasing: nothing written (host check)
  for (long long t = begin; t < end; ++t) next[t] = ids[t + 1];
  next[end] = hint[r] >= 0 ? hint[r] : sampled[r];
}

__global__ void add_bf16_kernel(const uint16_t* a, const uint16_t* b, long long T, long long d, long long out_stride,
                                uint16_t* out) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * d) return;
  const long long t = i / d, c = i % d;
  out[t * out_stride + c] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

__global__ void position_bias_kernel(float* score, const float* bias, const int32_t* positions, long long T,
                                     long long cols, long long ratio) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * cols) return;
  const long long t = i / cols, c = i % cols;
  const int32_t p = positions[t];
  if (p < 0) return;
  score[i] += bias[(p % ratio) * cols + c];
}

__global__ void scale_bf16_kernel(const uint16_t* x, float scale, long long n, float* out) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = round_bf16(bf16_to_f32(x[i]) * scale);
}

// One block per destination row r (dense, `row_words` words): row (r % ranks) * share + r / ranks of
// src, `src_stride` words apart (copy_rows: ranks 1; unshard_rows). Word is the widest unit that the
// pointers, the stride and the row bytes are all aligned to, so a row moves in 16-byte loads where
// it can.
template <class Word>
__global__ void mapped_rows_kernel(const Word* src, long long src_stride, long long row_words, long long ranks,
                                   long long share, Word* dst) {
  const long long r = blockIdx.x;
  const Word* from = src + ((r % ranks) * share + r / ranks) * src_stride;
  Word* to = dst + r * row_words;
  for (long long i = threadIdx.x; i < row_words; i += blockDim.x) to[i] = from[i];
}

template <class Word>
void launch_mapped_rows(const uint8_t* src, long long src_stride_bytes, long long rows, long long row_bytes,
                        long long ranks, long long share, uint8_t* dst, gpu::Stream stream) {
  const long long w = static_cast<long long>(sizeof(Word));
  mapped_rows_kernel<Word><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      reinterpret_cast<const Word*>(src), src_stride_bytes / w, row_bytes / w, ranks, share,
      reinterpret_cast<Word*>(dst));
}

void copy_mapped_rows(const uint8_t* src, long long src_stride_bytes, long long rows, long long row_bytes,
                      long long ranks, long long share, uint8_t* dst, gpu::Stream stream, const char* op) {
  const unsigned long long align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                                   static_cast<unsigned long long>(src_stride_bytes) |
                                   static_cast<unsigned long long>(row_bytes);
  if (align % 16 == 0) {
    launch_mapped_rows<uint4>(src, src_stride_bytes, rows, row_bytes, ranks, share, dst, stream);
  } else if (align % 8 == 0) {
    launch_mapped_rows<unsigned long long>(src, src_stride_bytes, rows, row_bytes, ranks, share, dst, stream);
  } else if (align % 4 == 0) {
    launch_mapped_rows<unsigned int>(src, src_stride_bytes, rows, row_bytes, ranks, share, dst, stream);
  } else {
    launch_mapped_rows<uint8_t>(src, src_stride_bytes, rows, row_bytes, ranks, share, dst, stream);
  }
  gpu::check_launch(op);
}

// The speculative scrub's copies: one block per item slot up to the buffers' capacity, the counts read
// from the words here. Counts that break the host's count rules (negative, past the words or past the
// saved buffer) make every block exit; a block past its count, or whose slot, row or entry is out of
// range, exits. The block's threads copy the item's bytes.
__device__ void copy_block_bytes(uint8_t* dst, const uint8_t* src, long long bytes) {
  for (long long b = threadIdx.x; b < bytes; b += blockDim.x) dst[b] = src[b];
}

// words = [E, dest[E], S, rows[S]]: saved[j] = state[rows[j]].
__global__ void backup_state_kernel(const uint8_t* state, long long rows, long long W, const long long* w, long long n,
                                    uint8_t* saved, long long C) {
  const long long j = blockIdx.x;
  const long long E = w[0];
  if (E < 0 || E > n - 2) return;
  const long long S = w[1 + E];
  if (S < 0 || S > C || S > n - 2 - E || j >= S) return;
  const long long row = w[2 + E + j];
  if (row < 0 || row >= rows) return;
  copy_block_bytes(saved + j * W, state + row * W, W);
}

// saved[j] = entry dest[j]'s spans, back to back.
__global__ void backup_entries_kernel(const uint8_t* cache, long long entries, EntrySpans spans, const long long* w,
                                      long long n, uint8_t* saved, long long C) {
  const long long j = blockIdx.x;
  const long long E = w[0];
  if (E < 0 || E > C || E > n - 1 || j >= E) return;
  const long long dest = w[1 + j];
  if (dest < 0 || dest >= entries) return;
  long long at = 0;
  for (int part = 0; part < 2; ++part) {
    const ByteSpan s = spans.span(dest, part);
    copy_block_bytes(saved + j * spans.entry_bytes() + at, cache + s.offset, s.bytes);
    at += s.bytes;
  }
}

// words = [E, (slot, dest)[E], S, (slot, row)[S]]: blocks [0, Ce) restore entries, [Ce, Ce + Cs) rows.
__global__ void scrub_kernel(const uint8_t* saved_entries, long long Ce, const uint8_t* saved_rows, long long Cs,
                             const long long* w, long long n, EntrySpans spans, long long entries, uint8_t* cache,
                             uint8_t* state, long long rows, long long W) {
  const long long b = blockIdx.x;
  const long long E = w[0];
  if (E < 0 || E > Ce || E > (n - 2) / 2) return;
  const long long S = w[1 + 2 * E];
  if (S < 0 || S > Cs || S > (n - 2 - 2 * E) / 2) return;
  if (b < Ce) {
    if (b >= E) return;
    const long long slot = w[1 + 2 * b], dest = w[2 + 2 * b];
    if (slot < 0 || slot >= Ce || dest < 0 || dest >= entries) return;
    long long at = 0;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan s = spans.span(dest, part);
      copy_block_bytes(cache + s.offset, saved_entries + slot * spans.entry_bytes() + at, s.bytes);
      at += s.bytes;
    }
    return;
  }
  const long long i = b - Ce;
  if (i >= S) return;
  const long long slot = w[2 + 2 * E + 2 * i], row = w[3 + 2 * E + 2 * i];
  if (slot < 0 || slot >= Cs || row < 0 || row >= rows) return;
  copy_block_bytes(state + row * W, saved_rows + slot * W, W);
}

}  // namespace

void embed_rows(const Tensor& ids, const Tensor& table, int64_t copies, Tensor& out, void* stream) {
  const int64_t T = ids.size(0);
  if (T == 0) return;
  embed_kernel<<<static_cast<unsigned>(T), kThreads, 0, as_stream(stream)>>>(
      ids.data<int32_t>(), table.data<uint16_t>(), table.size(0), table.size(1), copies, out.data<uint16_t>());
  gpu::check_launch("embed_rows");
}

void gather_rows(const Tensor& src, const Tensor& index, Tensor& out, void* stream) {
  const int64_t R = index.size(0);
  if (R == 0 || src.size(1) == 0) return;
  const int64_t es = dtype_storage_bytes(src.dtype(), 1);
  gather_kernel<<<static_cast<unsigned>(R), kThreads, 0, as_stream(stream)>>>(
      static_cast<const uint8_t*>(src.data_ptr()), src.size(0), src.stride(0) * es, index.data<int32_t>(),
      src.size(1) * es, static_cast<uint8_t*>(out.data_ptr()));
  gpu::check_launch("gather_rows");
}

void argmax_rows(const Tensor& logits, Tensor& out, void* stream) {
  const int64_t R = logits.size(0);
  if (R == 0) return;
  argmax_kernel<<<static_cast<unsigned>(R), kThreads, 0, as_stream(stream)>>>(logits.data<float>(), logits.size(1),
                                                                               out.data<int32_t>());
  gpu::check_launch("argmax_rows");
}

void mtp_next_ids(const Tensor& ids, const Tensor& last, const Tensor& hint, const Tensor& sampled, Tensor& next,
                  void* stream) {
  const int64_t R = last.size(0);
  if (R == 0) return;
  next_ids_kernel<<<gpu::blocks_for(R, kThreads), kThreads, 0, as_stream(stream)>>>(
      ids.data<int32_t>(), ids.size(0), last.data<int32_t>(), R, hint.data<int32_t>(), sampled.data<int32_t>(),
      next.data<int32_t>());
  gpu::check_launch("mtp_next_ids");
}

void add_bf16(const Tensor& a, const Tensor& b, Tensor& out, void* stream) {
  const int64_t n = a.numel();
  if (n == 0) return;
  add_bf16_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
      a.data<uint16_t>(), b.data<uint16_t>(), a.size(0), a.size(1), out.stride(0), out.data<uint16_t>());
  gpu::check_launch("add_bf16");
}

void add_position_bias(Tensor& score, const Tensor& bias, const Tensor& positions, int64_t ratio, void* stream) {
  const int64_t n = score.numel();
  if (n == 0) return;
  position_bias_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
      score.data<float>(), bias.data<float>(), positions.data<int32_t>(), score.size(0), score.size(1), ratio);
  gpu::check_launch("add_position_bias");
}

void scale_bf16(const Tensor& x, float scale, Tensor& out, void* stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  scale_bf16_kernel<<<gpu::blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(x.data<uint16_t>(), scale, n,
                                                                                     out.data<float>());
  gpu::check_launch("scale_bf16");
}

void copy_bytes(void* dst, const void* src, int64_t bytes, bool from_host, void* stream) {
#if defined(__HIPCC__)
  gpu::check(hipMemcpyAsync(dst, src, static_cast<size_t>(bytes), from_host ? hipMemcpyHostToDevice : hipMemcpyDeviceToDevice,
                            as_stream(stream)),
             "hipMemcpyAsync");
#else
  gpu::check(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), from_host ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice,
                             as_stream(stream)),
             "cudaMemcpyAsync");
#endif
}

void copy_rows(const Tensor& src, Tensor& dst, void* stream) {
  const int64_t rows = src.size(0);
  if (rows == 0 || src.size(1) == 0) return;
  const int64_t es = dtype_storage_bytes(src.dtype(), 1);
  copy_mapped_rows(static_cast<const uint8_t*>(src.data_ptr()), src.stride(0) * es, rows, src.size(1) * es, 1, rows,
                   static_cast<uint8_t*>(dst.data_ptr()), as_stream(stream), "copy_rows");
}

void unshard_rows(const Tensor& gathered, int64_t ranks, Tensor& global, void* stream) {
  const int64_t T = global.size(0);
  if (T == 0 || global.size(1) == 0) return;
  const int64_t row_bytes = global.size(1) * dtype_storage_bytes(global.dtype(), 1);
  copy_mapped_rows(static_cast<const uint8_t*>(gathered.data_ptr()), row_bytes, T, row_bytes, ranks,
                   gathered.size(0) / ranks, static_cast<uint8_t*>(global.data_ptr()), as_stream(stream),
                   "unshard_rows");
}

namespace {
const long long* words_of(const Tensor& words) { return reinterpret_cast<const long long*>(words.data<int64_t>()); }
int64_t bytes_of(const Tensor& t) { return dtype_storage_bytes(t.dtype(), t.numel()); }
}  // namespace

void backup_state_rows(const Tensor& state, const Tensor& words, Tensor& saved, void* stream) {
  const int64_t C = saved.size(0), W = state.size(1);
  if (C == 0 || W == 0) return;
  backup_state_kernel<<<static_cast<unsigned>(C), kThreads, 0, as_stream(stream)>>>(
      state.data<uint8_t>(), state.size(0), W, words_of(words), words.size(0), saved.data<uint8_t>(), C);
  gpu::check_launch("backup_state_rows");
}

void backup_entries(const Tensor& cache, const Tensor& words, const EntrySpans& spans, Tensor& saved, void* stream) {
  const int64_t C = saved.size(0);
  if (C == 0 || spans.entry_bytes() == 0) return;
  backup_entries_kernel<<<static_cast<unsigned>(C), kThreads, 0, as_stream(stream)>>>(
      static_cast<const uint8_t*>(cache.data_ptr()), spans.capacity(bytes_of(cache)), spans, words_of(words),
      words.size(0), saved.data<uint8_t>(), C);
  gpu::check_launch("backup_entries");
}

void scrub_restore(const Tensor& saved_entries, const Tensor& saved_rows, const Tensor& words, const EntrySpans& spans,
                   Tensor& cache, Tensor& state, void* stream) {
  const int64_t Ce = saved_entries.size(0), Cs = saved_rows.size(0);
  if (Ce + Cs == 0) return;
  scrub_kernel<<<static_cast<unsigned>(Ce + Cs), kThreads, 0, as_stream(stream)>>>(
      saved_entries.data<uint8_t>(), Ce, saved_rows.data<uint8_t>(), Cs, words_of(words), words.size(0), spans,
      spans.capacity(bytes_of(cache)), static_cast<uint8_t*>(cache.data_ptr()), state.data<uint8_t>(), state.size(0),
      state.size(1));
  gpu::check_launch("scrub_restore");
}

}  // namespace dsv4::kernels::cuda
