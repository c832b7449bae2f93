// The KV compressor's serving kernels (dsv4-model §2.4, §5): per-token (kv, score) rows written into
// a CompressStatePool-style ring buffer, and per-channel softmax pooling of each block completed in a
// batch, whose source rows come partly from the ring (tokens of earlier batches) and partly from the
// current ragged input (sglang's `buffer_len` split). Chunked prefill and decode thereby resume
// partial blocks, and the entries equal the reference's `Compressor::forward` bit for bit.
//
// Per batch: build_compress_plan, then compressor_pool_host, THEN compressor_write_state_host. The
// order matters: a long batch may recycle (ring wrap) a state row that a block of the same batch
// still reads from the state.
//
// The state buffer is bytes: [rows, row_bytes] u8, each row |kv A|kv B|score A|score B| (c4) or
// |kv|score| of fp32, located by the byte offsets in CompressStateLayout (engine/serving's
// StateRowLayout supplies them; kernels/ does not depend on engine/serving).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/core/tensor.h"

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

}  // namespace dsv4::kernels
