// What the engine shows the oracles about one step: the batch's rows, the sampled tokens with their
// logits, and (with probes on) every intermediate it computed, keyed like the reference's Observer
// ("layers.3.attn.q", "layers.1.attn.indexer.topk", "logits"), one row per real token of the batch
// in batch token order. The discrete decisions ride along as values: the indexer's selected entry
// indices (ascending, -1 padded to index_topk) and the routed experts (routing order).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/serving/forward_batch.h"
#include "reference/tensor.h"

namespace dsv4::engine {

struct StepRow {
  int64_t request_id = 0;
  int64_t start_pos = 0;        // position of the row's first new token
  int64_t num_tokens = 0;       // new tokens of the row in this step
  int64_t first_token = 0;      // index of the row's first token among the batch's real tokens
  std::vector<int32_t> input_ids;  // the row's new tokens
  bool samples = false;         // the row's last token produces a sampled token (decode, or last prefill chunk)
  int32_t sampled_id = -1;      // greedy argmax of `logits`, when samples
  std::vector<float> logits;    // [vocab] fp32 of the row's last token, when samples
  // The tokens the row commits: its sampled token, or in a TARGET_VERIFY row the target's tokens up
  // to the first that rejects a draft (accepted_tokens of them); the positions past those are not
  // kept, so the oracle replays only the first accepted_tokens inputs.
  std::vector<int32_t> new_tokens;
  int64_t accepted_tokens = -1;  // TARGET_VERIFY rows; -1 elsewhere (every token counts)
  int64_t checked_tokens() const { return accepted_tokens >= 0 ? accepted_tokens : num_tokens; }
  // MTP on: the MTP block's draft for the token after the sampled one (greedy) and its logits.
  int32_t draft_id = -1;
  std::vector<float> draft_logits;
  // Speculative decoding, rows that sample: the MTP block's own drafts for the next verify (draft_id
  // first, then the EAGLE chain's), before any test override; and the logits of drafts 2..k. A row
  // whose chain would pass max_seq_len (its request finishes in this step) has its first draft only.
  std::vector<int32_t> draft_ids;
  std::vector<std::vector<float>> chain_logits;
};

struct StepRecord {
  int64_t step = 0;
  serving::ForwardMode mode = serving::ForwardMode::idle;
  bool graph_replay = false;     // the step ran as a replay of a captured graph
  std::vector<StepRow> rows;     // real rows only, in batch order
  // Probes: key -> [real tokens of the batch, width] (empty when probes are off).
  std::map<std::string, ref::Mat> values;
};

}  // namespace dsv4::engine
