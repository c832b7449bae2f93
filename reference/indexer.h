// The lightning indexer (dsv4-model §2.5, ratio-4 layers only): scores every visible compressed
// entry for each query with Σ_h w_h · ReLU(q_h · k_t) over its own small heads and keys, and picks
// the top index_topk entries for the sparse attention.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/rope.h"
#include "reference/tensor.h"
#include "reference/weights.h"

namespace dsv4::ref {

class Indexer {
 public:
  // prefix "layers.1.attn.indexer"; rope: the layer's (compressed) table.
  Indexer(const ModelConfig& config, const Weights& weights, std::string prefix, RopeTable rope);

  // A new sequence: empties the key cache and resets the compressor.
  void reset();

  // x [T, dim] the attention input, qr [T, q_lora_rank] the q_norm output, at positions start_pos ...
  // Runs its own compressor first (so an entry is visible to the token that completes it), then
  // returns for each token p the selected entry indices in ascending order: the top
  // min(index_topk, floor((p+1)/4)) visible entries by score, ties to the lower index; or the forced
  // selection when ctx.forcing->indexer_topk gives one for (layer_id, p).
  std::vector<std::vector<int64_t>> forward(const Context& ctx, const Mat& x, const Mat& qr, int64_t start_pos,
                                           int64_t layer_id);

  int64_t n_keys() const { return keys_.rows; }
  const Mat& keys() const { return keys_; }

 private:
  const ModelConfig* config_;
  std::string prefix_;
  int64_t heads_;     // index_n_heads (the global count, also in the weight scale)
  int64_t head_dim_;  // index_head_dim
  RopeTable rope_;
  const Mat* wq_b_;          // [heads*head_dim, q_lora_rank]
  const Mat* weights_proj_;  // [heads, dim]
  Compressor compressor_;
  Mat keys_;  // [entries so far, head_dim]: the indexer's compressed key cache
};

}  // namespace dsv4::ref
