#include "engine/model/workload.h"

#include <algorithm>

#include "engine/core/error.h"
#include "reference/generate.h"

namespace dsv4::engine {

std::vector<int64_t> standard_prompt_lengths(const ModelConfig& config, int64_t count, int64_t decode) {
  const int64_t W = config.window_size;
  const int64_t R = std::max<int64_t>(config.c128_ratio(), 4);
  const int64_t longest = config.max_seq_len - decode - 1;
  if (longest < 1) throw InputError("--decode", "", "leaves no room for a prompt within max_seq_len");
  // The tiny config's mix (window 128): 1, 3, 127, 128, 129, 255, 513, 700.
  std::vector<int64_t> base = {1, 3, W - 1, W, W + 1, 2 * R - 1, 4 * R + 1, W * 11 / 2 - 4};
  std::vector<int64_t> out;
  for (int64_t i = 0; i < count; ++i) {
    int64_t len = base[static_cast<size_t>(i) % base.size()];
    // Past the first eight, shift so that repeats land on other offsets within a block.
    len += (i / static_cast<int64_t>(base.size())) * 5;
    out.push_back(std::clamp<int64_t>(len, 1, longest));
  }
  return out;
}

std::vector<WorkloadRequest> standard_workload(const ModelConfig& config, uint64_t seed, int64_t count, int64_t decode) {
  if (count < 1 || count > 64) throw InputError("--requests", "", "must be in [1, 64], got " + std::to_string(count));
  if (decode < 0) throw InputError("--decode", "", "must be >= 0, got " + std::to_string(decode));
  const std::vector<int64_t> lengths = standard_prompt_lengths(config, count, decode);
  static const int64_t arrivals[] = {0, 0, 1, 2, 4, 6, 9, 12};
  std::vector<WorkloadRequest> out;
  for (int64_t i = 0; i < count; ++i) {
    WorkloadRequest r;
    r.id = i;
    const std::vector<int64_t> p = ref::synthetic_prompt(config, seed + static_cast<uint64_t>(i), lengths[static_cast<size_t>(i)]);
    r.prompt_ids.assign(p.begin(), p.end());
    r.max_new_tokens = decode + 1;
    r.arrival_step = arrivals[i % 8] + 13 * (i / 8);
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace dsv4::engine
