// The engine's small per-token ops between the model's kernels: embedding lookups, row gathers, the
// greedy argmax, the MTP block's next-token ids, bf16 adds into a residual copy, the compressor's
// positional bias, host-to-device metadata copies, and prefill CP's row copies. Each is one entry
// point that runs on the host or on a GPU by where its tensors live (kernels/device.h).
//
// Contracts (ContractError naming the argument and the rule):
//   embed_rows: ids i32 [T]; table bf16 [V, d] contiguous; out bf16 [T, copies * d] contiguous;
//     copies >= 1. Every id in [0, V) (checked on the host; on a GPU a row with an id outside is
//     filled with NaN so that the mistake cannot pass for a real embedding).
//   gather_rows: src [N, W] with a unit last-dim stride, index i32 [R], out [R, W] contiguous, same
//     dtype (any whole-byte dtype). Every index in [0, N) (host check; on a GPU a row whose index is
//     outside is left unwritten, and the testing allocator's poison shows it).
//   argmax_rows: logits f32 [R, V] contiguous, out i32 [R]: the first index of each row's maximum
//     (std::max_element's choice; NaN compares false as there).
//   mtp_next_ids: ids i32 [T], last i32 [R] (each row's last token, strictly increasing, last[R-1] <
//     T), hint i32 [R], sampled i32 [R], next i32 [T]: token t of row r gets ids[t + 1] below the row's
//     last token, and the row's last token gets hint[r] when >= 0, else sampled[r]. Tokens after
//     last[R - 1] are not written.
//   add_bf16: a, b bf16 [T, d] contiguous; out bf16 [T, d] with a unit last-dim stride (a column
//     slice of a wider residual): out = bf16(f32(a) + f32(b)).
//   scale_bf16: x bf16 contiguous, out f32 contiguous of x's element count: out = round_bf16(f32(x) *
//     scale) (the indexer's head weights, scaled and kept at bf16 precision in f32).
//   add_position_bias: score f32 [T, C] contiguous, bias f32 [ratio, C] contiguous, positions i32 [T]
//     (>= 0; host check): score[t] += bias[positions[t] % ratio].
//   copy_rows: src rank 2 with a unit last-dim stride (any row stride: a column slice of a wider
//     buffer), dst of src's dtype and shape, contiguous; any whole-byte dtype: dst[t] = src[t]
//     (prefill CP's contiguous copy of the qkv_a[:, q_lora:] slice).
//   unshard_rows: gathered [ranks * L, W] contiguous (the ranks' shares of L rows each, rank-major, as
//     an all-gather leaves them), global [T, W] contiguous of gathered's dtype (any whole-byte dtype),
//     ranks >= 1, T <= ranks * L: global[t] = gathered[(t % ranks) * L + t / ranks] (prefill CP's
//     round-robin split undone: token t lives on rank t % ranks, row t / ranks of its share).
//
// The speculative scrub (MTP drafts in a verify batch): the compressor state rows and cache entries the
// drafts are about to overwrite are saved first (backup_*), and the ones whose token is rejected are
// put back (scrub_restore). The item lists are device words written by the engine, read where the op
// runs, so the counts are values: their checks run on the host only. A GPU kernel writes nothing when
// a count breaks its rule below and skips an item whose slot, row or entry is out of range, never
// reading or writing outside the buffers.
//   backup_state_rows: state u8 [N, W] contiguous, words i64 [n >= 2] contiguous = [E, dest[E], S,
//     rows[S]], saved u8 [C, W] contiguous: saved[j] = state[rows[j]] for j < S. Host checks: 0 <= E,
//     2 + E + S <= n, 0 <= S <= C, every row in [0, N).
//   backup_entries: cache contiguous (any whole-byte dtype; its bytes), words as above, spans (the
//     cache's entry layout, EntrySpans), saved u8 [C, spans.entry_bytes()] contiguous: saved[j] = the
//     entry dest[j]'s span bytes, back to back, for j < E. Host checks: 0 <= E <= C, 1 + E <= n, every
//     dest in [0, spans.capacity(cache bytes)).
//   scrub_restore: saved_entries u8 [Ce, spans.entry_bytes()] and saved_rows u8 [Cs, W] contiguous,
//     words i64 [n >= 2] contiguous = [E, (slot, dest)[E], S, (slot, row)[S]], cache as above, state u8
//     [N, W] contiguous: entry dest gets saved_entries[slot] back, state row `row` saved_rows[slot].
//     Host checks: 0 <= E <= Ce, 0 <= S <= Cs, 2 + 2E + 2S <= n, slots, dests and rows in range. Two
//     items naming the same destination must carry equal bytes (a backup taken before any write does):
//     the GPU restores items concurrently.
//   EntrySpans must be well formed (ContractError "spans": dims >= 1 for f32 rows; value_bytes >= 1,
//     scale_bytes >= 0, page_entries >= 1 and page_bytes >= page_entries * entry_bytes() for MODEL1).
#pragma once

#include <cstdint>

#include "engine/core/hd.h"
#include "engine/core/tensor.h"
#include "kernels/norm_rope.h"

