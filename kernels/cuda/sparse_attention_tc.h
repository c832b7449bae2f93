// The tensor-core path of the sparse attention (kernels/cuda/sparse_attention_tc.cu), behind the
// same entry point as the bitwise kernel (kernels/sparse_attention.h). CUDA only, sm_80 and later:
// HIP builds never include this header (sparse_attention.cu guards it) and always run the bitwise
// kernel.
//
// The switch (process-wide): the environment variable DSV4_SPARSE_ATTENTION=exact|tensor_core, read
// once at the first call (default exact); set_sparse_attention_path overrides it (tests, benchmarks).
// Any other value of the variable is refused (an InputError naming it at the first call).
//   exact       : kernels/cuda/sparse_attention.cu, bit for bit the host kernel.
//   tensor_core : this path wherever the problem fits (head_dim a multiple of 64 up to 512, the nope
//                 dims, rope dims and kv_block multiples of 8, 16-byte aligned q and out, 8-byte
//                 aligned caches, a device of compute capability 8.0 or later and a build whose
//                 code for it is sm_80 or later), the exact kernel
//                 otherwise. Flash-decoding: bf16 tensor-core products (mma.sync m16n8k16, f32
//                 accumulation) over key tiles with an online softmax. The dequantized keys are
//                 exact in bf16 (e4m3 times a power of two, and bf16 rope dims), so the products are
//                 exact; the sums run in the tensor cores' order, and P is rounded to bf16 against the
//                 running max rather than the final one. Not bitwise with the host:
//                 tests/gpu/test_kernels_attention.cu bounds the difference.
// Determinism: the grid (head blocks, key splits) depends only on the shapes and the device's SM
// count, and every reduction has a fixed order, so reruns and graph replays give the same bits.
// Launches are stream-ordered and capturable (the split partials live in cudaMallocAsync scratch).
#pragma once

#include <cstdint>

#include "kernels/cuda/path_switch.h"

#include "kernels/sparse_attention.h"

namespace dsv4::kernels::cuda {

enum class SparseAttentionPath : int { exact = 0, tensor_core = 1 };

SparseAttentionPath sparse_attention_path();
void set_sparse_attention_path(SparseAttentionPath path);
const char* sparse_attention_path_name(SparseAttentionPath path);

// Sets the path for its lifetime (tests, benchmarks); restores the previous one.
using SparseAttentionPathScope = PathScope<SparseAttentionPath, sparse_attention_path, set_sparse_attention_path>;

// Runs `args` (contract already checked, tensors on the GPU, T and H > 0) on the tensor-core path and
// returns true, or returns false without enqueueing anything when the problem does not fit.
bool sparse_attention_tensor_core(const SparseAttentionArgs& args, void* stream);

// How many calls the tensor-core path has taken (tests: the path was not silently skipped).
uint64_t sparse_attention_tensor_core_calls();

// Heads per block (process-wide, for benchmarks): 0, the default, lets each launch choose (all the
// heads up to 64, fewer while the blocks would leave SMs idle); 16, 32 or 64 asks for that many,
// capped at the heads rounded up to 16, 32 or 64 and halved while the shared memory does not fit.
// Any other value is refused (std::invalid_argument).
void set_sparse_attention_tc_head_block(int heads);
int sparse_attention_tc_head_block();

}  // namespace dsv4::kernels::cuda
