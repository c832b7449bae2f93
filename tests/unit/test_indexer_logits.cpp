// The indexer logits path (kernels/indexer_logits.h): the schedule on hand-worked examples and its
// contract; the cooperative kernel on the sim backend against a plain recomputation and the
// reference formula, under every block-scheduling strategy; the seed bug A3 (a (B, next_n) schedule
// launched per token, a stale schedule under graph replay) as a HangError naming the kernel; top-k.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "engine/core/error.h"
#include "engine/runtime/sim_runtime.h"
#include "kernels/indexer_logits.h"
#include "reference/tensor.h"

namespace dsv4::kernels {
namespace {

using Entries = std::vector<std::pair<int64_t, int64_t>>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Tensor i32_tensor(const Shape& shape, const std::vector<int64_t>& values, const std::string& name) {
  return Tensor::from_values(shape, DType::i32, std::vector<double>(values.begin(), values.end()), name);
}

Entries entries(const Tensor& schedule) {
  Entries e;
  for (int64_t s = 0; s < schedule.size(0); ++s) {
    e.emplace_back(static_cast<int64_t>(schedule.get({s, 0})), static_cast<int64_t>(schedule.get({s, 1})));
  }
  return e;
}

// ---- schedule: hand-worked examples ---------------------------------------------------------------

TEST(IndexerSchedule, PerTokenLayoutSplitsSevenBlocksOverThreeSms) {
  // block_kv 4: lens 5, 8, 0, 9 -> 2, 2, 0, 3 blocks, W = 7 -> ranges of 3, 2, 2 blocks.
  const Tensor lens = i32_tensor({4, 1}, {5, 8, 0, 9}, "lens");
  const Tensor s = build_indexer_schedule(lens, 4, 3);
  EXPECT_EQ(s.dtype(), DType::i32);
  EXPECT_EQ(s.shape(), (Shape{4, 2}));
  EXPECT_TRUE(s.is_contiguous());
  // Block 3 is (1, 1); block 5 skips the empty row 2 and is (3, 1); the end is (rows, 0).
  EXPECT_EQ(entries(s), (Entries{{0, 0}, {1, 1}, {3, 1}, {4, 0}}));
}

TEST(IndexerSchedule, TheSameLensInTheBTimesNextNLayoutGiveOtherEntries) {
  // The same four tokens as two rows of next_n = 2: row work 4 and 3 blocks, entries in row
  // coordinates. This difference is what a per-token launch misreads (seed bug A3).
  const Tensor lens = i32_tensor({2, 2}, {5, 8, 0, 9}, "lens");
  EXPECT_EQ(entries(build_indexer_schedule(lens, 4, 3)), (Entries{{0, 0}, {0, 3}, {1, 1}, {2, 0}}));
  EXPECT_EQ(entries(build_indexer_schedule(to_2d_context_lens(lens), 4, 3)),
            (Entries{{0, 0}, {1, 1}, {3, 1}, {4, 0}}));
}

TEST(IndexerSchedule, BlockMultiplesPlusMinusOne) {
  // block_kv 64: 63, 64, 65 -> 1, 1, 2 blocks, W = 4, two ranges of 2.
  const Tensor lens = i32_tensor({3, 1}, {63, 64, 65}, "lens");
  EXPECT_EQ(entries(build_indexer_schedule(lens, 64, 2)), (Entries{{0, 0}, {2, 0}, {3, 0}}));
  EXPECT_EQ(entries(build_indexer_schedule(lens, 64, 1)), (Entries{{0, 0}, {3, 0}}));
}

TEST(IndexerSchedule, LeadingEmptyRowsHoldNoStart) {
  const Tensor lens = i32_tensor({3, 1}, {0, 0, 130}, "lens");  // 0, 0, 3 blocks
  EXPECT_EQ(entries(build_indexer_schedule(lens, 64, 2)), (Entries{{2, 0}, {2, 2}, {3, 0}}));
}

TEST(IndexerSchedule, MoreSmsThanBlocksLeavesEmptyRanges) {
  const Tensor lens = i32_tensor({1, 1}, {1}, "lens");
  EXPECT_EQ(entries(build_indexer_schedule(lens, 64, 3)), (Entries{{0, 0}, {1, 0}, {1, 0}, {1, 0}}));
}

TEST(IndexerSchedule, AllZeroLensPutEveryEntryAtTheEnd) {
  const Tensor lens = i32_tensor({3, 1}, {0, 0, 0}, "lens");
  EXPECT_EQ(entries(build_indexer_schedule(lens, 64, 2)), (Entries{{3, 0}, {3, 0}, {3, 0}}));
}

TEST(IndexerSchedule, ContractRefusesBadArguments) {
  const Tensor good = i32_tensor({2, 2}, {1, 2, 3, 4}, "lens");
  const auto refused = [](const std::function<void()>& f, const std::string& argument) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected a ContractError on " << argument;
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kIndexerScheduleOp);
      EXPECT_EQ(e.argument(), argument) << e.what();
    }
  };
  refused([&] { build_indexer_schedule(i32_tensor({4}, {1, 2, 3, 4}, "lens"), 64, 2); }, "context_lens");
  refused([&] { build_indexer_schedule(i32_tensor({2, 2}, {1, -2, 3, 4}, "lens"), 64, 2); }, "context_lens");
  refused([&] { build_indexer_schedule(good.transpose(0, 1), 64, 2); }, "context_lens");
  refused([&] { build_indexer_schedule(Tensor::from_values({2, 2}, DType::i64, {1, 2, 3, 4}, "l"), 64, 2); },
          "context_lens");
  refused([&] { build_indexer_schedule(good, 0, 2); }, "block_kv");
  refused([&] { build_indexer_schedule(good, 64, 0); }, "num_sms");
}

