#include "properties/generators.h"

#include <algorithm>
#include <numeric>
#include <limits>
#include <set>

#include "engine/config/runtime_options.h"
#include "engine/core/error.h"

namespace dsv4::props::gen {

namespace {

const char* const kConfig = "micro";  // every structure of the model at sizes where a case costs ~0.1 s

rc::Gen<bool> percent(int p) {
  return rc::gen::weightedElement<bool>({{static_cast<size_t>(100 - p), false}, {static_cast<size_t>(p), true}});
}

}  // namespace

rc::Gen<int64_t> prompt_length(const ModelConfig& config, int64_t max_len) {
  const int64_t w = config.window_size, r = std::max<int64_t>(config.c128_ratio(), 4), page = 64;
  std::set<int64_t> corners;
  for (int64_t c : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{4}, int64_t{5}, w - 1, w, w + 1, r - 1, r, r + 1,
                    2 * r - 1, 2 * r, 2 * r + 1, page - 1, page, page + 1, 2 * w + 3}) {
    if (c >= 1 && c <= max_len) corners.insert(c);
  }
  const std::vector<int64_t> corner_list(corners.begin(), corners.end());
  return rc::gen::weightedOneOf<int64_t>(
      {{3, rc::gen::elementOf(corner_list)}, {1, rc::gen::inRange<int64_t>(1, max_len + 1)}});
}

rc::Gen<std::vector<RequestSpec>> request_mix(const ModelConfig& config, int64_t max_requests) {
  const int64_t max_prompt = std::min<int64_t>(config.max_seq_len / 2, 160);
  const int32_t vocab = static_cast<int32_t>(config.vocab_size);
  return rc::gen::exec([=] {
    const int64_t n = *rc::gen::inRange<int64_t>(1, max_requests + 1);
    // 0: independent lengths, 1: all equal, 2: all short.
    const int shape = *rc::gen::weightedElement<int>({{4, 0}, {1, 1}, {1, 2}});
    const int64_t shared = *prompt_length(config, max_prompt);
    std::vector<RequestSpec> out;
    for (int64_t i = 0; i < n; ++i) {
      RequestSpec r;
      r.id = i;
      const int64_t len = shape == 1   ? shared
                          : shape == 2 ? *rc::gen::inRange<int64_t>(1, 4)
                                       : *prompt_length(config, max_prompt);
      r.prompt = *rc::gen::container<std::vector<int32_t>>(static_cast<size_t>(len), rc::gen::inRange<int32_t>(2, vocab));
      r.max_new_tokens = 1 + *rc::gen::inRange<int64_t>(0, 6);
      r.arrival_step = *rc::gen::inRange<int64_t>(0, 4);
      out.push_back(std::move(r));
    }
    return out;
  });
}

rc::Gen<std::vector<int64_t>> pp_partition(int64_t n_layers) {
  // A non-zero mask over the n_layers - 1 gaps between layers: bit g cuts after layer g.
  return rc::gen::map(rc::gen::inRange<uint32_t>(1, 1u << (n_layers - 1)), [n_layers](uint32_t mask) {
    std::vector<int64_t> sizes;
    int64_t start = 0;
    for (int64_t g = 0; g < n_layers - 1; ++g) {
      if ((mask >> g) & 1u) {
        sizes.push_back(g + 1 - start);
        start = g + 1;
      }
    }
    sizes.push_back(n_layers - start);
    return sizes;
  });
}

rc::Gen<std::string> schedule(int streams) {
  return rc::gen::oneOf(
      rc::gen::just(std::string("in-order")),
      rc::gen::map(rc::gen::inRange<uint32_t>(0, 1000000), [](uint32_t s) { return "random:" + std::to_string(s); }),
      rc::gen::map(rc::gen::pair(rc::gen::inRange<uint32_t>(0, 1000000), rc::gen::inRange<int>(1, 4)),
                   [](const std::pair<uint32_t, int>& p) {
                     return "pct:" + std::to_string(p.first) + ":" + std::to_string(p.second);
                   }),
      rc::gen::map(rc::gen::pair(rc::gen::inRange<int>(0, streams), rc::gen::inRange<int>(1, 200)),
                   [](const std::pair<int, int>& p) {
                     return "delay:" + std::to_string(p.first) + ":" + std::to_string(p.second);
                   }));
}

