// The KV compressor's serving kernels (dsv4-model §2.4, §5): per-token (kv, score) rows written into
// a CompressStatePool-style ring buffer, and per-channel softmax pooling of each block completed in a
// batch, whose source rows come partly from the ring (tokens of earlier batches) and partly from the
// current ragged input (sglang's `buffer_len` split). Chunked prefill and decode thereby resume
// partial blocks, and the entries equal the reference's `Compressor::forward` bit for bit.
//
// Per batch: build_compress_plan and encode_compress_plan (uploaded to an i64 `plan` buffer), then
// compressor_pool, THEN compressor_write_state, then compressor_store. The order matters: a long batch
// may recycle (ring wrap) a state row that a block of the same batch still reads from the state.
//
// The entry points (compressor_pool / _write_state / _store) read the encoded plan when they run, so
// a launch recorded before the plan is uploaded (a CUDA graph, a stream) sees the batch's plan. Their
// tensors live on one device: host tensors run the host implementations (compressor_pool_host,
// compressor_write_state_host), GPU tensors the CUDA kernels, which equal the host bit for bit (their
// exp, sin and cos reproduce glibc's expf, sinf and cosf, the host's std::exp/cos/sin). The
// rules on the plan's words (header, indices, destinations) are checked on the host only; on a GPU a
// bad header makes the kernel write nothing, and a bad index reads or writes nothing out of bounds
// (a source outside its tensor pools as an empty one, a write row or destination outside it is
// skipped). The block count B is known on the device only: a GPU launch covers the output's capacity
// (entries rows) and the blocks past B do nothing.
//
// The state buffer is bytes: [rows, row_bytes] u8, each row |kv A|kv B|score A|score B| (c4) or
// |kv|score| of fp32, located by the byte offsets in CompressStateLayout (engine/serving's
// StateRowLayout supplies them; kernels/ does not depend on engine/serving).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/core/tensor.h"
#include "kernels/norm_rope.h"

namespace dsv4::kernels {

// Byte geometry of one state row. coff = 2 for the overlapping ratio 4, else 1; part p < coff.
struct CompressStateLayout {
  int64_t coff = 0;
  int64_t dims = 0;  // floats per part (the compressor's head_dim)
  int64_t row_bytes = 0;
  int64_t kv_offset_bytes[2] = {0, 0};
  int64_t score_offset_bytes[2] = {0, 0};
};

// Where one pooled row of a block comes from.
struct CompressSource {
  enum class Kind : uint8_t {
    none,   // c4 block 0's missing overlap: kv 0, score -inf (contributes nothing)
    state,  // a state row (a token of an earlier batch)
    input,  // a row of this batch's kv / score input
  };
  Kind kind = Kind::none;
  int64_t index = -1;  // the state row or the input row; -1 for none
};

struct CompressPlanBlock {
  int64_t request = 0;     // index into the builder's request list
  int64_t block = 0;       // entry index b: positions [b*ratio, b*ratio + ratio); rope at b*ratio
  int64_t buffer_len = 0;  // sglang's field: the first buffer_len sources are not input rows
};

// One batch's compress plan. Sources of block k are sources[k*S, (k+1)*S) with S = coff*ratio, in
// the reference's pooling order: c4 = the A halves of block b-1's slots 0..3, then the B halves of
// block b's slots 0..3; otherwise block b's slots 0..ratio-1.
struct CompressPlan {
  int64_t ratio = 0;
  int64_t coff = 0;
  std::vector<int64_t> positions;   // [T] absolute position of each input row
  std::vector<int64_t> write_rows;  // [T] state row the token is stored to; -1 when no later batch reads it
  std::vector<CompressPlanBlock> blocks;  // emission order: by request, then block index
  std::vector<CompressSource> sources;    // [blocks.size() * sources_per_block()]