TEST(IndexerSchedule, To2dContextLensNormalisesEveryLayout) {
  const Tensor lens = i32_tensor({2, 3}, {1, 2, 3, 4, 5, 6}, "lens");
  const Tensor flat = to_2d_context_lens(lens);
  EXPECT_EQ(flat.shape(), (Shape{6, 1}));
  EXPECT_TRUE(flat.is_contiguous());
  EXPECT_EQ(flat.values(), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  // A contiguous input stays a view: a captured graph still sees in-place length updates.
  Tensor writable = lens;
  writable.set({1, 2}, 60);
  EXPECT_EQ(flat.get({5, 0}), 60);
  EXPECT_EQ(to_2d_context_lens(i32_tensor({4}, {7, 8, 9, 10}, "l")).shape(), (Shape{4, 1}));
  const Tensor strided = to_2d_context_lens(lens.transpose(0, 1));  // (3, 2), not contiguous
  EXPECT_TRUE(strided.is_contiguous());
  EXPECT_EQ(strided.values(), (std::vector<double>{1, 4, 2, 5, 3, 60}));
  EXPECT_THROW(to_2d_context_lens(Tensor::from_values({2}, DType::f32, {1, 2}, "l")), ContractError);
  EXPECT_THROW(to_2d_context_lens(i32_tensor({1, 1, 1}, {1}, "l")), ContractError);
}

TEST(IndexerSchedule, BlockTableRowsRepeatPerToken) {
  const Tensor table = i32_tensor({2, 2}, {4, 5, 6, 7}, "table");
  const Tensor per_token = expand_block_table_per_token(table, 3);
  EXPECT_EQ(per_token.shape(), (Shape{6, 2}));
  EXPECT_EQ(per_token.values(), (std::vector<double>{4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7}));
  EXPECT_THROW(expand_block_table_per_token(table, 0), ContractError);
}

TEST(IndexerSchedule, MismatchNamesTheFirstDifferingEntry) {
  const Tensor lens = i32_tensor({2, 1}, {192, 64}, "lens");
  const Tensor s = build_indexer_schedule(lens, 64, 2);
  EXPECT_EQ(indexer_schedule_mismatch(s, lens, 64, 2), std::nullopt);
  const Tensor old_lens = i32_tensor({2, 1}, {64, 64}, "lens");
  const std::optional<std::string> m = indexer_schedule_mismatch(build_indexer_schedule(old_lens, 64, 2), lens, 64, 2);
  ASSERT_TRUE(m.has_value());
  EXPECT_NE(m->find("entry 1 is (1, 0), the fresh schedule has (0, 2)"), std::string::npos) << *m;
  EXPECT_TRUE(indexer_schedule_mismatch(build_indexer_schedule(lens, 64, 3), lens, 64, 2).has_value());
}

// ---- the kernel on the sim backend ------------------------------------------------------------------

struct Problem {
  int64_t rows = 0;
  int64_t next_n = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t max_context = 0;
  Tensor q, kv_pages, block_table, weights, context_lens, logits;
};

// Random inputs: each request row gets its own shuffled pages; logits start as NaN so an entry the
// kernel never writes shows.
Problem make_problem(uint64_t seed, int64_t rows, int64_t next_n, const std::vector<int64_t>& lens,
                     int64_t max_context, int64_t heads = 4, int64_t head_dim = 16) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Problem p;
  p.rows = rows;
  p.next_n = next_n;
  p.heads = heads;
  p.head_dim = head_dim;
  p.max_context = max_context;
  const int64_t max_pages = (max_context + kIndexerPageKeys - 1) / kIndexerPageKeys;
  const int64_t pages = rows * max_pages + 1;
  std::vector<int64_t> order(static_cast<size_t>(pages));
  for (int64_t i = 0; i < pages; ++i) order[static_cast<size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), rng);
  const auto random_values = [&](int64_t n) {
    std::vector<double> v(static_cast<size_t>(n));
    for (double& x : v) x = uniform(rng);
    return v;
  };
  p.q = Tensor::from_values({rows, next_n, heads, head_dim}, DType::f32, random_values(rows * next_n * heads * head_dim), "q");
  p.kv_pages = Tensor::from_values({pages, kIndexerPageKeys, head_dim}, DType::f32,
                                   random_values(pages * kIndexerPageKeys * head_dim), "kv_pages");
  p.block_table = i32_tensor({rows, max_pages}, std::vector<int64_t>(order.begin(), order.begin() + rows * max_pages),
                             "block_table");
  p.weights = Tensor::from_values({rows * next_n, heads}, DType::f32, random_values(rows * next_n * heads), "weights");
  p.context_lens = i32_tensor({rows, next_n}, lens, "context_lens");
  p.logits = Tensor::empty({rows * next_n, max_context}, DType::f32, "logits");
  p.logits.fill(std::numeric_limits<double>::quiet_NaN());
  return p;
}

