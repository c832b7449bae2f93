// The MoE feed-forward of one layer (dsv4-model §3): a gate with sqrt-softplus scores, routing by
// top-k of score + bias (score layers) or by the tid2eid table of the current token id (hash
// layers), routed FP4 SwiGLU experts weighted before their down projection, one FP8 shared expert,
// and a fixed-order fp64 combine rounded once.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "reference/context.h"
#include "reference/tensor.h"
#include "reference/weights.h"

namespace dsv4::ref {

class MoE {
 public:
  // prefix "layers.{i}.ffn" or "mtp.{m}.ffn"; layer_id = i, or n_layers + m for MTP (never
  // hash-routed). `config` and `weights` must outlive the MoE.
  MoE(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id);

  // x: [T, dim] ffn_norm output (activation dtype); token_ids[t]: the token id of row t (hash routing
  // uses the current token's id); rows are positions start_pos .. start_pos + T - 1 (for forcing).
  // Returns [T, dim] in the activation dtype. Records <prefix>.gate.scores [T, E],
  // <prefix>.gate.experts [T, k] (indices as floats, after forcing), <prefix>.gate.weights [T, k]
  // and <prefix>.out [T, dim]. ContractError for a bad token id or a bad forced expert set.
  Mat forward(const Context& ctx, const Mat& x, const std::vector<int64_t>& token_ids, int64_t start_pos) const;

  bool hash_routed() const { return hash_; }

 private:
  struct Expert {
    const Mat* w1;  // gate projection [inter, dim]
    const Mat* w2;  // down projection [dim, inter]
    const Mat* w3;  // up projection [inter, dim]
  };

  // The k experts of one token from its scores s [E]: the forced set, the hash table row, or the
  // top-k of s + bias (ties: lower index first).
  std::vector<int64_t> route(const Context& ctx, const float* s, int64_t token_id, int64_t position) const;
  // One expert on one token row x [1, dim]: y = w2 act(silu(min(g, L)) · clamp(u, ±L) · w), [1, dim].
  // Routed experts are FP4 and take their route weight; the shared expert is FP8, has no weight, and
  // is clamped only if clamp_shared_expert.
  Mat expert_forward(const Context& ctx, const Expert& e, const Mat& x, bool routed, float route_weight) const;

  const ModelConfig& config_;
  std::string prefix_;
  int64_t layer_id_;
  bool hash_;
  const Mat* gate_weight_;             // [E, dim]
  const Mat* gate_bias_ = nullptr;     // [1, E], score-routed layers only (selection only)
  const Mat* tid2eid_ = nullptr;       // [vocab, k] of exact integers, hash layers only
  std::vector<Expert> experts_;
  Expert shared_;
};

}  // namespace dsv4::ref