namespace {

// Page sizes, rings, buckets and the chunk budget for `requests` requests, valid for the config.
void generate_geometry(const ModelConfig& config, int64_t requests, bool speculative, EngineSpec& s) {
  s.page_size = *rc::gen::element<int64_t>(256, 512);
  s.c4_ring_size = *rc::gen::element<int64_t>(8, 16);
  s.c128_ring_size = *rc::gen::element<int64_t>(0, config.c128_ratio(), 2 * config.c128_ratio());
  std::vector<int64_t> swa_sizes;
  for (int64_t size : {16, 32, 64, 128, 256}) {
    RuntimeOptions o;
    o.page_size = s.page_size;
    o.swa_page_size = size;
    o.c4_ring_size = s.c4_ring_size;
    o.c128_ring_size = s.c128_ring_size;
    o.speculative = speculative;
    try {
      validate_runtime_options(o, config);
      swa_sizes.push_back(size);
    } catch (const InputError&) {
    }
  }
  RC_ASSERT(!swa_sizes.empty());  // 256 divides every page size and holds every ring generated
  s.swa_page_size = *rc::gen::elementOf(swa_sizes);
  s.chunked_prefill_tokens = *rc::gen::weightedElement<int64_t>({{3, 512}, {1, 96}, {1, 40}, {1, 17}});
  // Buckets: the running limit itself plus any smaller sizes, so decode batches may be padded.
  s.max_running_requests = requests + *rc::gen::inRange<int64_t>(0, 3);
  std::vector<int64_t> buckets;
  for (int64_t b = 1; b < s.max_running_requests; ++b) {
    if (*rc::gen::arbitrary<bool>()) buckets.push_back(b);
  }
  buckets.push_back(s.max_running_requests);
  s.batch_buckets = buckets;
}

}  // namespace

namespace {
int g_device_limit = 0;
}  // namespace

int device_limit() { return g_device_limit; }
DeviceLimit::DeviceLimit(int devices) : saved_(g_device_limit) { g_device_limit = devices; }
DeviceLimit::~DeviceLimit() { g_device_limit = saved_; }

rc::Gen<EngineSpec> engine_spec(const EngineMix& mix) {
  return rc::gen::exec([mix] {
    const ModelConfig config = load_model_config(kConfig);
    EngineSpec s;
    s.config = kConfig;
    s.weight_seed = *rc::gen::inRange<uint64_t>(1, 1000);
    s.requests = *request_mix(config, mix.max_requests);
    const int limit = device_limit();
    const bool pp = (limit == 0 || limit >= 2) && *percent(mix.pp_percent);
    if (pp && limit == 0) s.pp_partition = *pp_partition(config.n_layers);
    if (pp && limit > 0) {
      s.pp_partition = *rc::gen::suchThat(pp_partition(config.n_layers), [limit](const std::vector<int64_t>& p) {
        return static_cast<int64_t>(p.size()) <= limit;
      });
    }
    const bool cp = !pp && (limit == 0 || limit >= 2) && *percent(mix.cp_percent);
    if (cp) s.cp = limit == 0 || limit >= 4 ? *rc::gen::element<int64_t>(2, 4) : 2;
    s.mtp = !cp && *percent(mix.mtp_percent);
    s.draft_tokens = s.mtp ? 1 : 0;
    s.quant = *percent(mix.int8_percent) ? "w8a8-int8" : "fp8";
    s.graphs = *percent(mix.graphs_percent);
    s.multi_stream = *percent(mix.multi_stream_percent);
    s.indexer_sms = *rc::gen::inRange<int64_t>(1, 9);
    const int streams = 6 * std::max<int>(1, static_cast<int>(s.pp_partition.size()));
    s.schedule = *percent(mix.shuffled_schedule_percent) ? *schedule(streams) : std::string("in-order");
    generate_geometry(config, static_cast<int64_t>(s.requests.size()), s.mtp, s);
    return s;
  });
}

