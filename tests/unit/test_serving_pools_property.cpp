// Properties of the serving pools under random request traffic (arrivals with lengths around the
// window and ratio boundaries, chunked prefill, decode steps, completion and abort) over random
// valid runtime options: no two live requests ever share a request slot, a full-token location, a
// SWA location, a compressed entry or a compress-state row; every live position maps to a valid
// location; the window slides by whole pages exactly as the rule says; freed pages are reused; and
// the index translations are total. Generators are composed with rc::gen, so a failing traffic
// shrinks together with the options it ran on.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <ostream>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/core/error.h"
#include "engine/serving/compress_state_pool.h"
#include "engine/serving/compressed_locations.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"

namespace dsv4::serving {
namespace {

// ---- domain values -------------------------------------------------------------------------------

// By value: GCC 13's -Wdangling-reference would take a temporary string argument for a risk.
const ModelConfig& model_named(std::string_view name) {
  static const std::map<std::string, ModelConfig> models = {
      {"micro", load_model_config("micro")},  // window 16, ratios 4 and 16
      {"tiny", load_model_config("tiny")},    // window 128, ratios 4 and 128
  };
  return models.at(std::string(name));
}

int64_t first_layer_with(const ModelConfig& m, bool ratio_4) {
  for (int64_t l = 0; l < m.n_layers; ++l) {
    if (ratio_4 ? m.ratio(l) == 4 : m.ratio(l) > 4) return l;
  }
  return -1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class OpKind { arrive, prefill_chunk, decode, finish, abort };

struct Op {
  OpKind kind = OpKind::decode;
  int64_t length = 0;  // arrive: prompt tokens; prefill_chunk: chunk tokens; decode: steps
  int64_t pick = 0;    // which live request (modulo the live count)
};

struct PoolSizes {
  int64_t max_seq_len = 0;
  int64_t full_page_count = 0;  // page 0 included
  int64_t swa_page_count = 0;   // page 0 included
};

struct Scenario {
  std::string model_name;
  RuntimeOptions options;
  PoolSizes sizes;
  std::vector<Op> ops;
};

void showValue(const Op& op, std::ostream& os) {
  static const char* names[] = {"arrive", "prefill_chunk", "decode", "finish", "abort"};
  os << names[static_cast<int>(op.kind)] << "(length=" << op.length << ", pick=" << op.pick << ")";
}

void showValue(const Scenario& s, std::ostream& os) {
  const RuntimeOptions& o = s.options;
  os << "model=" << s.model_name << " page_size=" << o.page_size << " swa_page_size=" << o.swa_page_size
     << " c4_ring_size=" << o.c4_ring_size << " c128_ring_size=" << o.c128_ring_size
     << " speculative=" << o.speculative << " max_running_requests=" << o.max_running_requests
     << " chunked_prefill_tokens=" << o.chunked_prefill_tokens << " max_seq_len=" << s.sizes.max_seq_len
     << " full_pages=" << s.sizes.full_page_count << " swa_pages=" << s.sizes.swa_page_count << "\n  ops:";
  for (const Op& op : s.ops) {
    os << "\n    ";
    showValue(op, os);
  }
}

// ---- generators ------------------------------------------------------------------------------------

// Valid options by construction: rings first, then the SWA page as a multiple of every ring, then the
// page as a multiple of the SWA page and of the largest ratio.
rc::Gen<RuntimeOptions> gen_runtime_options(const ModelConfig& m) {
  const int64_t c128 = m.c128_ratio();
  const int64_t max_ratio = m.max_ratio();
  const int64_t window = m.window_size;
  return rc::gen::mapcat(
      rc::gen::tuple(rc::gen::weightedElement<int64_t>({{4, 8}, {1, 12}, {1, 16}}),
                     rc::gen::weightedElement<int64_t>({{4, 0}, {1, 1}, {1, 2}}),
                     rc::gen::weightedElement<bool>({{3, false}, {1, true}})),
      [=](const std::tuple<int64_t, int64_t, bool>& rings) {
        const auto [c4_ring, c128_ring_blocks, speculative] = rings;
        RuntimeOptions o;
        o.c4_ring_size = c4_ring;
        o.c128_ring_size = c128_ring_blocks * c128;  // 0: the ratio
        o.speculative = speculative;
        const int64_t ring_lcm = std::lcm(o.effective_c4_ring_size(), o.effective_c128_ring_size(m));
        return rc::gen::map(
            rc::gen::tuple(rc::gen::inRange<int64_t>(1, 3), rc::gen::inRange<int64_t>(1, 4),
                           rc::gen::inRange<int64_t>(1, 7), rc::gen::inRange<int64_t>(1, 3 * window + 1)),
            [=](const std::tuple<int64_t, int64_t, int64_t, int64_t>& t) {
              const auto [swa_pages_of_rings, pages_of_swa, max_running, chunk] = t;
              RuntimeOptions out = o;
              out.swa_page_size = ring_lcm * swa_pages_of_rings;
              out.page_size = std::lcm(out.swa_page_size, max_ratio) * pages_of_swa;
              out.max_running_requests = max_running;
              out.batch_buckets = {1};
              out.chunked_prefill_tokens = chunk;
              return out;
            });
      });
}

// Requests long enough to slide their window over several SWA pages; pools from barely one page
// (out-of-memory is common) to enough for every request.
rc::Gen<PoolSizes> gen_pool_sizes(const ModelConfig& m, const RuntimeOptions& o) {
  const int64_t window = m.window_size;
  const int64_t sps = o.swa_page_size;
  const auto gen_max_seq_len = rc::gen::weightedOneOf<int64_t>(
      {{1, rc::gen::inRange<int64_t>(window / 2, 2 * window + 1)},
       {3, rc::gen::inRange<int64_t>(window + sps, window + 3 * sps + 1)}});
  return rc::gen::mapcat(gen_max_seq_len, [=](int64_t max_seq_len) {
    const int64_t full_pages_per_request = ceil_div(max_seq_len, o.page_size);
    const int64_t full_pages_max = o.max_running_requests * full_pages_per_request;
    const int64_t swa_pages_per_request =
        ceil_div(window + std::min(o.chunked_prefill_tokens, max_seq_len), o.swa_page_size) + 1;
    const int64_t swa_pages_max = o.max_running_requests * swa_pages_per_request;
    const auto tight_or_roomy = [](int64_t per_request, int64_t all) {
      return rc::gen::weightedOneOf<int64_t>({{1, rc::gen::inRange<int64_t>(1, per_request + 1)},
                                              {3, rc::gen::inRange<int64_t>(per_request, all + 1)}});
    };
    return rc::gen::map(rc::gen::pair(tight_or_roomy(full_pages_per_request, full_pages_max),
                                      tight_or_roomy(swa_pages_per_request, swa_pages_max)),
                        [=](const std::pair<int64_t, int64_t>& usable) {
                          return PoolSizes{max_seq_len, usable.first + 1, usable.second + 1};
                        });
  });
}

// Prompt lengths at and around the boundaries where pages, windows and blocks turn over.
rc::Gen<int64_t> gen_prompt_length(const ModelConfig& m, const RuntimeOptions& o, int64_t max_seq_len) {
  const std::vector<int64_t> boundaries = {1, 4, m.c128_ratio(), m.window_size, 2 * m.window_size,
                                           o.swa_page_size, o.page_size, max_seq_len};
  return rc::gen::oneOf(
      rc::gen::map(rc::gen::pair(rc::gen::elementOf(boundaries), rc::gen::inRange<int64_t>(-2, 3)),
                   [=](const std::pair<int64_t, int64_t>& b) {
                     return std::clamp<int64_t>(b.first + b.second, 1, max_seq_len);
                   }),
      rc::gen::inRange<int64_t>(1, max_seq_len + 1));
}

rc::Gen<Op> gen_op(const ModelConfig& m, const RuntimeOptions& o, int64_t max_seq_len) {
  const auto pick = rc::gen::inRange<int64_t>(0, 8);
  const auto make = [](OpKind kind) {
    return [kind](const std::pair<int64_t, int64_t>& lp) { return Op{kind, lp.first, lp.second}; };
  };
  return rc::gen::weightedOneOf<Op>({
      {3, rc::gen::map(rc::gen::pair(gen_prompt_length(m, o, max_seq_len), rc::gen::just<int64_t>(0)), make(OpKind::arrive))},
      {3, rc::gen::map(rc::gen::pair(rc::gen::inRange<int64_t>(1, o.chunked_prefill_tokens + 1), pick), make(OpKind::prefill_chunk))},
      {5, rc::gen::map(rc::gen::pair(rc::gen::inRange<int64_t>(1, m.window_size + 1), rc::gen::just<int64_t>(0)), make(OpKind::decode))},
      {1, rc::gen::map(rc::gen::pair(rc::gen::just<int64_t>(0), pick), make(OpKind::finish))},
      {1, rc::gen::map(rc::gen::pair(rc::gen::just<int64_t>(0), pick), make(OpKind::abort))},
  });
}

rc::Gen<Scenario> gen_scenario() {
  return rc::gen::mapcat(rc::gen::weightedElement<std::string>({{3, "micro"}, {1, "tiny"}}), [](const std::string& name) {
    const ModelConfig& m = model_named(name);
    return rc::gen::mapcat(gen_runtime_options(m), [name, &m](const RuntimeOptions& o) {
      return rc::gen::mapcat(gen_pool_sizes(m, o), [name, &m, o](const PoolSizes& sizes) {
        return rc::gen::map(rc::gen::container<std::vector<Op>>(gen_op(m, o, sizes.max_seq_len)),
                            [name, o, sizes](std::vector<Op> ops) { return Scenario{name, o, sizes, std::move(ops)}; });
      });
    });
  });
}

// ---- the pools under test, with an independent model of what they should hold -------------------

struct LiveRequest {
  int64_t slot = 0;
  int64_t prompt_len = 0;
  int64_t seq_len = 0;
  int64_t swa_first_page_index = 0;  // the model's own slide rule
};

class PoolsUnderTest {
 public:
  explicit PoolsUnderTest(const Scenario& s)
      : model_(model_named(s.model_name)),
        options_(s.options),
        sizes_(s.sizes),
        reqs_(s.options.max_running_requests, s.sizes.max_seq_len),
        full_(model_, s.options, s.sizes.full_page_count, s.sizes.max_seq_len),
        swa_(model_, s.options, s.sizes.swa_page_count, full_.capacity_tokens()),
        c4_(model_, s.options, first_layer_with(model_, true), CompressStateOwner::attention, s.sizes.swa_page_count),
        c4_indexer_(model_, s.options, first_layer_with(model_, true), CompressStateOwner::indexer, s.sizes.swa_page_count),
        c128_(model_, s.options, first_layer_with(model_, false), CompressStateOwner::attention, s.sizes.swa_page_count) {}

  void run(const Op& op) {
    switch (op.kind) {
      case OpKind::arrive: arrive(op.length); break;
      case OpKind::prefill_chunk: prefill_chunk(op.pick, op.length); break;
      case OpKind::decode: decode(op.length); break;
      case OpKind::finish: release(op.pick, "finish"); break;
      case OpKind::abort: release(op.pick, "abort"); break;
    }
  }

  void finish_all() {
    for (int64_t guard = 0; !live_.empty(); ++guard) {
      RC_ASSERT(guard <= options_.max_running_requests);
      release(0, nullptr);
    }
  }

  // After everything is released: every page free and every mapping gone; then one request takes
  // the whole full pool again, and decodes through the SWA pool, reusing every page ever freed.
  void check_all_free_and_reusable() {
    RC_ASSERT(reqs_.free_slot_count() == options_.max_running_requests);
    RC_ASSERT(full_.free_page_count() == full_.page_count() - 1);
    RC_ASSERT(swa_.free_page_count() == swa_.page_count() - 1);
    for (int64_t loc = 0; loc < full_.capacity_tokens(); ++loc) RC_ASSERT(swa_.full_to_swa(loc) == (loc == 0 ? 0 : -1));
    const int64_t len = std::min(sizes_.max_seq_len, (full_.page_count() - 1) * full_.page_size());
    const int64_t slot = *reqs_.alloc();
    RC_ASSERT(full_.extend(slot, len).ok);
    full_.write_locs(slot, 0, len, reqs_.row(slot));
    // Decoding holds at most the window's pages plus one.
    const int64_t sps = swa_.swa_page_size();
    if (swa_.page_count() - 1 >= ceil_div(model_.window_size, sps) + 1) {
      for (int64_t grown = 1; grown <= len; ++grown) RC_ASSERT(swa_.extend(slot, grown, reqs_.row(slot)).ok);
    } else {
      events_.insert("SWA pool smaller than one window");
    }
    swa_.release(slot);
    full_.release(slot);
    reqs_.free(slot);
  }

  // One tag per kind of event this case saw, for rapidcheck's distribution table.
  void tag_events() const {
    for (const std::string& e : events_) RC_TAG(e);
  }

  void check() const {
    std::vector<int64_t> slots;
    std::vector<int64_t> full_locs;
    std::vector<int64_t> swa_locs;
    std::vector<int64_t> c4_locs;
    std::vector<int64_t> c128_locs;
    std::vector<std::pair<int64_t, int64_t>> c4_rows;  // (row, slot): one request may reuse its own rows (the ring)
    std::vector<std::pair<int64_t, int64_t>> c128_rows;
    int64_t full_pages_held = 0;
    int64_t swa_pages_held = 0;
    const int64_t ps = full_.page_size();
    const int64_t sps = swa_.swa_page_size();
    for (const LiveRequest& r : live_) {
      slots.push_back(r.slot);
      RC_ASSERT(reqs_.is_live(r.slot));
      RC_ASSERT(full_.seq_len(r.slot) == r.seq_len);
      RC_ASSERT(swa_.seq_len(r.slot) == r.seq_len);
      RC_ASSERT(swa_.first_held_pos(r.slot) == std::min(r.seq_len, r.swa_first_page_index * sps));
      full_pages_held += ceil_div(r.seq_len, ps);
      swa_pages_held += std::max<int64_t>(0, ceil_div(r.seq_len, sps) - r.swa_first_page_index);
      const std::span<const int32_t> row = reqs_.row(r.slot);
      // The last processed query (seq_len - 1) saw positions >= seq_len - window.
      const int64_t must_hold_from = std::max<int64_t>(0, r.seq_len - model_.window_size);
      for (int64_t pos = 0; pos < r.seq_len; ++pos) {
        const int64_t full_loc = full_.loc(r.slot, pos);
        RC_ASSERT(full_loc == row[static_cast<size_t>(pos)]);
        RC_ASSERT(full_loc >= ps);  // never the null page
        RC_ASSERT(full_loc < full_.capacity_tokens());
        full_locs.push_back(full_loc);
        const bool held = pos / sps >= r.swa_first_page_index;
        RC_ASSERT(swa_.is_held(r.slot, pos) == held);
        if (pos >= must_hold_from) RC_ASSERT(held);
        if (!held) {
          RC_ASSERT(swa_.full_to_swa(full_loc) == -1);
          continue;
        }
        const int64_t swa_loc = swa_.loc(r.slot, pos);
        RC_ASSERT(swa_loc >= sps);  // never the null page
        RC_ASSERT(swa_loc < swa_.capacity_tokens());
        RC_ASSERT(swa_.full_to_swa(full_loc) == swa_loc);
        swa_locs.push_back(swa_loc);
        const int64_t c4_row = c4_.translate_swa_loc_to_state_row(swa_loc);
        RC_ASSERT(c4_row >= c4_.ring_size());  // never a row of the null page
        RC_ASSERT(c4_row < c4_.used_row_count());
        RC_ASSERT(c4_indexer_.translate_swa_loc_to_state_row(swa_loc) == c4_row);
        c4_rows.emplace_back(c4_row, r.slot);
        const int64_t c128_row = c128_.translate_swa_loc_to_state_row(swa_loc);
        RC_ASSERT(c128_row >= c128_.ring_size());
        RC_ASSERT(c128_row < c128_.used_row_count());
        c128_rows.emplace_back(c128_row, r.slot);
      }
      for (int64_t e = 0; e < compressed_entry_count(r.seq_len, 4); ++e) {
        c4_locs.push_back(compressed_entry_loc(row, r.seq_len, e, 4));
      }
      const int64_t ratio = c128_.ratio();
      for (int64_t e = 0; e < compressed_entry_count(r.seq_len, ratio); ++e) {
        c128_locs.push_back(compressed_entry_loc(row, r.seq_len, e, ratio));
      }
    }
    RC_ASSERT(all_distinct(slots));
    RC_ASSERT(all_distinct(full_locs));
    RC_ASSERT(all_distinct(swa_locs));
    RC_ASSERT(all_distinct(c4_locs));
    RC_ASSERT(all_distinct(c128_locs));
    RC_ASSERT(rows_owned_by_one_request(c4_rows));
    RC_ASSERT(rows_owned_by_one_request(c128_rows));
    for (int64_t loc : c4_locs) RC_ASSERT(loc >= ps / 4 && loc < full_.capacity_tokens() / 4);
    // Conservation: what the model says is held plus what is free is the whole pool.
    RC_ASSERT(reqs_.free_slot_count() + static_cast<int64_t>(live_.size()) == options_.max_running_requests);
    RC_ASSERT(full_.free_page_count() + full_pages_held == full_.page_count() - 1);
    RC_ASSERT(swa_.free_page_count() + swa_pages_held == swa_.page_count() - 1);
  }

 private:
  static bool all_distinct(std::vector<int64_t> values) {
    std::sort(values.begin(), values.end());
    return std::adjacent_find(values.begin(), values.end()) == values.end();
  }

  static bool rows_owned_by_one_request(std::vector<std::pair<int64_t, int64_t>> rows) {
    std::sort(rows.begin(), rows.end());
    for (size_t i = 1; i < rows.size(); ++i) {
      if (rows[i].first == rows[i - 1].first && rows[i].second != rows[i - 1].second) return false;
    }
    return true;
  }

  // Grows a request in all pools, or in none when either is short of pages.
  bool grow(LiveRequest& r, int64_t new_seq_len) {
    RC_ASSERT(new_seq_len > r.seq_len);
    RC_ASSERT(new_seq_len <= sizes_.max_seq_len);
    // The model's page arithmetic, independent of the allocators'.
    const int64_t full_needed = ceil_div(new_seq_len, full_.page_size()) - ceil_div(r.seq_len, full_.page_size());
    const int64_t sps = swa_.swa_page_size();
    const int64_t swa_keep_index = std::max<int64_t>(0, r.seq_len - model_.window_size + 1) / sps;
    const int64_t swa_slid = std::max<int64_t>(0, swa_keep_index - r.swa_first_page_index);
    const int64_t swa_needed = ceil_div(new_seq_len, sps) - ceil_div(r.seq_len, sps);
    const bool full_fits = full_needed <= full_.free_page_count();
    const bool swa_fits = swa_needed <= swa_.free_page_count() + swa_slid;
    RC_ASSERT(full_.can_extend(r.slot, new_seq_len) == full_fits);
    RC_ASSERT(swa_.can_extend(r.slot, new_seq_len) == swa_fits);
    if (!full_fits || !swa_fits) {
      events_.insert("out of pages");
      if (!full_fits) RC_ASSERT(!full_.extend(r.slot, new_seq_len).ok);
      if (!swa_fits) RC_ASSERT(!swa_.extend(r.slot, new_seq_len, reqs_.row(r.slot)).ok);
      RC_ASSERT(full_.seq_len(r.slot) == r.seq_len);
      RC_ASSERT(swa_.seq_len(r.slot) == r.seq_len);
      return false;
    }
    RC_ASSERT(full_.extend(r.slot, new_seq_len).ok);
    full_.write_locs(r.slot, r.seq_len, new_seq_len, reqs_.row(r.slot));
    RC_ASSERT(swa_.extend(r.slot, new_seq_len, reqs_.row(r.slot)).ok);
    if (swa_slid > 0) events_.insert("window slid");
    r.swa_first_page_index = std::max(r.swa_first_page_index, swa_keep_index);
    r.seq_len = new_seq_len;
    if (new_seq_len >= sps + model_.window_size) events_.insert("a window past one SWA page");
    return true;
  }

  void arrive(int64_t prompt_len) {
    const std::optional<int64_t> slot = reqs_.alloc();
    if (!slot) {
      events_.insert("all slots taken");
      return;
    }
    live_.push_back(LiveRequest{*slot, prompt_len, 0, 0});
    grow(live_.back(), std::min(prompt_len, options_.chunked_prefill_tokens));
  }

  void prefill_chunk(int64_t pick, int64_t chunk_len) {
    if (live_.empty()) return;
    LiveRequest& r = live_[static_cast<size_t>(pick) % live_.size()];
    const int64_t target = std::min(r.seq_len + chunk_len, sizes_.max_seq_len);
    if (target > r.seq_len) grow(r, target);
  }

  // Scheduler steps: requests still in prefill take their next chunk, the others one token.
  void decode(int64_t steps) {
    for (int64_t step = 0; step < steps; ++step) {
      for (LiveRequest& r : live_) {
        const int64_t next = r.seq_len < r.prompt_len
                                 ? std::min(r.prompt_len, r.seq_len + options_.chunked_prefill_tokens)
                                 : std::min(sizes_.max_seq_len, r.seq_len + 1);
        if (next > r.seq_len) grow(r, next);
      }
    }
  }

  void release(int64_t pick, const char* why) {
    if (live_.empty()) return;
    const size_t index = static_cast<size_t>(pick) % live_.size();
    const int64_t slot = live_[index].slot;
    swa_.release(slot);
    full_.release(slot);
    reqs_.free(slot);
    live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(index));
    if (why != nullptr) events_.insert(why);
  }

  const ModelConfig& model_;
  RuntimeOptions options_;
  PoolSizes sizes_;
  ReqToTokenPool reqs_;
  TokenAllocator full_;
  SwaTokenAllocator swa_;
  CompressStatePool c4_;
  CompressStatePool c4_indexer_;
  CompressStatePool c128_;
  std::vector<LiveRequest> live_;
  std::set<std::string> events_;
};

RC_GTEST_PROP(ServingPoolsProperty, LiveRequestsNeverShareAndFreedPagesAreReused, ()) {
  const Scenario s = *gen_scenario();
  validate_runtime_options(s.options, model_named(s.model_name));  // the generator's own promise
  PoolsUnderTest pools(s);
  for (const Op& op : s.ops) {
    pools.run(op);
    pools.check();
  }
  pools.finish_all();
  pools.check();
  pools.check_all_free_and_reusable();
  pools.tag_events();
}

// ---- totality of the translations, including options the guard must refuse -----------------------

rc::Gen<int64_t> gen_any_loc(int64_t valid_end) {
  return rc::gen::oneOf(rc::gen::arbitrary<int64_t>(), rc::gen::inRange<int64_t>(-3, valid_end + 3),
                        rc::gen::elementOf(std::vector<int64_t>{std::numeric_limits<int64_t>::min(),
                                                                std::numeric_limits<int64_t>::max(), -1, 0,
                                                                valid_end - 1, valid_end}));
}

RC_GTEST_PROP(ServingPoolsProperty, TranslateSwaLocToStateRowIsTotal, ()) {
  const std::string name = *rc::gen::element<std::string>("micro", "tiny");
  const ModelConfig& m = model_named(name);
  const RuntimeOptions o = *gen_runtime_options(m);
  const int64_t swa_page_count = *rc::gen::inRange<int64_t>(2, 64);
  const bool indexer = *rc::gen::arbitrary<bool>();
  const bool c4_layer = indexer || *rc::gen::arbitrary<bool>();
  const CompressStatePool pool(m, o, first_layer_with(m, c4_layer),
                               indexer ? CompressStateOwner::indexer : CompressStateOwner::attention, swa_page_count);
  const SwaTokenAllocator swa(m, o, swa_page_count, 2 * o.page_size);
  const int64_t swa_end = swa_page_count * o.swa_page_size;
  const int64_t swa_loc = *gen_any_loc(swa_end);
  const int64_t row = pool.translate_swa_loc_to_state_row(swa_loc);
  const bool valid = swa_loc >= 0 && swa_loc < swa_end;
  RC_ASSERT(valid == (row != -1));
  if (valid) {
    RC_ASSERT(row >= 0);
    RC_ASSERT(row < pool.used_row_count());
    RC_ASSERT(row < pool.clean_row());
    RC_ASSERT(row / pool.ring_size() == swa_loc / o.swa_page_size);  // inside its SWA page's rows
    RC_ASSERT(row % pool.ratio() == swa_loc % pool.ratio());         // the block position is kept
  }
  const int64_t full_loc = *gen_any_loc(2 * o.page_size);
  const int64_t mapped = swa.full_to_swa(full_loc);
  RC_ASSERT(mapped == (full_loc == 0 ? 0 : -1));  // nothing is allocated: only the null location maps
  RC_ASSERT(pool.row_count() % pool.ratio() == 0);
  RC_TAG(valid ? "valid SWA location" : "invalid SWA location");
}

// Valid options with at most one field replaced by a small value (0 and 1 included), so a ring may
// no longer divide the SWA page: construction either refuses with an InputError naming a field
// (swa_page_size when it is below 1), or the guard rules hold and translation stays total.
enum class Corrupted { none, page_size, swa_page_size, c4_ring_size, c128_ring_size };

RC_GTEST_PROP(ServingPoolsProperty, ConstructionRefusesOrTranslatesTotally, ()) {
  const ModelConfig& m = model_named(*rc::gen::element<std::string>("micro", "tiny"));
  RuntimeOptions o = *gen_runtime_options(m);
  const Corrupted corrupted = *rc::gen::element(Corrupted::none, Corrupted::page_size, Corrupted::swa_page_size,
                                                Corrupted::c4_ring_size, Corrupted::c128_ring_size);
  const int64_t value = *rc::gen::oneOf(rc::gen::inRange<int64_t>(-1, 20),
                                        rc::gen::elementOf(std::vector<int64_t>{24, 32, 48, 64, 96, 128, 256, 512}));
  switch (corrupted) {
    case Corrupted::none: break;
    case Corrupted::page_size: o.page_size = value; break;
    case Corrupted::swa_page_size: o.swa_page_size = value; break;
    case Corrupted::c4_ring_size: o.c4_ring_size = value; break;
    case Corrupted::c128_ring_size: o.c128_ring_size = value; break;
  }
  const int64_t layer = first_layer_with(m, *rc::gen::arbitrary<bool>());
  try {
    const CompressStatePool pool(m, o, layer, CompressStateOwner::attention, 4);
    RC_ASSERT(o.page_size % m.max_ratio() == 0);
    RC_ASSERT(o.swa_page_size >= 1);
    RC_ASSERT(o.page_size % o.swa_page_size == 0);
    RC_ASSERT(o.swa_page_size % pool.ring_size() == 0);
    RC_ASSERT(pool.ring_size() % pool.ratio() == 0);
    const int64_t swa_loc = *gen_any_loc(4 * o.swa_page_size);
    const int64_t row = pool.translate_swa_loc_to_state_row(swa_loc);
    RC_ASSERT(row == -1 || (row >= 0 && row < pool.used_row_count()));
    RC_TAG("accepted");
  } catch (const InputError& e) {
    const std::string field = e.field();
    RC_ASSERT(corrupted != Corrupted::none);
    RC_ASSERT(field == "page_size" || field == "swa_page_size" || field == "c4_ring_size" ||
              field == "c128_ring_size");
    if (corrupted == Corrupted::swa_page_size && value < 1) RC_ASSERT(field == "swa_page_size");
    RC_TAG("refused: " + field);
  }
}

}  // namespace
}  // namespace dsv4::serving