// The arguments for the native (rows, next_n) launch or the per-token (rows * next_n, 1) one.
IndexerLogitsArgs args_for(const Problem& p, bool per_token, const Tensor& schedule, int64_t num_sms, int64_t block_kv) {
  IndexerLogitsArgs a;
  a.q = per_token ? p.q.view({p.rows * p.next_n, 1, p.heads, p.head_dim}) : p.q;
  a.kv_pages = p.kv_pages;
  a.block_table = per_token ? expand_block_table_per_token(p.block_table, p.next_n) : p.block_table;
  a.weights = p.weights;
  a.context_lens = per_token ? to_2d_context_lens(p.context_lens) : p.context_lens;
  a.schedule = schedule;
  a.logits = p.logits;
  a.block_kv = block_kv;
  a.num_sms = num_sms;
  return a;
}

// The plain recomputation, in the kernel's arithmetic: f32 products summed in f64 per head, the
// ReLU'd logit times w in f32, the head sum in f64, one rounding to f32.
std::vector<float> recompute(const Problem& p) {
  std::vector<float> out(static_cast<size_t>(p.rows * p.next_n * p.max_context), kNegInf);
  for (int64_t b = 0; b < p.rows; ++b) {
    for (int64_t j = 0; j < p.next_n; ++j) {
      const int64_t token = b * p.next_n + j;
      const auto len = static_cast<int64_t>(p.context_lens.get({b, j}));
      for (int64_t t = 0; t < len; ++t) {
        const auto page = static_cast<int64_t>(p.block_table.get({b, t / kIndexerPageKeys}));
        double sum = 0.0;
        for (int64_t h = 0; h < p.heads; ++h) {
          double dot = 0.0;
          for (int64_t d = 0; d < p.head_dim; ++d) {
            const auto qv = static_cast<float>(p.q.get({b, j, h, d}));
            const auto kv = static_cast<float>(p.kv_pages.get({page, t % kIndexerPageKeys, d}));
            dot += static_cast<double>(qv * kv);
          }
          const auto w = static_cast<float>(p.weights.get({token, h}));
          sum += static_cast<double>(w * std::max(static_cast<float>(dot), 0.0f));
        }
        out[static_cast<size_t>(token * p.max_context + t)] = static_cast<float>(sum);
      }
    }
  }
  return out;
}

// reference/indexer's formula (exact mode: act() is the identity) on the gathered keys.
float reference_score(const Problem& p, int64_t b, int64_t j, int64_t t) {
  const int64_t token = b * p.next_n + j;
  const auto page = static_cast<int64_t>(p.block_table.get({b, t / kIndexerPageKeys}));
  const float* k = p.kv_pages.data<float>() + (page * kIndexerPageKeys + t % kIndexerPageKeys) * p.head_dim;
  double sum = 0.0;
  for (int64_t h = 0; h < p.heads; ++h) {
    const float* qh = p.q.data<float>() + (token * p.heads + h) * p.head_dim;
    const auto logit = static_cast<float>(ref::dot(qh, k, p.head_dim));
    sum += static_cast<double>(p.weights.data<float>()[token * p.heads + h] * std::max(logit, 0.0f));
  }
  return static_cast<float>(sum);
}

