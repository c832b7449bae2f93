#include "properties/schedule_case.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <tuple>
#include <utility>

#include "engine/core/error.h"
#include "engine/runtime/sim_runtime.h"
#include "kernels/indexer_logits.h"

namespace dsv4::props {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string entry_str(const ScheduleEntry& e) {
  return "(" + std::to_string(e.row) + ", " + std::to_string(e.offset_blocks) + ")";
}

std::string entries_str(const std::vector<ScheduleEntry>& entries) {
  std::string out;
  for (const ScheduleEntry& e : entries) out += (out.empty() ? "" : " ") + entry_str(e);
  return out;
}

// Bounds that keep one case in the millisecond range and its logits in a few MiB; a corpus file
// with larger values is refused rather than allowed to exhaust memory.
constexpr int64_t kMaxRows = 256;
constexpr int32_t kMaxLen = 16384;
constexpr int64_t kMaxBlockKv = 1024;
constexpr int64_t kMaxSms = 1024;

// Small enough to keep a case cheap, large enough that a wrong key or page changes the logit.
constexpr int64_t kHeads = 2;
constexpr int64_t kHeadDim = 8;

InputError spec_error(const std::string& field, const std::string& message) {
  return InputError("scenario", "schedule_case." + field, message);
}

void require_layout(const std::string& layout, const std::string& field) {
  const std::vector<std::string>& known = schedule_layouts();
  if (std::find(known.begin(), known.end(), layout) != known.end()) return;
  throw spec_error(field, "unknown layout '" + layout + "' (one of per-token, native)");
}

void validate_lens(const std::vector<int32_t>& lens, int64_t count, const std::string& field) {
  if (static_cast<int64_t>(lens.size()) != count) {
    throw spec_error(field, "holds " + std::to_string(lens.size()) + " lengths, rows * next_n = " +
                                std::to_string(count));
  }
  for (size_t i = 0; i < lens.size(); ++i) {
    if (lens[i] < 0 || lens[i] > kMaxLen) {
      throw spec_error(field, "element " + std::to_string(i) + " is " + std::to_string(lens[i]) + ", must be in [0, " +
                                  std::to_string(kMaxLen) + "]");
    }
  }
}

// The work in `layout`: per token every row is one token.
ScheduleWork work_in(const std::vector<int32_t>& lens, const ScheduleSpec& spec, const std::string& layout) {
  if (layout == "native") return schedule_work(lens, spec.rows, spec.next_n, spec.block_kv);
  return schedule_work(lens, spec.rows * spec.next_n, 1, spec.block_kv);
}

// FNV-1a over the spec's work, not its layout or SM count: the same lengths get the same q and
// keys in either layout, and a case file reproduces its inputs without storing them.
uint64_t input_seed(const ScheduleSpec& spec) {
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](int64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint64_t>(v >> (8 * i)) & 0xffu;
      h *= 1099511628211ull;
    }
  };
  mix(spec.rows);
  mix(spec.next_n);
  mix(spec.block_kv);
  for (int32_t len : spec.context_lens) mix(len);
  return h;
}

// The kernel's inputs in the native layout; the per-token launch views or expands them.
struct Inputs {
  Tensor q;            // [rows, next_n, heads, dim]
  Tensor kv_pages;     // [pages, 64, dim]
  Tensor block_table;  // [rows, max_pages], a shuffled page per slot
  Tensor weights;      // [rows * next_n, heads]
  int64_t max_context = 1;
};

