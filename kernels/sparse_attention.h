// Combined sparse attention with the sink (dsv4-model §2.6; FlashMLA's sparse decode with an extra
// cache, the reference tilelang `sparse_attn`). Keys and values are the same MODEL1 entries
// (kernels/norm_rope.h): the SWA cache and, on compressed layers, the "extra" compressed cache.
//
// For token t, head h: the key set is swa_indices[t, j] for j < swa_lens[t] followed by
// extra_indices[t, j] for j < extra_lens[t]; an index of -1 is skipped (padding). Every referenced
// entry is dequantized (e4m3 * ue8m0 scale for the nope dims, bf16 rope dims) and
//   l_j = scale * q_h . k_j (f32), m = max_j l_j (the sink is not part of it),
//   p_j = exp(l_j - m) in f32, the denominator sums the f32 p_j plus exp(sink_h - m),
//   out_h = bf16( sum_j bf16(p_j) * k_j / denominator )     (P rounded to bf16 before P.V).
// One softmax spans both caches. A token with no valid key gets 0. The sink is a raw logit (not
// scaled). Max first, then P, as the reference kernel's numerics are stated (an online softmax would
// round P against a running max and differ at bf16 level).
//
// Contracts (ContractError naming the argument and the rule):
//   q [T, H, D] bf16 contiguous; out the same shape, bf16, contiguous; attn_sink f32 [H];
//   swa_cache / extra_cache u8 [pages, page_bytes(page_size)] contiguous with page_size >= 1;
//   swa_indices / extra_indices i32 [T, topk] contiguous with values in [-1, pages * page_size);
//   swa_lens / extra_lens i32 [T] with values in [1, topk] (topk_lengths_clamp1: never 0 or less);
//   the extra triple is optional (all three absent: no compressed entries; extra_topk >= 1 when
//   present); kv_block >= 1 (both caches' nope dims per ue8m0 scale, the config's kv_block_size)
//   dividing D - rope_dim, else a ContractError naming `kv_block`; all on one device (else a
//   ContractError naming the first argument that differs).
// The value rules (index ranges, lengths) read tensor data, so they are checked for host tensors
// only. On a GPU the kernel never reads out of bounds on bad values: an index outside
// [0, pages * page_size) is skipped like -1, and a length is clamped to [0, topk] (0: no key).
// On a GPU, D <= kSparseAttentionGpuMaxDim (else a ContractError naming `q`): the kernel keeps
// each thread's share of a head group's outputs in registers.
//
// The GPU kernel (kernels/cuda/sparse_attention.cu) equals the host bit for bit: it follows the host
// order (sequential f32 dot products, max, then P, the denominator and P.V summed in key order, no
// FMA contraction), and its exp is kernels/cuda/libm.h's libm_expf, glibc's expf (what the host's
// std::exp(float) calls) operation for operation. That is the default; DSV4_SPARSE_ATTENTION=
// tensor_core selects a faster, not bitwise, path on CUDA (kernels/cuda/sparse_attention_tc.h).
#pragma once

#include <cstdint>

#include "engine/core/tensor.h"
#include "kernels/norm_rope.h"

namespace dsv4::kernels {

inline constexpr const char* kSparseAttentionOp = "sparse_attention";
inline constexpr int64_t kSparseAttentionGpuMaxDim = 4096;

struct SparseAttentionArgs {
  Tensor q;            // [T, H, D] bf16
  Tensor swa_cache;    // [pages, page_bytes] u8, MODEL1 pages of swa_page_size entries
  int64_t swa_page_size = 0;
  Tensor swa_indices;  // [T, swa_topk] i32, -1 padded
  Tensor swa_lens;     // [T] i32, >= 1
  Tensor extra_cache;  // optional: the compressed pool, MODEL1 pages of extra_page_size entries
  int64_t extra_page_size = 0;
  Tensor extra_indices;  // optional [T, extra_topk] i32
  Tensor extra_lens;     // optional [T] i32, >= 1
  Tensor attn_sink;    // [H] f32
  float scale = 0.0f;  // softmax scale (D^-0.5 on DeepSeek-V4)
  int64_t rope_dim = 64;
  int64_t kv_block = kKvScaleBlock;  // nope dims per ue8m0 scale in both caches (kv_block_size)
  Tensor out;          // [T, H, D] bf16
};

void check_sparse_attention_contract(const SparseAttentionArgs& args);
// Writes args.out (a view: the tensors share storage with the caller's). Host tensors run the host
// loops; GPU tensors enqueue the CUDA kernel on current_stream() (kernels/device.h), asynchronously.
void sparse_attention(const SparseAttentionArgs& args);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
namespace dsv4::kernels::cuda {
// The CUDA (HIP-portable) implementation on `stream` (a cudaStream_t; nullptr is the default
// stream): asynchronous, capturable, no allocation (the tensor-core path's split partials come from
// stream-ordered cudaMallocAsync scratch). `args` must have passed
// check_sparse_attention_contract with its tensors on the GPU.
void sparse_attention(const SparseAttentionArgs& args, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