std::vector<float> logits_of(const Problem& p) {
  const float* v = p.logits.data<float>();
  return std::vector<float>(v, v + p.logits.numel());
}

rt::Schedule strategy(int which, uint64_t seed) {
  rt::Schedule s;
  if (which == 1) {
    s.kind = rt::Schedule::Kind::random;
    s.seed = seed;
  } else if (which == 2) {
    s.kind = rt::Schedule::Kind::pct;
    s.seed = seed;
    s.pct_depth = 3;
  } else if (which == 3) {
    s.kind = rt::Schedule::Kind::delay;
    s.delay_stream = 0;
    s.delay_ops = 5;
  }
  return s;
}

std::unique_ptr<rt::SimRuntime> make_sim(const rt::Schedule& schedule) {
  rt::SimOptions sim;
  sim.schedule = schedule;
  return std::make_unique<rt::SimRuntime>(rt::RuntimeOptions{}, sim);
}

rt::Launch logits_launch(const IndexerLogitsArgs& a) {
  rt::Launch l;
  l.op = kIndexerLogitsOp;
  l.blocks = static_cast<int>(a.num_sms);
  l.cooperative = make_indexer_logits_launch(a);
  l.check_contract = [a] { check_indexer_logits_contract(a); };
  return l;
}

// Runs one launch on a fresh sim runtime and synchronizes (HangError and ContractError escape).
void run_on_sim(const IndexerLogitsArgs& a, const rt::Schedule& schedule) {
  auto sim = make_sim(schedule);
  const rt::StreamId s = sim->create_stream(0, "indexer");
  sim->launch(s, logits_launch(a));
  sim->synchronize(s);
}

// Bitwise, NaN included (an unwritten entry stays NaN and never equals).
void expect_logits(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && ++bad <= 3) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0u) << what;
}

std::vector<int64_t> random_lens(uint64_t seed, int64_t n, int64_t max_context) {
  std::mt19937_64 rng(seed * 7919u + 1u);
  const std::vector<int64_t> edges = {0, 1, 63, 64, 65, 127, 128, 129};
  std::vector<int64_t> lens;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t pick = rng() % 3;
    const int64_t v = pick == 0 ? edges[rng() % edges.size()] : static_cast<int64_t>(rng() % static_cast<uint64_t>(max_context + 1));
    lens.push_back(std::min(v, max_context));
  }
  return lens;
}

TEST(IndexerLogits, MatchesRecomputationAndReferenceUnderEveryStrategyLayoutAndSmCount) {
  constexpr int64_t kRows = 3, kNextN = 2, kMaxContext = 300;
  int runs = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    Problem p = make_problem(seed, kRows, kNextN, random_lens(seed, kRows * kNextN, kMaxContext), kMaxContext);
    const std::vector<float> want = recompute(p);
    // The reference formula (another summation order inside the dot): within f32 rounding.
    for (int64_t b = 0; b < kRows; ++b) {
      for (int64_t j = 0; j < kNextN; ++j) {
        for (int64_t t = 0; t < static_cast<int64_t>(p.context_lens.get({b, j})); ++t) {
          const float r = reference_score(p, b, j, t);
          const float w = want[static_cast<size_t>((b * kNextN + j) * kMaxContext + t)];
          ASSERT_NEAR(w, r, 1e-5f * (1.0f + std::fabs(r))) << "seed " << seed << " row " << b * kNextN + j << " key " << t;
        }
      }
    }
    for (bool per_token : {false, true}) {
      for (int64_t num_sms : {1, 3, 8}) {
        for (int64_t block_kv : {64, 16}) {
          const Tensor lens = per_token ? to_2d_context_lens(p.context_lens) : p.context_lens;
          const Tensor schedule = build_indexer_schedule(lens, block_kv, num_sms);
          for (int which = 0; which < 4; ++which) {
            p.logits.fill(std::numeric_limits<double>::quiet_NaN());
            const std::string what = "seed " + std::to_string(seed) + (per_token ? " per-token" : " native") +
                                     " sms " + std::to_string(num_sms) + " block_kv " + std::to_string(block_kv) +
                                     " " + strategy(which, seed).str();
            run_on_sim(args_for(p, per_token, schedule, num_sms, block_kv), strategy(which, seed));
            expect_logits(logits_of(p), want, what);
            ++runs;
          }
        }
      }
    }
  }
  EXPECT_EQ(runs, 3 * 2 * 3 * 2 * 4);
}