rc::Gen<std::pair<EngineSpec, std::string>> invalid_engine_spec() {
  return rc::gen::exec([] {
    EngineMix mix;
    mix.max_requests = 2;
    mix.pp_percent = 0;
    mix.cp_percent = 0;
    mix.mtp_percent = 0;  // the speculative rings double, which would make some rings below valid
    EngineSpec s = *engine_spec(mix);
    // Each entry: the field, and a value construction must refuse for it.
    const int which = *rc::gen::inRange<int>(0, 9);
    std::string field;
    switch (which) {
      case 0: field = "page_size"; s.page_size = *rc::gen::element<int64_t>(0, -256); break;
      case 1: field = "swa_page_size"; s.swa_page_size = *rc::gen::element<int64_t>(0, -16); break;
      case 2:  // 1 and non-divisors of the ring
        field = "swa_page_size";
        s.swa_page_size = *rc::gen::element<int64_t>(1, 3, 24, 40);
        break;
      case 3:  // a page size that is not a multiple of the SWA page
        field = "swa_page_size";
        s.page_size = 256;
        s.swa_page_size = *rc::gen::element<int64_t>(96, 160, 512);
        break;
      case 4: field = "c4_ring_size"; s.c4_ring_size = *rc::gen::element<int64_t>(0, 4, 6, 10); break;
      case 5: field = "c128_ring_size"; s.c128_ring_size = *rc::gen::element<int64_t>(-1, 3, 8, 24); break;
      case 6: field = "max_running_requests"; s.max_running_requests = *rc::gen::element<int64_t>(0, -1); break;
      case 7: field = "chunked_prefill_tokens"; s.chunked_prefill_tokens = *rc::gen::element<int64_t>(0, -5); break;
      default:
        field = "batch_buckets";
        s.batch_buckets = *rc::gen::element<std::vector<int64_t>>(std::vector<int64_t>{}, std::vector<int64_t>{2, 1},
                                                                  std::vector<int64_t>{0}, std::vector<int64_t>{1, 1},
                                                                  std::vector<int64_t>{s.max_running_requests + 1});
        break;
    }
    return std::make_pair(s, field);
  });
}

rc::Gen<TranslationSpec> translation_spec() {
  return rc::gen::exec([] {
    TranslationSpec t;
    t.ratio = *rc::gen::element<int64_t>(4, 16);
    t.ring_size = *rc::gen::weightedElement<int64_t>({{4, t.ratio == 4 ? 8 : 16}, {2, 32}, {1, 0}, {1, 1}, {1, 6}});
    t.swa_page_size = *rc::gen::weightedElement<int64_t>({{4, 256}, {2, 64}, {2, 32}, {1, 0}, {1, 1}, {1, 24}});
    t.swa_page_count = *rc::gen::inRange<int64_t>(2, 6);  // the null page and at least one more
    const int64_t pool = std::max<int64_t>(1, t.swa_page_count * std::max<int64_t>(t.swa_page_size, 1));
    // Locations around every page boundary, the ends of the pool, past it, and negative ones.
    std::vector<int64_t> corners = {-1, -2, 0, 1, pool - 1, pool, pool + 1, std::numeric_limits<int64_t>::max(),
                                    std::numeric_limits<int64_t>::min()};
    for (int64_t p = 1; p <= t.swa_page_count; ++p) {
      for (int64_t d : {-1, 0, 1}) corners.push_back(p * t.swa_page_size + d);
    }
    t.swa_locs = *rc::gen::container<std::vector<int64_t>>(
        rc::gen::weightedOneOf<int64_t>({{3, rc::gen::elementOf(corners)}, {1, rc::gen::arbitrary<int64_t>()}}));
    return t;
  });
}

}  // namespace dsv4::props::gen