Inputs make_inputs(const ScheduleSpec& spec) {
  std::mt19937_64 rng(input_seed(spec));
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  const auto random_values = [&](int64_t n) {
    std::vector<double> v(static_cast<size_t>(n));
    for (double& x : v) x = static_cast<float>(uniform(rng));  // f32-representable, so from_values is exact
    return v;
  };
  Inputs in;
  const int64_t tokens = spec.rows * spec.next_n;
  for (int32_t len : spec.context_lens) in.max_context = std::max<int64_t>(in.max_context, len);
  const int64_t max_pages = ceil_div(in.max_context, kernels::kIndexerPageKeys);
  // One spare page so a misread table entry still names a page with other keys.
  const int64_t pages = spec.rows * max_pages + 1;
  std::vector<double> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0.0);
  std::shuffle(order.begin(), order.end(), rng);
  order.resize(static_cast<size_t>(spec.rows * max_pages));
  in.q = Tensor::from_values({spec.rows, spec.next_n, kHeads, kHeadDim}, DType::f32,
                             random_values(tokens * kHeads * kHeadDim), "q");
  in.kv_pages = Tensor::from_values({pages, kernels::kIndexerPageKeys, kHeadDim}, DType::f32,
                                    random_values(pages * kernels::kIndexerPageKeys * kHeadDim), "kv_pages");
  in.block_table = Tensor::from_values({spec.rows, max_pages}, DType::i32, order, "block_table");
  in.weights = Tensor::from_values({tokens, kHeads}, DType::f32, random_values(tokens * kHeads), "weights");
  return in;
}

// The logits straight from their definition, Σ_h w[h] · ReLU(q_h · k_t) for t < len and -inf
// beyond, with no schedule in between: the kernel's result must not depend on how work was split.
std::vector<float> direct_logits(const ScheduleSpec& spec, const Inputs& in) {
  const int64_t tokens = spec.rows * spec.next_n;
  std::vector<float> out(static_cast<size_t>(tokens * in.max_context), -std::numeric_limits<float>::infinity());
  const float* q = in.q.data<float>();
  const float* keys = in.kv_pages.data<float>();
  const int32_t* table = in.block_table.data<int32_t>();
  const float* w = in.weights.data<float>();
  const int64_t max_pages = in.block_table.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t b = t / spec.next_n;
    for (int64_t key = 0; key < spec.context_lens[static_cast<size_t>(t)]; ++key) {
      const int64_t page = table[b * max_pages + key / kernels::kIndexerPageKeys];
      const float* k = keys + (page * kernels::kIndexerPageKeys + key % kernels::kIndexerPageKeys) * kHeadDim;
      double score = 0.0;
      for (int64_t h = 0; h < kHeads; ++h) {
        const float* qh = q + (t * kHeads + h) * kHeadDim;
        double dot = 0.0;
        for (int64_t d = 0; d < kHeadDim; ++d) dot += static_cast<double>(qh[d] * k[d]);
        score += static_cast<double>(w[t * kHeads + h] * std::max(static_cast<float>(dot), 0.0f));
      }
      out[static_cast<size_t>(t * in.max_context + key)] = static_cast<float>(score);
    }
  }
  return out;
}

// The first few logits that differ. Within a relative 1e-5, not bitwise: the suite judges the
// schedule, not the summation order; a missed key block leaves NaN, a wrong key an unrelated value.
std::optional<std::string> logits_error(const std::vector<float>& want, const Tensor& logits, int64_t max_context) {
  const float* got = logits.data<float>();
  size_t bad = 0;
  std::string shown;
  for (size_t i = 0; i < want.size(); ++i) {
    const float g = got[i];
    const float x = want[i];
    const bool ok = std::isinf(x) ? g == x : !std::isnan(g) && std::fabs(g - x) <= 1e-5f * std::max(1.0f, std::fabs(x));
    if (ok) continue;
    if (++bad > 3) continue;
    char line[128];
    std::snprintf(line, sizeof line, "; token %lld key %lld: got %.9g, want %.9g",
                  static_cast<long long>(static_cast<int64_t>(i) / max_context),
                  static_cast<long long>(static_cast<int64_t>(i) % max_context), static_cast<double>(g),
                  static_cast<double>(x));
    shown += line;
  }
  if (bad == 0) return std::nullopt;
  return std::to_string(bad) + " of " + std::to_string(want.size()) + " logits differ from the direct computation" +
         shown;
}

}  // namespace

// ---- the scalar model --------------------------------------------------------------------------