TEST(IndexerLogits, ZeroLengthRowsAndAllZeroLensAreAllNegInf) {
  Problem p = make_problem(5, 2, 2, {0, 0, 0, 0}, 128);
  run_on_sim(args_for(p, false, build_indexer_schedule(p.context_lens, 64, 3), 3, 64), strategy(1, 5));
  expect_logits(logits_of(p), std::vector<float>(static_cast<size_t>(4 * 128), kNegInf), "all zero");
  Problem q = make_problem(6, 2, 2, {0, 70, 0, 128}, 128);
  run_on_sim(args_for(q, true, build_indexer_schedule(to_2d_context_lens(q.context_lens), 64, 8), 8, 64),
             strategy(2, 6));
  expect_logits(logits_of(q), recompute(q), "some zero");
}

TEST(IndexerLogits, ReplayingTheBlockDecisionsReproducesTheRun) {
  Problem p = make_problem(9, 2, 3, {65, 1, 128, 200, 0, 64}, 256);
  const IndexerLogitsArgs a = args_for(p, true, build_indexer_schedule(to_2d_context_lens(p.context_lens), 64, 3), 3, 64);
  auto sim = make_sim(strategy(1, 42));
  const rt::StreamId s = sim->create_stream(0, "indexer");
  sim->launch(s, logits_launch(a));
  sim->synchronize(s);
  const std::vector<int32_t> decisions = sim->decisions();
  EXPECT_FALSE(decisions.empty());
  rt::Schedule replay;
  replay.kind = rt::Schedule::Kind::replay;
  replay.choices = decisions;
  p.logits.fill(0.0);
  auto again = make_sim(replay);
  const rt::StreamId s2 = again->create_stream(0, "indexer");
  again->launch(s2, logits_launch(a));
  again->synchronize(s2);
  EXPECT_EQ(again->decisions(), decisions);
  expect_logits(logits_of(p), recompute(p), "replayed");
}

TEST(IndexerLogits, ContractRefusesWhatTheKernelCanSee) {
  Problem p = make_problem(3, 2, 2, {10, 20, 30, 40}, 128);
  const Tensor good_schedule = build_indexer_schedule(p.context_lens, 64, 2);
  const auto refused = [&](IndexerLogitsArgs a, const std::string& argument) {
    try {
      // The values are checked when the launch runs; the shapes already when it is made.
      check_indexer_logits_contract(a);
      ADD_FAILURE() << "accepted; expected a ContractError on " << argument;
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kIndexerLogitsOp);
      EXPECT_EQ(e.argument(), argument) << e.what();
    }
  };
  const IndexerLogitsArgs good = args_for(p, false, good_schedule, 2, 64);
  EXPECT_NO_THROW(make_indexer_logits_launch(good));
  IndexerLogitsArgs a = good;
  a.schedule = build_indexer_schedule(p.context_lens, 64, 3);  // shape [4, 2] for num_sms 2
  refused(a, "schedule");
  a = good;
  a.schedule = i32_tensor({3, 2}, {0, 0, 1, 0, 0, 1}, "schedule");  // not monotone
  refused(a, "schedule");
  a = good;
  a.schedule = i32_tensor({3, 2}, {0, 0, -1, 0, 2, 0}, "schedule");
  refused(a, "schedule");
  a = good;
  a.context_lens = i32_tensor({2, 2}, {10, 20, 30, 129}, "lens");  // past max_context
  refused(a, "context_lens");
  a = good;
  a.block_table = i32_tensor({2, 2}, {0, 1, 2, 99}, "table");  // no page 99
  refused(a, "block_table");
  a = good;
  a.weights = Tensor::empty({3, 4}, DType::f32, "w");
  refused(a, "weights");
  a = good;
  a.q = p.q.transpose(2, 3);
  refused(a, "q");
  a = good;
  a.num_sms = 0;
  refused(a, "num_sms");
  a = good;
  a.block_kv = 0;
  refused(a, "block_kv");
  // A grid of another size than num_sms is refused when the launch runs.
  auto sim = make_sim(strategy(0, 0));
  const rt::StreamId s = sim->create_stream(0, "indexer");
  rt::Launch l = logits_launch(good);
  l.blocks = 3;
  sim->launch(s, l);
  EXPECT_THROW(sim->synchronize(s), ContractError);
}

// ---- seed bug A3 --------------------------------------------------------------------------------

