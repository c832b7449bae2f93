#include "reference/generate.h"

#include <cstring>

#include "engine/checkpoint/synthetic_weights.h"

namespace dsv4::ref {

int64_t argmax(const Mat& logits) {
  int64_t best = 0;
  for (int64_t i = 1; i < logits.cols; ++i) {
    if (logits.data[static_cast<size_t>(i)] > logits.data[static_cast<size_t>(best)]) best = i;
  }
  return best;
}

std::vector<int64_t> synthetic_prompt(const ModelConfig& config, uint64_t seed, int64_t length) {
  std::vector<int64_t> out;
  // Ids 0 and 1 are bos/eos in the released vocabulary; a prompt uses ordinary tokens.
  const uint64_t ordinary = static_cast<uint64_t>(config.vocab_size - 2);
  for (int64_t i = 0; i < length; ++i) {
    out.push_back(2 + static_cast<int64_t>(synthetic_hash(seed, "prompt", static_cast<uint64_t>(i)) % ordinary));
  }
  return out;
}

uint64_t logits_digest(const std::vector<Mat>& logits) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const Mat& m : logits) {
    for (float v : m.data) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int b = 0; b < 4; ++b) {
        h ^= (bits >> (8 * b)) & 0xFFu;
        h *= 0x100000001b3ULL;
      }
    }
  }
  return h;
}

Generation generate_greedy(const Context& ctx, Model& model, const std::vector<int64_t>& prompt, int64_t decode_steps,
                           bool mtp) {
  DSV4_ASSERT(!prompt.empty(), "generation needs a prompt");
  model.reset();
  Generation g;
  std::vector<int64_t> inputs = prompt;
  int64_t pos = 0;
  for (int64_t step = 0; step <= decode_steps; ++step) {
    Model::Output out = model.forward(ctx, inputs, pos);
    const int64_t next = argmax(out.logits);
    g.tokens.push_back(next);
    g.logits.push_back(out.logits);
    if (mtp) {
      // The MTP row for position q takes the token at q + 1: the input tokens shifted by one, then
      // the token just sampled.
      std::vector<int64_t> shifted(inputs.begin() + 1, inputs.end());
      shifted.push_back(next);
      Mat draft = model.mtp_forward(ctx, out.final_residual, shifted, pos);
      g.draft_tokens.push_back(argmax(draft));
      g.draft_logits.push_back(std::move(draft));
    }
    pos += static_cast<int64_t>(inputs.size());
    inputs = {next};
  }
  return g;
}

}  // namespace dsv4::ref