  int64_t num_tokens() const { return static_cast<int64_t>(positions.size()); }
  int64_t sources_per_block() const { return coff * ratio; }
};

// One request's share of a batch: num_tokens consecutive positions from start_pos, in consecutive
// input rows (requests follow each other in the input in list order).
struct CompressRequestBatch {
  int64_t start_pos = 0;
  int64_t num_tokens = 0;
  // The state row of every position in [compress_history_start(start_pos, ratio), start_pos +
  // num_tokens): the translated SWA locations (dsv4-model §5). Rows the plan does not use may be -1.
  std::span<const int64_t> state_rows;
};

// The first position whose state row a batch starting at start_pos may read or write: the start of
// the unfinished block, one block earlier for the overlapping ratio 4 (its A halves), clipped at 0.
int64_t compress_history_start(int64_t start_pos, int64_t ratio);

// ContractError for a bad ratio, a short state_rows span, or a used row outside [0, state_row_count).
// store_every_row: every token writes its state row (speculative TARGET_VERIFY: a rejected tail
// leaves blocks this batch completed to be pooled again by the next batch, from the state), except
// the last token of a non-overlapping block, whose row no later batch reads.
CompressPlan build_compress_plan(std::span<const CompressRequestBatch> requests, int64_t ratio,
                                 int64_t state_row_count, bool store_every_row = false);

// The plan's contract (hand-made plans included): sizes agree, write rows in [-1, state_row_count),
// state sources in [0, state_row_count), input sources in [0, T), buffer_len splits the sources.
void check_compress_plan(const CompressPlan& plan, int64_t num_tokens, int64_t state_row_count);

// kv, score [T, coff*dims] f32 (score with ape added); rows [T] i64 (-1: skip); state [R, row_bytes] u8.
void compressor_write_state_host(const Tensor& kv, const Tensor& score, const Tensor& rows, Tensor& state,
                                 const CompressStateLayout& layout);

// The post-processing of a pooled vector (dsv4-model §2.4): bf16 cast, RMSNorm, RoPE at b*ratio, then
// the attention's FP8 of the nope dims or the indexer's Hadamard and FP4 (or sglang's per-vector FP8).
enum class CompressQuant : uint8_t {
  none,        // exact mode
  fp8_nope,    // attention: e4m3 over the first dims - rope_dim dims in blocks of quant_block
  fp4,         // indexer (official QAT): e2m1 over all dims in blocks of quant_block
  fp8_vector,  // indexer, sglang's default cache: e4m3 with one scale per vector
};

struct CompressPostprocess {
  bool bf16_act = false;  // quant-sim: every activation point rounds to bf16
  bool rotate = false;    // indexer: Hadamard over all dims after rope
  CompressQuant quant = CompressQuant::none;
  int64_t quant_block = 0;
  bool fp8_rounding = true;  // false: the initial release's clamp-only FP8 simulation
  double norm_eps = 1e-6;
};

// Pools every block of `plan` into out [blocks, dims] f32 (bf16 values in quant-sim).
// kv, score [T, coff*dims] f32; state [R, row_bytes] u8; norm_weight [dims] f32;
// rope_freqs [rope_dim / 2] f32 (the layer's table, rope on the last rope_dim dims).
void compressor_pool_host(const CompressPlan& plan, const Tensor& kv, const Tensor& score, const Tensor& state,
                          const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                          const CompressPostprocess& post, Tensor& out);

// ---- the encoded plan: the entry points' input --------------------------------------------------
// A CompressPlan and each block's cache location (dest) flattened into int64 words, so that a launch
// reads them from a (device) buffer when it runs:
//   [0] T, [1] B, [2] S = coff * ratio (the sources per block)
//   [3, 3+T)                 positions[t]
//   [3+T, 3+2T)              write_rows[t]
//   [3+2T, 3+2T+3B)          (request, block, buffer_len) of block k at 3+2T+3k
//   [3+2T+3B, 3+2T+3B+2BS)   (kind, index) of source i at 3+2T+3B+2i, kind as CompressSource::Kind's
//                            value (0 none, 1 state, 2 input)
//   [3+2T+3B+2BS, +B)        dest[k]: the cache location of block k's entry
// compress_plan_words(T, B, S) words in all; a buffer may be longer (its capacity), the rest is ignored.
int64_t compress_plan_words(int64_t T, int64_t B, int64_t S);
// ContractError unless dest has one location per block.
std::vector<int64_t> encode_compress_plan(const CompressPlan& plan, std::span<const int64_t> dest);
// The plan (ratio and coff from `ratio`) and dest of encoded words. ContractError for a negative T or B
// or S != coff * ratio; the words must hold compress_plan_words(T, B, S) values. The plan's own rules
// (check_compress_plan) are the kernels' to check.
CompressPlan decode_compress_plan(const int64_t* words, int64_t ratio, std::vector<int64_t>& dest);

// Pools every block of the encoded plan into rows [0, B) of entries_out [capacity, dims] f32, as
// compressor_pool_host does (on host tensors it is that function on entries_out.narrow(0, 0, B)).
// plan i64 [words >= 3] contiguous; the other tensors as compressor_pool_host's, all on one device;
// ratio fixes coff (2 for 4, else 1), which must equal layout.coff. Host-only value rules: the
// header (S = coff * ratio, words enough), B <= capacity and check_compress_plan(plan, T = kv rows,
// state rows). On a GPU, rows [B, capacity) are left as they were.
void compressor_pool(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, const Tensor& state,
                     const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                     const CompressPostprocess& post, Tensor& entries_out);

// Stores each token's (kv, score) row at the plan's write_rows[t] (-1: skip), as
// compressor_write_state_host does. kv, score [T, coff*dims] f32 with T = the plan's T (host rule;
// a GPU stores the first min(T, kv rows) tokens); state [R, row_bytes] u8; write rows in [-1, R) (host
// rule; a GPU skips rows outside [0, R)).
void compressor_write_state(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, Tensor& state,
                            const CompressStateLayout& layout);

// Writes entry k (row k of entries [capacity, dims] f32, k < B) at the plan's dest[k]:
//   cache f32 [..., dims] contiguous (the indexer's keys): the row as it is, at row dest[k] of the
//     cache seen as [numel / dims, dims]; model1 and page_size are ignored;
//   cache u8 [pages, model1.page_bytes(page_size)] contiguous (the main compressor's MODEL1 cache):
//     model1_pack(model1, page_size, entry, cache, dest[k]); model1.head_dim == dims, page_size >= 1.
// Host-only value rules: B <= capacity, dest[k] in [0, locations) (a GPU skips a destination outside).
void compressor_store(const Tensor& plan, int64_t ratio, const Tensor& entries, Tensor& cache,
                      const Model1Layout& model1 = {}, int64_t page_size = 0);

}  // namespace dsv4::kernels

#if defined(DSV4_WITH_CUDA)
// The CUDA (HIP-portable) implementations, kernels/cuda/compressor.cu: called by the entry points
// above after their contract checks, enqueued on `stream` (a cudaStream_t); no synchronization.
namespace dsv4::kernels::cuda {
void compressor_pool(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, const Tensor& state,
                     const CompressStateLayout& layout, const Tensor& norm_weight, const Tensor& rope_freqs,
                     const CompressPostprocess& post, Tensor& entries_out, void* stream);
void compressor_write_state(const Tensor& plan, int64_t ratio, const Tensor& kv, const Tensor& score, Tensor& state,
                            const CompressStateLayout& layout, void* stream);
void compressor_store(const Tensor& plan, int64_t ratio, const Tensor& entries, Tensor& cache,
                      const Model1Layout& model1, int64_t page_size, void* stream);
}  // namespace dsv4::kernels::cuda
#endif