namespace dsv4::kernels {

void embed_rows(const Tensor& ids, const Tensor& table, int64_t copies, Tensor& out);
void gather_rows(const Tensor& src, const Tensor& index, Tensor& out);
void argmax_rows(const Tensor& logits, Tensor& out);
void mtp_next_ids(const Tensor& ids, const Tensor& last, const Tensor& hint, const Tensor& sampled, Tensor& next);
void add_bf16(const Tensor& a, const Tensor& b, Tensor& out);
void add_position_bias(Tensor& score, const Tensor& bias, const Tensor& positions, int64_t ratio);
void scale_bf16(const Tensor& x, float scale, Tensor& out);
// `bytes` host bytes into dst's storage from its offset: a memcpy on the host, an asynchronous copy on
// the current stream for a GPU tensor (the source must stay valid until the call returns only: a
// pageable host source is staged by the driver before cudaMemcpyAsync returns).
void copy_from_host(Tensor& dst, const void* src, int64_t bytes);
// dst's bytes from src's (same dtype and numel, both contiguous): a memcpy, or a device copy on the
// current stream.
void copy_tensor(const Tensor& src, Tensor& dst);
// The row copies of prefill CP (contracts above): a strided [T, W] view into a dense one, and the
// all-gathered shares back into global token order. Pure byte copies: bitwise equal on both devices.
void copy_rows(const Tensor& src, Tensor& dst);
void unshard_rows(const Tensor& gathered, int64_t ranks, Tensor& global);

// The bytes of one compressed entry in a cache, as byte offsets from the cache's data pointer.
struct ByteSpan {
  int64_t offset = 0, bytes = 0;
};
// A cache's entry layout: an indexer key row is one span of `dims` f32; a MODEL1 entry is two, its
// value bytes in its page's value area and its scale bytes in the page's scale area (Model1Layout,
// kernels/norm_rope.h, with the page's `page_entries` entries).
struct EntrySpans {
  bool f32_rows = false;
  int64_t dims = 0;  // f32_rows: floats per entry
  int64_t value_bytes = 0, scale_bytes = 0, page_bytes = 0, page_entries = 0;  // MODEL1
  DSV4_HD int64_t entry_bytes() const { return f32_rows ? dims * 4 : value_bytes + scale_bytes; }
  // Entries a cache of `cache_bytes` bytes holds (whole pages for MODEL1).
  DSV4_HD int64_t capacity(int64_t cache_bytes) const {
    return f32_rows ? cache_bytes / (dims * 4) : cache_bytes / page_bytes * page_entries;
  }
  // Span `part` (0 or 1) of entry `loc`; an indexer row's second span is empty.
  DSV4_HD ByteSpan span(int64_t loc, int part) const {
    if (f32_rows) return part == 0 ? ByteSpan{loc * dims * 4, dims * 4} : ByteSpan{};
    const int64_t page = loc / page_entries * page_bytes, slot = loc % page_entries;
    return part == 0 ? ByteSpan{page + slot * value_bytes, value_bytes}
                     : ByteSpan{page + page_entries * value_bytes + slot * scale_bytes, scale_bytes};
  }
};
// The indexer's key cache (`indexer`: rows of `dims` f32) or a MODEL1 cache (`model1` in pages of
// `page_entries` entries).
EntrySpans entry_spans(bool indexer, int64_t dims, const Model1Layout& model1, int64_t page_entries);

void backup_state_rows(const Tensor& state, const Tensor& words, Tensor& saved);
void backup_entries(const Tensor& cache, const Tensor& words, const EntrySpans& spans, Tensor& saved);
void scrub_restore(const Tensor& saved_entries, const Tensor& saved_rows, const Tensor& words, const EntrySpans& spans,
                   Tensor& cache, Tensor& state);

#if defined(DSV4_WITH_CUDA)
namespace cuda {
void embed_rows(const Tensor& ids, const Tensor& table, int64_t copies, Tensor& out, void* stream);
void gather_rows(const Tensor& src, const Tensor& index, Tensor& out, void* stream);
void argmax_rows(const Tensor& logits, Tensor& out, void* stream);
void mtp_next_ids(const Tensor& ids, const Tensor& last, const Tensor& hint, const Tensor& sampled, Tensor& next,
                  void* stream);
void add_bf16(const Tensor& a, const Tensor& b, Tensor& out, void* stream);
void add_position_bias(Tensor& score, const Tensor& bias, const Tensor& positions, int64_t ratio, void* stream);
void scale_bf16(const Tensor& x, float scale, Tensor& out, void* stream);
void copy_bytes(void* dst, const void* src, int64_t bytes, bool from_host, void* stream);
void copy_rows(const Tensor& src, Tensor& dst, void* stream);
void unshard_rows(const Tensor& gathered, int64_t ranks, Tensor& global, void* stream);
void backup_state_rows(const Tensor& state, const Tensor& words, Tensor& saved, void* stream);
void backup_entries(const Tensor& cache, const Tensor& words, const EntrySpans& spans, Tensor& saved, void* stream);
void scrub_restore(const Tensor& saved_entries, const Tensor& saved_rows, const Tensor& words, const EntrySpans& spans,
                   Tensor& cache, Tensor& state, void* stream);
}  // namespace cuda
#endif

}  // namespace dsv4::kernels
