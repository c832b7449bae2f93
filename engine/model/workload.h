// The standard request mix of `dsv4h generate`, its tests and its benchmark: prompts whose lengths
// sit on the boundaries that matter (1 token, around the window, around the ratio-4 and the
// non-overlapping ratio's blocks, several windows long so chunked prefill splits them), arriving at
// different steps, each decoding a fixed number of tokens. Scaled to the config's window, ratio and
// max_seq_len, so tiny and micro get the same shape of mix.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/config/model_config.h"

namespace dsv4::engine {

struct WorkloadRequest {
  int64_t id = 0;
  std::vector<int32_t> prompt_ids;
  int64_t max_new_tokens = 0;  // the prefill's token plus `decode` decode steps
  int64_t arrival_step = 0;
};

// The prompt lengths of the mix for a config (ascending is not implied: the order is the mix's).
std::vector<int64_t> standard_prompt_lengths(const ModelConfig& config, int64_t count, int64_t decode);

// `count` requests (1..64) with prompts from `seed`, `decode` decode steps each. InputError (naming
// `--requests` / `--decode`) when the mix does not fit max_seq_len.
std::vector<WorkloadRequest> standard_workload(const ModelConfig& config, uint64_t seed, int64_t count, int64_t decode);

}  // namespace dsv4::engine
