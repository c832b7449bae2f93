// The engine's small per-token ops between the model's kernels: embedding lookups, row gathers, the
// greedy argmax, the MTP block's next-token ids, bf16 adds into a residual copy, the compressor's
// positional bias, and host-to-device metadata copies. Each is one entry point that runs on the host
// or on a GPU by where its tensors live (kernels/device.h).
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
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"

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
}  // namespace cuda
#endif

}  // namespace dsv4::kernels