// MTP target-verify: request b's draft tokens j see seq_len_b + j + 1 keys, so lengths differ per
// token and cross block edges (block_kv 64).
Problem target_verify_problem(uint64_t seed) {
  const std::vector<int64_t> seq = {62, 126, 199};
  std::vector<int64_t> lens;
  for (int64_t b = 0; b < 3; ++b) {
    for (int64_t j = 0; j < 3; ++j) lens.push_back(seq[static_cast<size_t>(b)] + j + 1);
  }
  return make_problem(seed, 3, 3, lens, 256);
}

void expect_hang(const IndexerLogitsArgs& a, const rt::Schedule& strat, const std::string& what) {
  const auto start = std::chrono::steady_clock::now();
  try {
    run_on_sim(a, strat);
    ADD_FAILURE() << what << ": expected a HangError";
  } catch (const rt::HangError& e) {
    const double elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(elapsed_s, 1.0) << what;
    EXPECT_EQ(e.kernel(), kIndexerLogitsOp) << what;
    EXPECT_FALSE(e.waiting_blocks().empty()) << what;
    const std::string message = e.what();
    EXPECT_NE(message.find("hang in 'indexer_logits'"), std::string::npos) << message;
    EXPECT_NE(message.find("waits for"), std::string::npos) << message;
  }
}

TEST(IndexerLogitsSeedBugA3, BNextNScheduleOnPerTokenWorkHangsNamingTheKernel) {
  Problem p = target_verify_problem(11);
  for (int64_t num_sms : {1, 3, 8}) {
    const Tensor stale_layout = build_indexer_schedule(p.context_lens, 64, num_sms);  // from the (B, next_n) view
    for (int which = 0; which < 4; ++which) {
      expect_hang(args_for(p, true, stale_layout, num_sms, 64), strategy(which, 7),
                  "sms " + std::to_string(num_sms) + " " + strategy(which, 7).str());
    }
  }
}

TEST(IndexerLogitsSeedBugA3, TheHangReportNamesTheWaitingBlocksAndTheirCounters) {
  Problem p = target_verify_problem(12);
  try {
    run_on_sim(args_for(p, true, build_indexer_schedule(p.context_lens, 64, 1), 1, 64), strategy(0, 0));
    FAIL() << "expected a HangError";
  } catch (const rt::HangError& e) {
    // One SM walks tokens 0..2 (the schedule's rows) and stops at "row 3": tokens 3..8 are never done.
    EXPECT_EQ(e.waiting_blocks(), (std::vector<int>{0}));
    const std::string message = e.what();
    EXPECT_NE(message.find("block 0 waits for 'exit barrier: 1 SMs arrived, done-block counter == 23, 9 rows finished'"),
              std::string::npos)
        << message;
  }
}

TEST(IndexerLogitsSeedBugA3, NormalisedLayoutPasses) {
  Problem p = target_verify_problem(13);
  const std::vector<float> want = recompute(p);
  for (int64_t num_sms : {1, 3, 8}) {
    const Tensor fixed = build_indexer_schedule(to_2d_context_lens(p.context_lens), 64, num_sms);
    for (int which = 0; which < 4; ++which) {
      p.logits.fill(std::numeric_limits<double>::quiet_NaN());
      run_on_sim(args_for(p, true, fixed, num_sms, 64), strategy(which, 3));
      expect_logits(logits_of(p), want, "normalised, sms " + std::to_string(num_sms));
    }
    // DeepGEMM's native layout is fine too when schedule and launch agree on it (sglang PR #28892).
    p.logits.fill(std::numeric_limits<double>::quiet_NaN());
    run_on_sim(args_for(p, false, build_indexer_schedule(p.context_lens, 64, num_sms), num_sms, 64), strategy(1, 3));
    expect_logits(logits_of(p), want, "native, sms " + std::to_string(num_sms));
  }
}

TEST(IndexerLogitsSeedBugA3, PerTokenScheduleOnTheNativeLaunchIsNeverSilentlyWrong) {
  // The other way round, the per-token entries name rows the native launch does not have: the SM
  // whose end lies past the last row walks to the end of the work. Here that covers every key block
  // exactly once (right logits, one SM doing most of the work); where it does not, the counters hang.
  Problem p = target_verify_problem(14);
  const std::vector<float> want = recompute(p);
  for (int64_t num_sms : {1, 3, 8}) {
    const Tensor per_token = build_indexer_schedule(to_2d_context_lens(p.context_lens), 64, num_sms);
    p.logits.fill(std::numeric_limits<double>::quiet_NaN());
    try {
      run_on_sim(args_for(p, false, per_token, num_sms, 64), strategy(1, 9));
      expect_logits(logits_of(p), want, "reverse, sms " + std::to_string(num_sms));
    } catch (const rt::HangError& e) {
      EXPECT_EQ(e.kernel(), kIndexerLogitsOp);
    }
  }
}