ScheduleWork schedule_work(const std::vector<int32_t>& lens, int64_t rows, int64_t next_n, int64_t block_kv) {
  ScheduleWork w;
  w.rows = rows;
  w.next_n = next_n;
  w.before_row_blocks.push_back(0);
  for (int64_t b = 0; b < rows; ++b) {
    int64_t sum = 0;
    for (int64_t j = 0; j < next_n; ++j) {
      const int64_t blocks = ceil_div(lens[static_cast<size_t>(b * next_n + j)], block_kv);
      w.token_blocks.push_back(blocks);
      sum += blocks;
    }
    w.row_blocks.push_back(sum);
    w.before_row_blocks.push_back(w.before_row_blocks.back() + sum);
  }
  return w;
}

std::vector<ScheduleEntry> schedule_entries(const Tensor& schedule) {
  std::vector<ScheduleEntry> e;
  for (int64_t s = 0; s < schedule.size(0); ++s) {
    e.push_back(ScheduleEntry{static_cast<int64_t>(schedule.get({s, 0})), static_cast<int64_t>(schedule.get({s, 1}))});
  }
  return e;
}

ScheduleWalks model_schedule_walks(const ScheduleWork& w, const std::vector<ScheduleEntry>& e) {
  ScheduleWalks out;
  out.visits.assign(static_cast<size_t>(w.total_blocks()), 0);
  const int64_t sms = static_cast<int64_t>(e.size()) - 1;
  // The kernel's own bound: each step does a block or moves a row, so W + rows + 1 steps reach any end.
  const int64_t step_limit = w.total_blocks() + w.rows + 1;
  for (int64_t s = 0; s < sms; ++s) {
    ScheduleEntry cur = e[static_cast<size_t>(s)];
    const ScheduleEntry end = e[static_cast<size_t>(s + 1)];
    bool reached = false;
    int64_t step = 0;
    for (; step <= step_limit; ++step) {
      if (cur == end) {
        reached = true;
        break;
      }
      if (cur.row >= w.rows || cur.row < 0) break;
      if (cur.offset_blocks >= w.row_blocks[static_cast<size_t>(cur.row)] || cur.offset_blocks < 0) {
        cur = ScheduleEntry{cur.row + 1, 0};
        continue;
      }
      ++out.visits[static_cast<size_t>(w.before_row_blocks[static_cast<size_t>(cur.row)] + cur.offset_blocks)];
      ++cur.offset_blocks;
    }
    if (step > step_limit) out.within_bound = false;
    out.reached_end.push_back(reached);
  }
  return out;
}

bool schedule_counters_complete(const ScheduleWork& w, const ScheduleWalks& walks) {
  int64_t done_total = 0;
  for (int64_t v : walks.visits) done_total += v;
  for (int64_t b = 0; b < w.rows; ++b) {
    int64_t first = w.before_row_blocks[static_cast<size_t>(b)];
    for (int64_t j = 0; j < w.next_n; ++j) {
      const int64_t blocks = w.token_blocks[static_cast<size_t>(b * w.next_n + j)];
      int64_t done = 0;
      for (int64_t o = 0; o < blocks; ++o) done += walks.visits[static_cast<size_t>(first + o)];
      // Nobody ran the last block, so nobody waits to finish the row; or its finisher waits forever.
      if (blocks > 0 && walks.visits[static_cast<size_t>(first + blocks - 1)] == 0) return false;
      if (done < blocks) return false;
      first += blocks;
    }
  }
  return done_total == w.total_blocks();
}

bool every_block_once(const ScheduleWalks& walks) {
  return std::all_of(walks.visits.begin(), walks.visits.end(), [](int64_t v) { return v == 1; });
}

