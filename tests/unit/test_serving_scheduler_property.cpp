// Properties of the scheduler under generated request mixes (prompt lengths around the window,
// page and ratio boundaries, all equal or all short; chunk budgets from 1 token; staggered arrivals;
// aborts; stop ids) over random valid options, checked against an independent model:
//   every request's positions are scheduled exactly once and in order, and a request that was not
//   aborted runs to its end; no two live requests share a slot or a full-token location; every
//   EXTEND fits the chunk budget and every DECODE / IDLE batch its bucket, padded with null rows;
//   the upgraded metadata equals a from-scratch recomputation from the requests and the allocators,
//   also when a frozen (captured) metadata is refilled in place; and at the end every slot, page and
//   reservation is back.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/serving/compress_state_pool.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/forward_metadata.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/request.h"
#include "engine/serving/scheduler.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"

namespace dsv4::serving {
namespace {

const ModelConfig& model_named(const std::string& name) {
  static const std::map<std::string, ModelConfig> models = {
      {"micro", load_model_config("micro")},  // window 16, ratios 4 and 16
      {"tiny", load_model_config("tiny")},    // window 128, ratios 4 and 128
  };
  return models.at(name);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Arrival {
  int64_t prompt_len = 1;
  int64_t max_new_tokens = 1;
  int64_t arrival_step = 0;
};

struct AbortAt {
  int64_t step = 0;
  int64_t pick = 0;  // request index modulo the request count
};

struct Scenario {
  std::string model_name;
  RuntimeOptions options;
  int64_t max_seq_len = 0;
  int64_t full_page_count = 0;
  int64_t swa_page_count = 0;
  bool use_stop_id = false;
  std::vector<Arrival> arrivals;
  std::vector<AbortAt> aborts;
};

void showValue(const Scenario& s, std::ostream& os) {
  const RuntimeOptions& o = s.options;
  os << "model=" << s.model_name << " page_size=" << o.page_size << " swa_page_size=" << o.swa_page_size
     << " c4_ring=" << o.c4_ring_size << " c128_ring=" << o.c128_ring_size << " max_running=" << o.max_running_requests
     << " chunk=" << o.chunked_prefill_tokens << " buckets=" << o.batch_buckets.size() << " max_seq_len=" << s.max_seq_len
     << " full_pages=" << s.full_page_count << " swa_pages=" << s.swa_page_count << " stop=" << s.use_stop_id
     << "\n  arrivals:";
  for (const Arrival& a : s.arrivals) os << " (" << a.prompt_len << "+" << a.max_new_tokens << "@" << a.arrival_step << ")";
  os << "\n  aborts:";
  for (const AbortAt& a : s.aborts) os << " (#" << a.pick << "@" << a.step << ")";
}

// ---- generators ----------------------------------------------------------------------------------

rc::Gen<RuntimeOptions> gen_options(const ModelConfig& m) {
  const int64_t window = m.window_size;
  return rc::gen::map(
      rc::gen::tuple(rc::gen::weightedElement<int64_t>({{3, 8}, {1, 16}}), rc::gen::inRange<int64_t>(1, 3),
                     rc::gen::inRange<int64_t>(1, 3), rc::gen::inRange<int64_t>(1, 6),
                     rc::gen::weightedOneOf<int64_t>({{2, rc::gen::inRange<int64_t>(1, 9)},
                                                      {3, rc::gen::inRange<int64_t>(1, 3 * window + 1)}}),
                     rc::gen::inRange<int64_t>(0, 3)),
      [=](const std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>& t) {
        const auto [c4_ring, swa_mult, page_mult, max_running, chunk, bucket_kind] = t;
        RuntimeOptions o;
        o.c4_ring_size = c4_ring;
        o.c128_ring_size = 0;
        const int64_t ring_lcm = std::lcm(o.effective_c4_ring_size(), o.effective_c128_ring_size(m));
        o.swa_page_size = ring_lcm * swa_mult;
        o.page_size = std::lcm(o.swa_page_size, m.max_ratio()) * page_mult;
        o.max_running_requests = max_running;
        o.chunked_prefill_tokens = chunk;
        // The largest bucket is max_running_requests (validate_runtime_options wants it no larger).
        // Sizes increase.
        o.batch_buckets.clear();
        if (bucket_kind == 1 && max_running > 1) o.batch_buckets.push_back(1);
        if (bucket_kind == 2) {
          for (int64_t b = 1; b < max_running; b *= 2) o.batch_buckets.push_back(b);
        }
        o.batch_buckets.push_back(max_running);
        return o;
      });
}

rc::Gen<int64_t> gen_length(const ModelConfig& m, int64_t max_len) {
  const std::vector<int64_t> boundaries = {1, 4, 8, m.c128_ratio(), m.window_size, 2 * m.window_size};
  return rc::gen::oneOf(rc::gen::map(rc::gen::pair(rc::gen::elementOf(boundaries), rc::gen::inRange<int64_t>(-2, 3)),
                                     [=](const std::pair<int64_t, int64_t>& b) {
                                       return std::clamp<int64_t>(b.first + b.second, 1, max_len);
                                     }),
                        rc::gen::inRange<int64_t>(1, max_len + 1));
}

rc::Gen<std::vector<Arrival>> gen_arrivals(const ModelConfig& m, int64_t max_seq_len) {
  const int64_t max_prompt = max_seq_len - 4;
  const auto arrival = [=](rc::Gen<int64_t> prompt) {
    return rc::gen::map(rc::gen::tuple(prompt, rc::gen::inRange<int64_t>(1, 5), rc::gen::inRange<int64_t>(0, 12)),
                        [](const std::tuple<int64_t, int64_t, int64_t>& t) {
                          return Arrival{std::get<0>(t), std::get<1>(t), std::get<2>(t)};
                        });
  };
  const auto sized = [](auto gen) { return rc::gen::resize(12, rc::gen::container<std::vector<Arrival>>(gen)); };
  return rc::gen::weightedOneOf<std::vector<Arrival>>({
      {4, sized(arrival(gen_length(m, max_prompt)))},
      {1, sized(arrival(rc::gen::inRange<int64_t>(1, 4)))},  // all short
      {1, rc::gen::mapcat(gen_length(m, max_prompt), [=](int64_t len) {  // all equal
         return sized(arrival(rc::gen::just(len)));
       })},
  });
}

rc::Gen<Scenario> gen_scenario() {
  return rc::gen::mapcat(rc::gen::weightedElement<std::string>({{3, "micro"}, {1, "tiny"}}), [](const std::string& name) {
    const ModelConfig& m = model_named(name);
    return rc::gen::mapcat(gen_options(m), [name, &m](const RuntimeOptions& o) {
      const int64_t max_seq_len = 2 * m.window_size + 8;
      const int64_t full_need = ceil_div(max_seq_len, o.page_size);
      const int64_t swa_need = std::min(ceil_div(max_seq_len, o.swa_page_size),
                                        ceil_div(m.window_size + o.chunked_prefill_tokens, o.swa_page_size) + 1);
      return rc::gen::map(
          rc::gen::tuple(rc::gen::inRange<int64_t>(full_need, full_need * o.max_running_requests + 1),
                         rc::gen::inRange<int64_t>(swa_need, swa_need * o.max_running_requests + 1),
                         rc::gen::arbitrary<bool>(), gen_arrivals(m, max_seq_len),
                         rc::gen::resize(6, rc::gen::container<std::vector<AbortAt>>(rc::gen::construct<AbortAt>(
                                                rc::gen::inRange<int64_t>(0, 40), rc::gen::inRange<int64_t>(0, 12))))),
          [=](const auto& t) {
            Scenario s;
            s.model_name = name;
            s.options = o;
            s.max_seq_len = max_seq_len;
            s.full_page_count = std::get<0>(t) + 1;
            s.swa_page_count = std::get<1>(t) + 1;
            s.use_stop_id = std::get<2>(t);
            s.arrivals = std::get<3>(t);
            s.aborts = std::get<4>(t);
            return s;
          });
    });
  });
}

// ---- the independent model ---------------------------------------------------------------------

struct Tracked {
  int64_t next_pos = 0;  // positions [0, next_pos) were scheduled, once each, in order
};

int64_t state_row(int64_t swa_loc, int64_t sps, int64_t ring) { return (swa_loc / sps) * ring + swa_loc % ring; }

// The upgraded metadata recomputed from the batch rows, the requests' slots and the allocators'
// per-request locations (not from out_cache_loc and full_to_swa, which the upgrade uses).
void check_upgraded(const ForwardBatch& b, const UpgradedForwardMetadata& got, const TokenAllocator& full,
                    const SwaTokenAllocator& swa, const std::vector<int64_t>& ratios, const std::vector<int64_t>& rings) {
  RC_ASSERT(got.layers.size() == ratios.size());
  RC_ASSERT(got.indexer_context_lens_shape() == (std::array<int64_t, 2>{b.token_count(), 1}));
  int64_t t = 0;
  for (const ForwardRow& row : b.rows) {
    for (int64_t p = row.seq_len_before; p < row.seq_len_after; ++p, ++t) {
      const auto i = static_cast<size_t>(t);
      const int64_t loc = row.is_padding() ? 0 : full.loc(row.req_slot, p);
      const int64_t s = row.is_padding() ? 0 : swa.loc(row.req_slot, p);
      RC_ASSERT(got.positions[i] == p);
      RC_ASSERT(got.swa_loc[i] == s);
      RC_ASSERT(got.indexer_context_lens[i] == (p + 1) / 4);
      for (size_t l = 0; l < ratios.size(); ++l) {
        const int64_t r = ratios[l];
        RC_ASSERT(got.layers[l].ratio == r);
        RC_ASSERT(got.layers[l].write_loc[i] == (p % r == r - 1 ? loc / r : -1));
        RC_ASSERT(got.layers[l].state_row[i] == state_row(s, swa.swa_page_size(), rings[l]));
        RC_ASSERT(got.layers[l].visible_entries[i] == (p + 1) / r);
      }
    }
  }
  RC_ASSERT(t == b.token_count());
}

uintptr_t address(const std::vector<int64_t>& v) { return reinterpret_cast<uintptr_t>(v.data()); }

std::vector<uintptr_t> addresses(const ForwardMetadata& m) {
  std::vector<uintptr_t> out = {address(m.raw().req_slots), address(m.raw().out_cache_loc),
                                address(m.upgraded().positions), address(m.upgraded().swa_loc)};
  for (const CompressedLayerMetadata& l : m.upgraded().layers) out.push_back(address(l.state_row));
  return out;
}

RC_GTEST_PROP(ServingSchedulerProperty, EveryTokenOnceInOrderWithinBudgetsAndMetadataRecomputes, ()) {
  const Scenario sc = *gen_scenario();
  const ModelConfig& m = model_named(sc.model_name);
  const RuntimeOptions& o = sc.options;
  ReqToTokenPool slots(o.max_running_requests, sc.max_seq_len);
  TokenAllocator full(m, o, sc.full_page_count, sc.max_seq_len);
  SwaTokenAllocator swa(m, o, sc.swa_page_count, full.capacity_tokens());
  std::vector<std::unique_ptr<CompressStatePool>> pools;
  std::vector<const CompressStatePool*> pool_list;
  std::vector<int64_t> ratios;
  std::vector<int64_t> rings;
  for (int64_t layer = 0; layer < m.n_layers; ++layer) {
    if (m.ratio(layer) == 0) continue;
    pools.push_back(std::make_unique<CompressStatePool>(m, o, layer, CompressStateOwner::attention, sc.swa_page_count));
    pool_list.push_back(pools.back().get());
    ratios.push_back(m.ratio(layer));
    rings.push_back(m.ratio(layer) == 4 ? o.effective_c4_ring_size() : o.effective_c128_ring_size(m));
  }
  const int32_t kStop = 12;
  Scheduler scheduler(m, o, slots, full, swa, sc.use_stop_id ? std::vector<int32_t>{kStop} : std::vector<int32_t>{});

  const auto n = static_cast<int64_t>(sc.arrivals.size());
  std::map<int64_t, Tracked> tracked;
  int64_t last_arrival = 0;
  int64_t total_tokens = 0;
  for (int64_t id = 0; id < n; ++id) {
    const Arrival& a = sc.arrivals[static_cast<size_t>(id)];
    std::vector<int32_t> ids(static_cast<size_t>(a.prompt_len), 3);
    scheduler.add_request(id, ids, a.max_new_tokens, a.arrival_step);
    tracked[id] = Tracked{};
    last_arrival = std::max(last_arrival, a.arrival_step);
    total_tokens += a.prompt_len + a.max_new_tokens;
  }

  ForwardMetadata metadata(swa, pool_list);
  std::map<int64_t, std::unique_ptr<ForwardMetadata>> captured;  // by bucket, frozen
  const int64_t step_limit = last_arrival + total_tokens + 2 * n + 4;
  int64_t step = 0;
  for (; step < step_limit; ++step) {
    if (step > last_arrival && !scheduler.has_unfinished()) break;
    for (const AbortAt& a : sc.aborts) {
      if (a.step == step && n > 0) scheduler.abort(a.pick % n);
    }
    const ForwardBatch b = scheduler.schedule(step);

    // Batch shape: the budget, the bucket, the padding rows.
    if (b.mode == ForwardMode::extend) {
      RC_ASSERT(b.token_count() <= o.chunked_prefill_tokens);
      RC_ASSERT(b.real_row_count() == b.row_count());
    } else {
      RC_ASSERT(b.bucket_rows == batch_bucket(o.batch_buckets, std::max<int64_t>(b.real_row_count(), 1)));
      RC_ASSERT(b.row_count() == b.bucket_rows);
      for (const ForwardRow& row : b.rows) {
        if (!row.is_padding()) continue;
        RC_ASSERT(row.req_slot == 0 && row.seq_len_before == 0 && row.seq_len_after == 1);
      }
      RC_ASSERT((b.mode == ForwardMode::idle) == (b.real_row_count() == 0));
    }

    // Each position once, in order; distinct slots and locations.
    std::map<int64_t, int64_t> owner_by_loc;  // full location -> request id, over every live request
    std::map<int64_t, int64_t> owner_by_slot;
    for (int64_t id = 0; id < n; ++id) {
      const Request& r = scheduler.request(id);
      if (!r.holds_slot()) continue;
      RC_ASSERT(owner_by_slot.emplace(r.slot, id).second);
      for (int64_t p = 0; p < r.cached_len; ++p) RC_ASSERT(owner_by_loc.emplace(full.loc(r.slot, p), id).second);
    }
    int64_t t = 0;
    for (const ForwardRow& row : b.rows) {
      if (row.is_padding()) {
        t += 1;
        continue;
      }
      const Request& r = scheduler.request(row.request_id);
      Tracked& tr = tracked[row.request_id];
      RC_ASSERT(r.slot == row.req_slot);
      RC_ASSERT(row.seq_len_before == tr.next_pos);
      if (b.mode == ForwardMode::extend) {
        RC_ASSERT(row.seq_len_after <= r.prompt_len());
      } else {
        RC_ASSERT(row.seq_len_before >= r.prompt_len());
        RC_ASSERT(row.extend_len() == 1);
      }
      for (int64_t p = row.seq_len_before; p < row.seq_len_after; ++p, ++t) {
        RC_ASSERT(b.positions[static_cast<size_t>(t)] == p);
        const int64_t loc = b.out_cache_loc[static_cast<size_t>(t)];
        RC_ASSERT(loc == full.loc(r.slot, p));
        RC_ASSERT(owner_by_loc.at(loc) == row.request_id);
      }
      tr.next_pos = row.seq_len_after;
    }

    // The upgrade, lazily once, against the recomputation; and a frozen copy per bucket.
    metadata.set_raw(raw_forward_metadata(b));
    RC_ASSERT(metadata.upgrade());
    RC_ASSERT(!metadata.upgrade());
    check_upgraded(b, metadata.upgraded(), full, swa, ratios, rings);
    if (b.mode != ForwardMode::extend) {
      auto it = captured.find(b.bucket_rows);
      if (it == captured.end()) {
        auto frozen = std::make_unique<ForwardMetadata>(swa, pool_list);
        frozen->set_raw(raw_forward_metadata(b));
        frozen->upgrade();
        frozen->freeze();
        captured.emplace(b.bucket_rows, std::move(frozen));
      } else {
        const std::vector<uintptr_t> before = addresses(*it->second);
        it->second->assign_from(raw_forward_metadata(b));
        RC_ASSERT(it->second->upgrade());
        RC_ASSERT(addresses(*it->second) == before);
        check_upgraded(b, it->second->upgraded(), full, swa, ratios, rings);
      }
    }

    std::vector<int32_t> sampled;
    for (const ForwardRow& row : b.rows) {
      if (row.is_padding()) continue;
      const auto g = static_cast<int32_t>(scheduler.request(row.request_id).generated_ids.size());
      sampled.push_back(static_cast<int32_t>((row.request_id * 31 + g * 7 + 5) % 13));
    }
    scheduler.commit(b, sampled);
  }

  // Liveness and completeness: every request ends; one that was not aborted scheduled its prompt
  // and every generated token but the newest.
  RC_ASSERT(!scheduler.has_unfinished());
  for (int64_t id = 0; id < n; ++id) {
    const Request& r = scheduler.request(id);
    RC_ASSERT(r.is_done());
    if (r.state == RequestState::aborted) {
      RC_ASSERT(tracked[id].next_pos <= r.max_cached_len());
      continue;
    }
    const auto generated = static_cast<int64_t>(r.generated_ids.size());
    RC_ASSERT(generated >= 1);
    const bool stopped = sc.use_stop_id && r.generated_ids.back() == kStop;
    RC_ASSERT(generated == r.max_new_tokens || stopped);
    RC_ASSERT(tracked[id].next_pos == r.prompt_len() + generated - 1);
  }
  RC_ASSERT(slots.free_slot_count() == o.max_running_requests);
  RC_ASSERT(full.free_page_count() == full.page_count() - 1);
  RC_ASSERT(swa.free_page_count() == swa.page_count() - 1);
  RC_ASSERT(scheduler.reserved_full_pages() == 0);
  RC_ASSERT(scheduler.reserved_swa_pages() == 0);
}

}  // namespace
}  // namespace dsv4::serving
