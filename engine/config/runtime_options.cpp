#include "engine/config/runtime_options.h"

#include <charconv>

#include "engine/core/error.h"

namespace dsv4 {

int64_t RuntimeOptions::effective_c4_ring_size() const {
  return speculative ? 2 * c4_ring_size : c4_ring_size;
}

int64_t RuntimeOptions::effective_c128_ring_size(const ModelConfig& model) const {
  const int64_t base = c128_ring_size > 0 ? c128_ring_size : model.c128_ratio();
  return speculative ? 2 * base : base;
}

void validate_runtime_options(const RuntimeOptions& o, const ModelConfig& model, const std::string& source) {
  auto expect = [&](bool ok, const char* field, const std::string& rule) {
    if (!ok) throw InputError(source, field, rule);
  };
  expect(o.page_size >= 1, "page_size", "must be >= 1, got " + std::to_string(o.page_size));
  expect(o.swa_page_size >= 1, "swa_page_size",
         "must be >= 1, got " + std::to_string(o.swa_page_size) +
             " (the SWA-slot to compress-state-row translation divides by it)");
  expect(o.c4_ring_size >= 1, "c4_ring_size", "must be >= 1");
  expect(o.c128_ring_size >= 0, "c128_ring_size", "must be >= 0 (0 means the layer's ratio)");
  expect(o.max_running_requests >= 1, "max_running_requests", "must be >= 1");
  expect(o.chunked_prefill_tokens >= 1, "chunked_prefill_tokens", "must be >= 1");

  const int64_t max_ratio = model.max_ratio();
  if (max_ratio > 0) {
    expect(o.page_size % max_ratio == 0, "page_size",
           "must be a multiple of the largest compress ratio (" + std::to_string(max_ratio) +
               "), or the compressed pools get pages of " + std::to_string(o.page_size / max_ratio) +
               " entries");
  }
  expect(o.page_size % o.swa_page_size == 0, "swa_page_size",
         "must divide page_size (" + std::to_string(o.page_size) + ")");

  bool has_c4 = false;
  for (int64_t l = 0; l < model.n_layers + model.n_mtp_layers; ++l) has_c4 = has_c4 || model.ratio(l) == 4;
  if (has_c4) {
    const int64_t ring = o.effective_c4_ring_size();
    expect(ring % 4 == 0 && ring >= 8, "c4_ring_size",
           "must be a multiple of 4 holding at least two blocks (the overlap reads the previous block)");
    expect(o.swa_page_size % ring == 0, "swa_page_size",
           "must be a multiple of the ratio-4 ring size (" + std::to_string(ring) + ")");
  }
  const int64_t c128 = model.c128_ratio();
  if (c128 > 0) {
    const int64_t ring = o.effective_c128_ring_size(model);
    expect(ring % c128 == 0, "c128_ring_size",
           "must be a multiple of the ratio (" + std::to_string(c128) + ")");
    expect(o.swa_page_size % ring == 0, "swa_page_size",
           "must be a multiple of the ratio-" + std::to_string(c128) + " ring size (" +
               std::to_string(ring) + ")");
  }

  expect(!o.batch_buckets.empty(), "batch_buckets", "needs at least one size");
  for (size_t i = 0; i < o.batch_buckets.size(); ++i) {
    expect(o.batch_buckets[i] >= 1, "batch_buckets", "sizes must be >= 1");
    if (i > 0) expect(o.batch_buckets[i] > o.batch_buckets[i - 1], "batch_buckets", "sizes must increase");
  }
  expect(o.batch_buckets.back() <= o.max_running_requests, "batch_buckets",
         "the largest bucket must be <= max_running_requests");
}

const std::vector<RuntimeFlag>& runtime_flags() {
  static const std::vector<RuntimeFlag> flags = {
      {"--page-size", "page_size", "tokens per page (default 256)"},
      {"--swa-page-size", "swa_page_size", "tokens per SWA cache page (default 256)"},
      {"--c4-ring-size", "c4_ring_size", "compress-state rows per SWA page, ratio-4 layers (default 8)"},
      {"--c128-ring-size", "c128_ring_size", "compress-state rows per SWA page, ratio-128 layers (default: the ratio)"},
      {"--speculative", "speculative", "double the rings for MTP drafts (true|false)"},
      {"--batch-buckets", "batch_buckets", "CUDA-graph batch sizes, comma-separated (default 1,2,4,...,64)"},
      {"--max-running-requests", "max_running_requests", "concurrent requests (default 64)"},
      {"--chunked-prefill-tokens", "chunked_prefill_tokens", "prefill chunk length (default 512)"},
  };
  return flags;
}

namespace {

int64_t parse_int(const std::string& flag, const std::string& field, const std::string& text) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end || text.empty()) {
    throw InputError(flag, field, "expects an integer, got '" + text + "'");
  }
  return value;
}

}  // namespace

bool apply_runtime_flag(RuntimeOptions& o, const std::string& flag, const std::string& value) {
  if (flag == "--page-size") {
    o.page_size = parse_int(flag, "page_size", value);
  } else if (flag == "--swa-page-size") {
    o.swa_page_size = parse_int(flag, "swa_page_size", value);
  } else if (flag == "--c4-ring-size") {
    o.c4_ring_size = parse_int(flag, "c4_ring_size", value);
  } else if (flag == "--c128-ring-size") {
    o.c128_ring_size = parse_int(flag, "c128_ring_size", value);
  } else if (flag == "--speculative") {
    if (value != "true" && value != "false") throw InputError(flag, "speculative", "expects true or false");
    o.speculative = value == "true";
  } else if (flag == "--batch-buckets") {
    o.batch_buckets.clear();
    size_t start = 0;
    while (start <= value.size()) {
      const size_t comma = value.find(',', start);
      const std::string item = value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      o.batch_buckets.push_back(parse_int(flag, "batch_buckets", item));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else if (flag == "--max-running-requests") {
    o.max_running_requests = parse_int(flag, "max_running_requests", value);
  } else if (flag == "--chunked-prefill-tokens") {
    o.chunked_prefill_tokens = parse_int(flag, "chunked_prefill_tokens", value);
  } else {
    return false;
  }
  return true;
}

}  // namespace dsv4