std::optional<std::string> schedule_partition_error(const ScheduleWork& w, const std::vector<ScheduleEntry>& e,
                                                    int64_t num_sms) {
  const auto fail = [&e](const std::string& what) -> std::optional<std::string> {
    return what + " (schedule " + entries_str(e) + ")";
  };
  if (static_cast<int64_t>(e.size()) != num_sms + 1) {
    return fail(std::to_string(e.size()) + " entries for " + std::to_string(num_sms) + " SMs, want num_sms + 1");
  }
  const int64_t total = w.total_blocks();
  std::vector<int64_t> at;  // each entry's position in the row-major work
  for (size_t s = 0; s < e.size(); ++s) {
    const ScheduleEntry& x = e[s];
    const std::string name = "entry " + std::to_string(s) + " " + entry_str(x);
    if (x.row < 0 || x.row > w.rows) return fail(name + " names a row outside [0, " + std::to_string(w.rows) + "]");
    if (x.row == w.rows) {
      if (x.offset_blocks != 0) return fail(name + " lies past the end (" + std::to_string(w.rows) + ", 0)");
    } else if (x.offset_blocks < 0 || x.offset_blocks >= w.row_blocks[static_cast<size_t>(x.row)]) {
      // The builder skips empty rows forward, so a start always names a block of work.
      return fail(name + " names no work: row " + std::to_string(x.row) + " has " +
                  std::to_string(w.row_blocks[static_cast<size_t>(x.row)]) + " blocks");
    }
    at.push_back(w.before_row_blocks[static_cast<size_t>(x.row)] + x.offset_blocks);
  }
  if (at.front() != 0) return fail("the first range starts at block " + std::to_string(at.front()) + ", not 0");
  if (at.back() != total) return fail("the last range ends at block " + std::to_string(at.back()) + ", not W = " + std::to_string(total));
  for (int64_t s = 0; s < num_sms; ++s) {
    const int64_t size = at[static_cast<size_t>(s + 1)] - at[static_cast<size_t>(s)];
    // Near-equal contiguous pieces: the first W % num_sms ranges are one block longer.
    const int64_t want = total / num_sms + (s < total % num_sms ? 1 : 0);
    if (size != want) {
      return fail("SM " + std::to_string(s) + " has " + std::to_string(size) + " blocks, want " + std::to_string(want) +
                  " of W = " + std::to_string(total));
    }
  }
  // Implied by the above; kept so a change to the model or the kernel's loop shows up here too.
  const ScheduleWalks walks = model_schedule_walks(w, e);
  if (!walks.within_bound) return fail("a modelled walk outran its step bound");
  for (size_t s = 0; s < walks.reached_end.size(); ++s) {
    if (!walks.reached_end[s]) return fail("the modelled walk of SM " + std::to_string(s) + " misses its end");
  }
  if (!every_block_once(walks)) return fail("the modelled walks do some key block other than once");
  if (!schedule_counters_complete(w, walks)) return fail("the modelled counters fall short");
  return std::nullopt;
}

// ---- the suite -----------------------------------------------------------------------------------

const std::vector<std::string>& schedule_layouts() {
  static const std::vector<std::string> layouts = {"per-token", "native"};
  return layouts;
}

void validate_schedule_spec(const ScheduleSpec& spec) {
  if (spec.next_n < 1 || spec.next_n > 4) {
    throw spec_error("next_n", "must be in 1..4, got " + std::to_string(spec.next_n));
  }
  if (spec.rows < 0 || spec.rows > kMaxRows) {
    throw spec_error("rows", "must be in [0, " + std::to_string(kMaxRows) + "], got " + std::to_string(spec.rows));
  }
  validate_lens(spec.context_lens, spec.rows * spec.next_n, "context_lens");
  require_layout(spec.layout, "layout");
  if (spec.block_kv < 1 || spec.block_kv > kMaxBlockKv) {
    throw spec_error("block_kv", "must be in [1, " + std::to_string(kMaxBlockKv) + "], got " +
                                     std::to_string(spec.block_kv));
  }
  if (spec.num_sms < 1 || spec.num_sms > kMaxSms) {
    throw spec_error("num_sms", "must be in [1, " + std::to_string(kMaxSms) + "], got " + std::to_string(spec.num_sms));
  }
}

Tensor schedule_context_lens(const ScheduleSpec& spec, const std::string& layout,
                             const std::optional<std::vector<int32_t>>& lens) {
  require_layout(layout, "layout");
  const std::vector<int32_t>& values = lens ? *lens : spec.context_lens;
  validate_lens(values, spec.rows * spec.next_n, lens ? "schedule_lens" : "context_lens");
  const Tensor native = Tensor::from_values({spec.rows, spec.next_n}, DType::i32,
                                            std::vector<double>(values.begin(), values.end()), "context_lens");
  return layout == "native" ? native : kernels::to_2d_context_lens(native);
}

