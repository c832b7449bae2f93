// The KV compressor (dsv4-model §2.4): learned per-channel softmax pooling of `ratio` consecutive
// tokens into one compressed entry. Ratio 4 overlaps (each entry also pools the previous block's
// "A" half); any other ratio pools its own block only. The attention's compressor feeds the
// layer's compressed KV cache; the indexer's (rotate = true) feeds the indexer's key cache.
#pragma once

#include <cstdint>
#include <string>

#include "engine/config/model_config.h"
#include "reference/context.h"
#include "reference/rope.h"
#include "reference/tensor.h"
#include "reference/weights.h"

namespace dsv4::ref {

class Compressor {
 public:
  // prefix: "layers.1.attn.compressor" or "layers.1.attn.indexer.compressor"; head_dim: config.head_dim
  // (attention) or config.index_head_dim (indexer, rotate = true); rope: the layer's table.
  Compressor(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t ratio, int64_t head_dim,
             bool rotate, RopeTable rope);

  // A new sequence: kv state 0, score state -inf, next position 0.
  void reset();

  struct Output {
    int64_t first_block = 0;
    Mat entries;  // [n, head_dim]: blocks first_block .. first_block + n - 1
  };
  // x [T, dim] (the attention input) at positions start_pos .. start_pos + T - 1, which must continue
  // the sequence. Entry b is emitted by (and returned with) the token at position b*ratio + ratio - 1.
  Output forward(const Context& ctx, const Mat& x, int64_t start_pos);

  int64_t ratio() const { return ratio_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t next_pos() const { return next_pos_; }

 private:
  // Pools the state into the entry of block b and post-processes it (norm, rope, rotation, quant).
  void compress(const Context& ctx, int64_t b, float* out) const;

  const ModelConfig* config_;
  std::string prefix_;
  int64_t ratio_;
  int64_t head_dim_;
  int64_t coff_;  // 2 when overlapping (ratio 4), else 1
  bool rotate_;
  RopeTable rope_;
  const Mat* wkv_;    // [coff*head_dim, dim]
  const Mat* wgate_;  // [coff*head_dim, dim]
  const Mat* ape_;    // [ratio, coff*head_dim]
  const Mat* norm_;   // [1, head_dim]

  // The official code's state buffers, [coff*ratio, coff*head_dim] each. Overlapping: rows 0..r-1 hold
  // the previous complete block, rows r..2r-1 the current one; otherwise rows 0..r-1 the current one.
  Mat kv_state_;
  Mat score_state_;  // scores already include ape
  int64_t next_pos_ = 0;
};

// The indexer's q/k quantization simulation (quant-sim only), in place on one n-dim vector: FP4 in
// blocks of fp4_block_size (the official QAT), or FP8 with one scale per vector when
// config.indexer_quant == "fp8" (sglang's default); then rounded to the activation dtype.
void simulate_indexer_quant(const Context& ctx, float* x, int64_t n);

}  // namespace dsv4::ref
