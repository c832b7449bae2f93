// The reference's driver, as the official generate.py runs it: one prefill call with the whole
// prompt at position 0, then one call per token, greedy. With MTP on, the MTP block drafts the
// token after next at every step from the main model's final residual.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "reference/context.h"
#include "reference/model.h"

namespace dsv4::ref {

struct Generation {
  std::vector<int64_t> tokens;        // the greedy tokens, one per step (prefill included)
  std::vector<Mat> logits;            // [1, vocab] per step
  std::vector<int64_t> draft_tokens;  // MTP: the greedy draft for the token after each step's token
  std::vector<Mat> draft_logits;
};

// Runs prefill + `decode_steps` decode calls: decode_steps + 1 tokens in all. Resets the model first.
Generation generate_greedy(const Context& ctx, Model& model, const std::vector<int64_t>& prompt, int64_t decode_steps,
                           bool mtp);

// A deterministic prompt of `length` token ids in [2, vocab) from a seed.
std::vector<int64_t> synthetic_prompt(const ModelConfig& config, uint64_t seed, int64_t length);

// Index of the largest value (the first on ties).
int64_t argmax(const Mat& logits);

// FNV-1a over the fp32 bytes of every step's logits: equal digests mean bitwise-equal logits.
uint64_t logits_digest(const std::vector<Mat>& logits);

}  // namespace dsv4::ref