Verdict check_schedule_case(const ScheduleSpec& spec) { return check_schedule_case(spec, ScheduleCaseRun{}); }

Verdict check_schedule_case(const ScheduleSpec& spec, const ScheduleCaseRun& run) {
  validate_schedule_spec(spec);
  const std::string kernel_layout = run.kernel_layout.value_or(spec.layout);
  require_layout(kernel_layout, "kernel_layout");
  if (run.schedule_lens) validate_lens(*run.schedule_lens, spec.rows * spec.next_n, "schedule_lens");
  const bool per_token = kernel_layout == "per-token";
  const std::string where = describe(spec) + (kernel_layout != spec.layout ? ", kernel runs " + kernel_layout : "") +
                            (run.schedule_lens ? ", schedule from other lengths" : "");

  try {
    const Tensor schedule =
        kernels::build_indexer_schedule(schedule_context_lens(spec, spec.layout, run.schedule_lens), spec.block_kv,
                                        spec.num_sms);
    // The producer's side: the entries must be the partition of the work the kernel is launched with.
    const std::optional<std::string> partition =
        schedule_partition_error(work_in(spec.context_lens, spec, kernel_layout), schedule_entries(schedule),
                                 spec.num_sms);

    // The consumer's side: the real kernel on the sim backend, its blocks interleaved by a seeded
    // strategy, on NaN-filled logits so that an entry no block writes shows.
    const Inputs in = make_inputs(spec);
    kernels::IndexerLogitsArgs args;
    args.q = per_token ? in.q.view({spec.rows * spec.next_n, 1, kHeads, kHeadDim}) : in.q;
    args.kv_pages = in.kv_pages;
    args.block_table = per_token ? kernels::expand_block_table_per_token(in.block_table, spec.next_n) : in.block_table;
    args.weights = in.weights;
    args.context_lens = schedule_context_lens(spec, kernel_layout);
    args.schedule = schedule;
    args.logits = Tensor::empty({spec.rows * spec.next_n, in.max_context}, DType::f32, "logits");
    args.logits.fill(std::numeric_limits<double>::quiet_NaN());
    args.block_kv = spec.block_kv;
    args.num_sms = spec.num_sms;

    rt::SimOptions sim;
    sim.schedule.kind = rt::Schedule::Kind::random;
    sim.schedule.seed = input_seed(spec) ^ static_cast<uint64_t>(spec.num_sms);
    rt::SimRuntime runtime(rt::RuntimeOptions{}, sim);
    const rt::StreamId stream = runtime.create_stream(0, "indexer");
    rt::Launch launch;
    launch.op = kernels::kIndexerLogitsOp;
    launch.blocks = static_cast<int>(spec.num_sms);
    launch.cooperative = kernels::make_indexer_logits_launch(args);
    launch.check_contract = [args] { kernels::check_indexer_logits_contract(args); };
    try {
      runtime.launch(stream, std::move(launch));
      runtime.synchronize(stream);
    } catch (const rt::HangError& e) {
      return Verdict::fail(VerdictKind::hang, kernels::kIndexerLogitsOp,
                           where + ": " + e.what() + (partition ? "; the schedule: " + *partition : ""));
    }
    if (const auto wrong = logits_error(direct_logits(spec, in), args.logits, in.max_context)) {
      return Verdict::fail(VerdictKind::mismatch, kernels::kIndexerLogitsOp,
                           where + ": " + *wrong + (partition ? "; the schedule: " + *partition : ""));
    }
    if (partition) {
      // Right logits from a wrong schedule: one SM did another's range too. Harmless here, a hang
      // or a lost row as soon as the lengths move (bug-classes A3).
      return Verdict::fail(VerdictKind::mismatch, kernels::kIndexerScheduleOp, where + ": " + *partition);
    }
  } catch (const ContractError& e) {
    return Verdict::fail(VerdictKind::contract_error, e.op() + ":" + e.argument(), where + ": " + e.what());
  }
  return Verdict::pass();
}

