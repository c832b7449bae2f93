// The generators of the property suites: one per domain concept, composed, each producing its
// degenerate corners on purpose, and shrinking as one value (a request mix and its runtime options,
// a PP size and its partition, a schedule strategy and its seed).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <rapidcheck.h>

#include "engine/config/model_config.h"
#include "properties/scenario.h"

namespace dsv4::props::gen {

// Prompt lengths on the boundaries that matter (1, 2, around the ratio-4 block, the window, the
// non-overlapping ratio's block, an indexer key page), or anywhere up to `max_len`.
rc::Gen<int64_t> prompt_length(const ModelConfig& config, int64_t max_len);
// 1..max_requests requests: independent lengths, all equal, or all short; staggered arrivals and
// decode lengths so that batches grow and shrink (idle padding rows, eager prefill between replays).
rc::Gen<std::vector<RequestSpec>> request_mix(const ModelConfig& config, int64_t max_requests);
// A partition of n_layers into 2..n_layers non-empty stages (cuts anywhere: on ratio-0, ratio-4
// and ratio-128 layers alike); shrinks towards one cut after the first layer.
rc::Gen<std::vector<int64_t>> pp_partition(int64_t n_layers);
// in-order, random:SEED, pct:SEED:DEPTH, or delay:STREAM:OPS over the first `streams` streams.
rc::Gen<std::string> schedule(int streams);

// The optional features of an engine scenario, in percent of the generated cases.
struct EngineMix {
  int max_requests = 3;
  int pp_percent = 25;        // a PP partition of >= 2 stages
  int cp_percent = 10;        // prefill CP over 2 or 4 ranks (never with PP or MTP)
  int mtp_percent = 25;       // speculative decoding with one draft token
  int int8_percent = 15;      // w8a8-int8 linears
  int graphs_percent = 50;
  int multi_stream_percent = 75;
  int shuffled_schedule_percent = 50;  // a schedule other than in-order
};

// Runtime geometry (page sizes, rings, buckets, chunk budget) valid for the config, and the rest of
// an engine scenario on the micro config.
rc::Gen<EngineSpec> engine_spec(const EngineMix& mix);

// The most devices (PP stages, CP ranks) engine_spec draws for; 0 (the default) is no limit. The
// runner sets it to the GPUs present while it runs on cuda, so that no case is drawn only to be
// skipped. DeviceLimit sets it for its lifetime.
int device_limit();
class DeviceLimit {
 public:
  explicit DeviceLimit(int devices);
  ~DeviceLimit();
  DeviceLimit(const DeviceLimit&) = delete;
  DeviceLimit& operator=(const DeviceLimit&) = delete;

 private:
  int saved_;
};

// invalid-config: a valid engine scenario with one runtime option set to a value that construction
// must refuse (0, 1, a non-divisor, a non-multiple, an unordered bucket list), and the field name.
rc::Gen<std::pair<EngineSpec, std::string>> invalid_engine_spec();

// index-translation: pool geometries (valid and not) with locations around every page boundary.
rc::Gen<TranslationSpec> translation_spec();

}  // namespace dsv4::props::gen