// Graph replay: the schedule is captured with the launch; a replay whose lengths were updated in
// place without refreshing the schedule runs the old split on the new work.
struct Captured {
  std::unique_ptr<rt::SimRuntime> sim;
  rt::StreamId stream;
  rt::GraphId graph;
};

Captured capture(const IndexerLogitsArgs& a, uint64_t seed) {
  Captured c{make_sim(strategy(1, seed)), {}, {}};
  c.stream = c.sim->create_stream(0, "indexer");
  c.sim->begin_capture(c.stream);
  c.sim->launch(c.stream, logits_launch(a));
  c.graph = c.sim->end_capture(c.stream);
  return c;
}

void set_lens(Tensor& lens, const std::vector<int64_t>& values) {
  for (int64_t i = 0; i < lens.size(0); ++i) lens.set({i, 0}, static_cast<double>(values[static_cast<size_t>(i)]));
}

TEST(IndexerLogitsSeedBugA3, StaleScheduleAfterReplayHangsWhenItNoLongerPartitions) {
  // Per token, block_kv 64, 2 SMs: 192, 64 keys -> 3 + 1 blocks, schedule (0,0) (0,2) (2,0). After the
  // replay's lengths shrink to 64, 64 the entry (0, 2) lies past row 0's single block: SM 0 never meets
  // its end and walks on over row 1, which SM 1 also does, and the done-block counter passes 2.
  Problem p = make_problem(21, 2, 1, {192, 64}, 256);
  const Tensor schedule = build_indexer_schedule(p.context_lens, 64, 2);
  Captured c = capture(args_for(p, false, schedule, 2, 64), 4);
  c.sim->replay(c.graph, c.stream);
  c.sim->synchronize(c.stream);
  expect_logits(logits_of(p), recompute(p), "first replay");

  set_lens(p.context_lens, {64, 64});
  EXPECT_TRUE(indexer_schedule_mismatch(schedule, p.context_lens, 64, 2).has_value());
  c.sim->replay(c.graph, c.stream);
  const auto start = std::chrono::steady_clock::now();
  try {
    c.sim->synchronize(c.stream);
    FAIL() << "expected a HangError";
  } catch (const rt::HangError& e) {
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
    EXPECT_EQ(e.kernel(), kIndexerLogitsOp);
    EXPECT_EQ(e.waiting_blocks(), (std::vector<int>{0, 1}));
    EXPECT_NE(std::string(e.what()).find("done-block counter == 2"), std::string::npos) << e.what();
  }
}

TEST(IndexerLogitsSeedBugA3, RefreshingTheCapturedScheduleInPlaceFixesTheReplay) {
  Problem p = make_problem(22, 2, 1, {192, 64}, 256);
  Tensor schedule = build_indexer_schedule(p.context_lens, 64, 2);
  Captured c = capture(args_for(p, false, schedule, 2, 64), 5);
  set_lens(p.context_lens, {64, 64});
  // What sglang's fix does on every replay: recompute and copy into the captured buffer.
  const Tensor fresh = build_indexer_schedule(p.context_lens, 64, 2);
  std::memcpy(schedule.data<int32_t>(), fresh.data<int32_t>(), static_cast<size_t>(fresh.numel()) * sizeof(int32_t));
  p.logits.fill(std::numeric_limits<double>::quiet_NaN());
  c.sim->replay(c.graph, c.stream);
  c.sim->synchronize(c.stream);
  expect_logits(logits_of(p), recompute(p), "refreshed replay");
}

TEST(IndexerLogitsSeedBugA3, StaleScheduleThatStillPartitionsRunsRightAndOnlyTheFreshnessCheckSeesIt) {
  // 64, 64 -> (0,0) (1,0) (2,0); the replay's 192, 64 (3 + 1 blocks) still split at row 1: every block
  // is done once, the logits are right, the load is unbalanced. The kernel cannot tell; the harness's
  // freshness check can.
  Problem p = make_problem(23, 2, 1, {64, 64}, 256);
  const Tensor schedule = build_indexer_schedule(p.context_lens, 64, 2);
  Captured c = capture(args_for(p, false, schedule, 2, 64), 6);
  set_lens(p.context_lens, {192, 64});
  p.logits.fill(std::numeric_limits<double>::quiet_NaN());
  c.sim->replay(c.graph, c.stream);
  c.sim->synchronize(c.stream);
  expect_logits(logits_of(p), recompute(p), "stale but partitioning");
  const std::optional<std::string> m = indexer_schedule_mismatch(schedule, p.context_lens, 64, 2);
  ASSERT_TRUE(m.has_value());
  EXPECT_NE(m->find("entry 1"), std::string::npos) << *m;
}

