// Serving-time options that are not part of the model: cache paging, compress-state rings, batching.
// Validated against the model config in one place (dsv4-model §5 "guard rule"), so that a page size
// of 0 or a ring that does not divide a page is refused at construction, never divided by in a kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config/model_config.h"

namespace dsv4 {

struct RuntimeOptions {
  int64_t page_size = 256;          // tokens per page of the full-token namespace
  int64_t swa_page_size = 256;      // tokens per page of the SWA cache; owns ring_size state rows each
  int64_t c4_ring_size = 8;         // compress-state rows per SWA page, ratio-4 layers (two blocks)
  int64_t c128_ring_size = 0;       // 0: the layer's ratio (one block)
  bool speculative = false;         // MTP: rings double (16 / 2 x ratio) so drafts never touch committed rows
  std::vector<int64_t> batch_buckets = {1, 2, 4, 8, 16, 32, 64};  // CUDA-graph batch sizes
  int64_t max_running_requests = 64;
  int64_t chunked_prefill_tokens = 512;

  // Rings actually used, given the model's ratios and the speculative switch.
  int64_t effective_c4_ring_size() const;
  int64_t effective_c128_ring_size(const ModelConfig& model) const;
};

// Where a value came from, so errors name the flag the user typed (or the file field).

// Throws InputError(source, field, rule) for the first rule that fails.
void validate_runtime_options(const RuntimeOptions& options, const ModelConfig& model,
                              const std::string& source = "runtime options");

// The command-line flags every model-running command accepts, e.g. "--swa-page-size".
struct RuntimeFlag {
  const char* flag;
  const char* field;
  const char* help;
};
const std::vector<RuntimeFlag>& runtime_flags();
// Applies one flag; returns false if `flag` is not a runtime flag. InputError(flag, field, ...) on a bad value.
bool apply_runtime_flag(RuntimeOptions& options, const std::string& flag, const std::string& value);

}  // namespace dsv4
