// The attention block of one layer for one sequence (dsv4-model §2): the query path with the
// weightless per-head norm, the KV path (K = V), sliding-window attention over a ring of
// window_size raw entries plus, on compressed layers, the compressed entries (all of them on
// non-overlapping layers, the indexer's top-k on ratio-4 layers), one softmax with the per-head
// sink in the denominator, inverse RoPE and the grouped low-rank output projection.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/indexer.h"
#include "reference/rope.h"
#include "reference/tensor.h"
#include "reference/weights.h"

namespace dsv4::ref {

// One head of one query: o = Σ_j e^(l_j - m) k_j / (Σ_j e^(l_j - m) + e^(sink - m)), l_j = scale q·k_j,
// m the max of the l_j (the sink is not part of it). In quant-sim the probabilities are rounded to
// bf16 before the product with the values while the denominator sums them in fp32 (the reference
// kernel's numerics). With no keys the output is 0.
void attention_head(const Context& ctx, const float* q, const std::vector<const float*>& keys, int64_t dim,
                    float sink, float scale, float* out);

class Attention {
 public:
  Attention(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id);
  void reset();  // a new sequence: empty window ring, compressed caches and compress state

  // x: [T, dim], the attn_norm output at positions start_pos .. start_pos + T - 1. Returns [T, dim].
  Mat forward(const Context& ctx, const Mat& x, int64_t start_pos);

  // The sliding window's ring, saved and put back around calls whose positions are scratch (the
  // MTP block's EAGLE chain). Window-only layers: compressed entries and state are not part of it.
  struct WindowState {
    Mat kv;
    std::vector<int64_t> pos;
  };
  WindowState window_state() const { return {window_kv_, window_pos_}; }
  void restore_window(WindowState state);

 private:
  // The query path: q [T, n_heads * head_dim] (normed, rotated) and qr [T, q_lora_rank].
  void query(const Context& ctx, const Mat& x, int64_t start_pos, Mat& q, Mat& qr) const;
  // The KV path: [T, head_dim], normed, rotated, and FP8-simulated in quant-sim.
  Mat key_value(const Context& ctx, const Mat& x, int64_t start_pos) const;
  // The grouped low-rank output projection of o [T, n_heads * head_dim].
  Mat output(const Context& ctx, const Mat& o) const;

  const ModelConfig& config_;
  const Weights& weights_;
  std::string prefix_;
  int64_t layer_id_;
  int64_t ratio_;
  RopeTable rope_;
  std::unique_ptr<Compressor> compressor_;
  std::unique_ptr<Indexer> indexer_;
  // The window: slot p mod window_size holds position window_pos_[slot]'s kv (-1: empty).
  Mat window_kv_;
  std::vector<int64_t> window_pos_;
  // Compressed entries emitted so far for this sequence, entry b in row b.
  std::vector<std::vector<float>> compressed_;
};

}  // namespace dsv4::ref