TEST(IndexerLogitsSeedBugA3, RandomMonotoneSchedulesEitherGiveTheRightLogitsOrHang) {
  // The kernel's soundness on the real code: whatever monotone schedule it runs, never a wrong answer.
  Problem p = make_problem(31, 3, 2, {70, 0, 130, 64, 1, 200}, 256);
  const std::vector<float> want = recompute(p);
  std::mt19937_64 rng(99);
  int right = 0;
  int hung = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const bool per_token = trial % 2 == 1;
    const int64_t rows = per_token ? 6 : 3;
    std::vector<std::pair<int64_t, int64_t>> e(4);
    for (auto& [row, off] : e) {
      row = static_cast<int64_t>(rng() % static_cast<uint64_t>(rows + 2));
      off = static_cast<int64_t>(rng() % 8);
    }
    std::sort(e.begin(), e.end());
    if (trial < 6) e = per_token ? Entries{{0, 0}, {2, 1}, {4, 0}, {6, 0}} : Entries{{0, 0}, {1, 0}, {2, 1}, {3, 0}};
    std::vector<int64_t> flat;
    for (const auto& [row, off] : e) {
      flat.push_back(row);
      flat.push_back(off);
    }
    p.logits.fill(std::numeric_limits<double>::quiet_NaN());
    try {
      run_on_sim(args_for(p, per_token, i32_tensor({4, 2}, flat, "schedule"), 3, 64), strategy(trial % 4, trial));
      expect_logits(logits_of(p), want, "trial " + std::to_string(trial));
      ++right;
    } catch (const rt::HangError& e2) {
      EXPECT_EQ(e2.kernel(), kIndexerLogitsOp);
      ++hung;
    }
  }
  EXPECT_GT(right, 0);
  EXPECT_GT(hung, 0);
}

// ---- top-k ----------------------------------------------------------------------------------------

TEST(IndexerTopk, BestScoresTiesToTheLowerIndexAscendingAndPadded) {
  const std::vector<float> row = {1.0f, 3.0f, 2.0f, 3.0f, kNegInf, 0.5f, 3.0f};
  EXPECT_EQ(topk_indices(row, 2), (std::vector<int32_t>{1, 3}));  // three 3.0s: the lower two
  EXPECT_EQ(topk_indices(row, 4), (std::vector<int32_t>{1, 2, 3, 6}));
  // Six valid entries, k 8: all of them, then -1.
  EXPECT_EQ(topk_indices(row, 8), (std::vector<int32_t>{0, 1, 2, 3, 5, 6, -1, -1}));
  EXPECT_EQ(topk_indices(row, 0), (std::vector<int32_t>{}));
  const std::vector<float> none = {kNegInf, kNegInf};
  EXPECT_EQ(topk_indices(none, 3), (std::vector<int32_t>{-1, -1, -1}));
  const std::vector<float> nan_row = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_THROW(topk_indices(nan_row, 1), ContractError);
  EXPECT_THROW(topk_indices(row, -1), ContractError);
}

TEST(IndexerTopk, OfKernelRowsMatchesAStableSortOfTheRecomputation) {
  Problem p = make_problem(41, 2, 2, {0, 37, 129, 256}, 256);
  run_on_sim(args_for(p, true, build_indexer_schedule(to_2d_context_lens(p.context_lens), 64, 3), 3, 64), strategy(1, 1));
  const std::vector<float> want = recompute(p);
  for (int64_t row = 0; row < 4; ++row) {
    const int64_t len = static_cast<int64_t>(p.context_lens.get({row / 2, row % 2}));
    std::vector<int32_t> order;
    for (int32_t t = 0; t < len; ++t) order.push_back(t);
    const float* r = want.data() + row * 256;
    std::stable_sort(order.begin(), order.end(), [r](int32_t a, int32_t b) { return r[a] > r[b]; });
    order.resize(static_cast<size_t>(std::min<int64_t>(len, 64)));
    std::sort(order.begin(), order.end());
    order.resize(64, -1);
    EXPECT_EQ(topk_indices(p.logits, row, 64), order) << "row " << row;
  }
  EXPECT_THROW(topk_indices(p.logits, 4, 8), ContractError);
}

}  // namespace
}  // namespace dsv4::kernels