namespace {

// A length near a multiple of block_kv: k blocks exactly, or one key short or over. The offset
// shrinks to 0 and k to 0, so a failing length shrinks onto a block edge and then to 0.
rc::Gen<int32_t> gen_near_multiple(int64_t block_kv) {
  return rc::gen::map(rc::gen::pair(rc::gen::inRange<int64_t>(0, 5), rc::gen::elementOf(std::vector<int64_t>{0, -1, 1})),
                      [block_kv](const std::pair<int64_t, int64_t>& p) {
                        return static_cast<int32_t>(std::max<int64_t>(0, p.first * block_kv + p.second));
                      });
}

// The lengths of one spec, in one of four shapes: mixed (zeros, near multiples, anything up to 6
// blocks), all near multiples (MTP drafts crossing a block edge), all equal, all zero.
rc::Gen<std::vector<int32_t>> gen_lens(int64_t count, int64_t block_kv, int shape) {
  const auto n = static_cast<size_t>(count);
  switch (shape) {
    case 0:
      return rc::gen::container<std::vector<int32_t>>(
          n, rc::gen::oneOf(rc::gen::just<int32_t>(0), gen_near_multiple(block_kv),
                            rc::gen::inRange<int32_t>(0, static_cast<int32_t>(6 * block_kv))));
    case 1:
      return rc::gen::container<std::vector<int32_t>>(n, gen_near_multiple(block_kv));
    case 2:
      return rc::gen::map(gen_near_multiple(block_kv), [n](int32_t v) { return std::vector<int32_t>(n, v); });
    default:
      return rc::gen::just(std::vector<int32_t>(n, 0));
  }
}

// 1..132 SMs: small counts (the ranges are long and cross rows), real GPUs' counts (H20 78, A100
// 108, H100 PCIe 114, H100/H200 SXM 132), and anything in between (often more SMs than blocks).
rc::Gen<int64_t> gen_num_sms() {
  return rc::gen::weightedOneOf<int64_t>({
      {2, rc::gen::inRange<int64_t>(1, 9)},
      {1, rc::gen::elementOf(std::vector<int64_t>{1, 2, 3, 4, 8, 78, 108, 114, 132})},
      {2, rc::gen::inRange<int64_t>(1, 133)},
  });
}

}  // namespace

rc::Gen<ScheduleSpec> gen_schedule_spec() { return gen_schedule_spec(1); }

rc::Gen<ScheduleSpec> gen_schedule_spec(int64_t min_next_n) {
  // The geometry first, then lengths that fit it: mapcat keeps them consistent while either shrinks.
  const auto head = rc::gen::tuple(rc::gen::inRange<int64_t>(0, 11), rc::gen::inRange<int64_t>(min_next_n, 5),
                                   rc::gen::elementOf(std::vector<int64_t>{64, 1, 2, 3, 16}), rc::gen::inRange(0, 4),
                                   rc::gen::elementOf(schedule_layouts()), gen_num_sms());
  return rc::gen::mapcat(head, [](const std::tuple<int64_t, int64_t, int64_t, int, std::string, int64_t>& h) {
    ScheduleSpec geometry;
    geometry.rows = std::get<0>(h);
    geometry.next_n = std::get<1>(h);
    geometry.block_kv = std::get<2>(h);
    geometry.layout = std::get<4>(h);
    geometry.num_sms = std::get<5>(h);
    return rc::gen::map(gen_lens(geometry.rows * geometry.next_n, geometry.block_kv, std::get<3>(h)),
                        [geometry](std::vector<int32_t> lens) {
                          ScheduleSpec s = geometry;
                          s.context_lens = std::move(lens);
                          return s;
                        });
  });
}

std::string describe(const ScheduleSpec& spec) {
  std::ostringstream os;
  os << spec.layout << " rows " << spec.rows << " next_n " << spec.next_n << " block_kv " << spec.block_kv << " sms "
     << spec.num_sms << " lens [";
  for (size_t i = 0; i < spec.context_lens.size(); ++i) os << (i ? " " : "") << spec.context_lens[i];
  os << "]";
  return os.str();
}

void showValue(const ScheduleSpec& spec, std::ostream& os) { os << describe(spec); }

}  // namespace dsv4::props
