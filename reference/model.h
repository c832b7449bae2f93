// The whole model for one sequence (dsv4-model §0, §4): embedding into hc_mult residual copies,
// the blocks (mHC around attention and MoE), hc_head, the final norm and the fp32 head; and the MTP
// block that drafts token p + 2 from the main model's final residual at p and token p + 1.
// Every forward call returns the logits of its last position only, like the official demo.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "reference/attention.h"
#include "reference/context.h"
#include "reference/mhc.h"
#include "reference/moe.h"
#include "reference/weights.h"

namespace dsv4::ref {

class Block {
 public:
  // prefix "layers.{i}" or "mtp.{m}"; layer_id i, or n_layers + m.
  Block(const ModelConfig& config, const Weights& weights, std::string prefix, int64_t layer_id);
  void reset();
  // R: [T, hc_mult * dim] residual in, residual out.
  Mat forward(const Context& ctx, const Mat& R, const std::vector<int64_t>& token_ids, int64_t start_pos);
  Attention::WindowState window_state() const { return attn_.window_state(); }
  void restore_window(Attention::WindowState state) { attn_.restore_window(std::move(state)); }

 private:
  const Weights& weights_;
  std::string prefix_;
  Attention attn_;
  MoE ffn_;
};

class Model {
 public:
  Model(const ModelConfig& config, const Weights& weights);
  void reset();  // a new sequence: every cache and compress state

  struct Output {
    Mat logits;          // [1, vocab], fp32, for the last position
    Mat final_residual;  // [T, hc_mult * dim]: the residual after the last block, before hc_head
  };
  // tokens at positions start_pos .. start_pos + T - 1 (prefill: start_pos 0; decode: one token).
  Output forward(const Context& ctx, const std::vector<int64_t>& tokens, int64_t start_pos);

  // The MTP block (the first one): hidden [T, hc_mult * dim] = the main model's final residuals of
  // positions start_pos.., next_tokens[t] = the token at position start_pos + t + 1. Returns the draft
  // logits [1, vocab] for the last row (a prediction of the token at start_pos + T + 1).
  // `residual_out`, when given, receives the block's output residual [T, hc_mult * dim].
  Mat mtp_forward(const Context& ctx, const Mat& hidden, const std::vector<int64_t>& next_tokens, int64_t start_pos,
                  Mat* residual_out = nullptr);
  // EAGLE chain drafting with the MTP block: step i runs it at position start_pos + i on the previous
  // step's output residual (step 0: `hidden`, [1, hc_mult * dim], the block's output at start_pos - 1)
  // and token tokens[i] (the previous draft). Returns each step's draft logits [1, vocab]. The
  // block's window is put back afterwards: the chain's positions are scratch.
  std::vector<Mat> mtp_chain(const Context& ctx, const Mat& hidden, const std::vector<int64_t>& tokens, int64_t start_pos);

  const ModelConfig& config() const { return config_; }

  // The pieces of forward, for callers that drive the layers themselves (the engine oracle feeds
  // each block the engine's residual, engine/oracle/oracle.h). forward is exactly
  //   R = embed(tokens); for i: R = block(i).forward(ctx, R, tokens, start_pos); head_logits(ctx, R).
  // embed: [T, hc_mult * dim], the token's embedding row in every residual copy (bf16 values).
  Mat embed(const std::vector<int64_t>& tokens) const;
  int64_t n_blocks() const { return static_cast<int64_t>(layers_.size()); }  // the main blocks, n_layers
  Block& block(int64_t i);
  // hc_head, the final norm and the fp32 head on the last row of R [T, hc_mult * dim]: the logits
  // [1, vocab] that forward returns; recorded as "logits".
  Mat head_logits(const Context& ctx, const Mat& R) const;

 private:
  Mat head(const Context& ctx, const Mat& R, const std::string& hc_prefix, const std::string& norm_name) const;

  const ModelConfig& config_;
  const Weights& weights_;
  std::vector<std::unique_ptr<Block>> layers_;
  std::unique_ptr<Block> mtp_;
};

}  // namespace dsv4::ref
