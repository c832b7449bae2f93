// GPU tests of kernels/indexer_logits.h: the persistent logits kernel and the indexer top-k on device
// tensors against the same entry points on host tensors (bitwise: the CUDA kernels follow the host
// kernels' arithmetic order), over schedules, SM counts, layouts (native (B, next_n) and per token),
// block sizes and token counts; reruns bitwise identical; a launch captured into a CUDA graph; the
// co-residency limit; the reference formula within the host unit tests' tolerance; and seed bug A3
// (a schedule that does not partition the launched work) failing the launch instead of hanging.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/core/allocator.h"
#include "engine/core/error.h"
#include "engine/core/tensor.h"
#include "kernels/cuda/port.h"
#include "kernels/device.h"
#include "kernels/indexer_logits.h"
#include "reference/tensor.h"

namespace dsv4::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Tensor i32_tensor(const Shape& shape, const std::vector<int64_t>& values, const std::string& name) {
  return Tensor::from_values(shape, DType::i32, std::vector<double>(values.begin(), values.end()), name);
}

// A host copy of any tensor (device tensors after the device finished its work).
Tensor to_host(const Tensor& t) {
  if (t.device().kind == DeviceKind::cuda) {
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) throw std::runtime_error(std::string("cudaDeviceSynchronize: ") + cudaGetErrorString(e));
  }
  return t.to(default_host_allocator());
}

template <class T>
std::vector<T> elements(const Tensor& t) {
  const Tensor h = to_host(t);
  const T* p = h.data<T>();
  return std::vector<T>(p, p + h.numel());
}

// Bitwise, NaN included (the testing allocator poisons fresh device memory: an unwritten entry shows).
template <class T>
void expect_bitwise(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && ++bad <= 3) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0u) << what;
}

// ---- logits -------------------------------------------------------------------------------------

struct Problem {
  int64_t rows = 0;
  int64_t next_n = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t max_context = 0;
  Tensor q, kv_pages, block_table, weights, context_lens;
};

// Random host inputs (as tests/unit/test_indexer_logits.cpp makes them): each request row its own
// shuffled pages.
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
  return p;
}

std::vector<int64_t> random_lens(uint64_t seed, int64_t n, int64_t max_context) {
  std::mt19937_64 rng(seed * 7919u + 1u);
  const std::vector<int64_t> edges = {0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129};
  std::vector<int64_t> lens;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t pick = rng() % 3;
    const int64_t v = pick == 0 ? edges[rng() % edges.size()] : static_cast<int64_t>(rng() % static_cast<uint64_t>(max_context + 1));
    lens.push_back(std::min(v, max_context));
  }
  return lens;
}

// Host arguments for the native (rows, next_n) launch or the per-token (rows * next_n, 1) one, with
// a fresh NaN-filled logits tensor.
IndexerLogitsArgs host_args(const Problem& p, bool per_token, const Tensor& schedule, int64_t num_sms, int64_t block_kv) {
  IndexerLogitsArgs a;
  a.q = per_token ? p.q.view({p.rows * p.next_n, 1, p.heads, p.head_dim}) : p.q;
  a.kv_pages = p.kv_pages;
  a.block_table = per_token ? expand_block_table_per_token(p.block_table, p.next_n) : p.block_table;
  a.weights = p.weights;
  a.context_lens = per_token ? to_2d_context_lens(p.context_lens) : p.context_lens;
  a.schedule = schedule;
  a.logits = Tensor::empty({p.rows * p.next_n, p.max_context}, DType::f32, "logits");
  a.logits.fill(std::numeric_limits<double>::quiet_NaN());
  a.block_kv = block_kv;
  a.num_sms = num_sms;
  return a;
}

// The same arguments on the GPU; logits fresh from the testing allocator (NaN poison).
IndexerLogitsArgs device_args(const IndexerLogitsArgs& h, Allocator& device) {
  IndexerLogitsArgs d = h;
  d.q = h.q.to(device);
  d.kv_pages = h.kv_pages.to(device);
  d.block_table = h.block_table.to(device);
  d.weights = h.weights.to(device);
  d.context_lens = h.context_lens.to(device);
  d.schedule = h.schedule.to(device);
  d.logits = Tensor::empty(h.logits.shape(), DType::f32, device, "logits");
  return d;
}

Tensor schedule_for(const Problem& p, bool per_token, int64_t block_kv, int64_t num_sms) {
  return build_indexer_schedule(per_token ? to_2d_context_lens(p.context_lens) : p.context_lens, block_kv, num_sms);
}

// Runs the entry point on host and device tensors; returns both logits.
std::pair<std::vector<float>, std::vector<float>> run_both(const Problem& p, bool per_token, int64_t num_sms,
                                                           int64_t block_kv, Allocator& device) {
  const IndexerLogitsArgs h = host_args(p, per_token, schedule_for(p, per_token, block_kv, num_sms), num_sms, block_kv);
  indexer_logits(h);
  const IndexerLogitsArgs d = device_args(h, device);
  indexer_logits(d);
  return {elements<float>(d.logits), elements<float>(h.logits)};
}

TEST(IndexerLogitsGpu, MatchesTheHostBitwiseOverSchedulesLayoutsBlockSizesAndSmCounts) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  int runs = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    for (int64_t next_n : {1, 2}) {
      constexpr int64_t kRows = 5, kMaxContext = 300;
      const Problem p = make_problem(seed, kRows, next_n, random_lens(seed + 10 * next_n, kRows * next_n, kMaxContext),
                                     kMaxContext);
      for (bool per_token : {false, true}) {
        for (int64_t num_sms : {1, 3, 8, 132}) {
          for (int64_t block_kv : {64, 16, 37}) {
            const auto [got, want] = run_both(p, per_token, num_sms, block_kv, device);
            expect_bitwise(got, want,
                           "seed " + std::to_string(seed) + " next_n " + std::to_string(next_n) +
                               (per_token ? " per-token" : " native") + " sms " + std::to_string(num_sms) +
                               " block_kv " + std::to_string(block_kv));
            ++runs;
          }
        }
      }
    }
  }
  EXPECT_EQ(runs, 3 * 2 * 2 * 4 * 3);
}

TEST(IndexerLogitsGpu, TokenCountsIncludingZeroOneOddAndCaptureBuckets) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  for (int64_t T : {0, 1, 2, 7, 8, 64}) {
    for (int64_t next_n : {1, 2}) {
      if (T % next_n != 0) continue;
      const int64_t rows = T / next_n;
      const Problem p = make_problem(100 + static_cast<uint64_t>(T), rows, next_n, random_lens(T + 1, T, 200), 200);
      for (int64_t num_sms : {1, 5, 16}) {
        const auto [got, want] = run_both(p, /*per_token=*/true, num_sms, 64, device);
        expect_bitwise(got, want, "T " + std::to_string(T) + " next_n " + std::to_string(next_n) + " sms " +
                                      std::to_string(num_sms));
      }
    }
  }
}

TEST(IndexerLogitsGpu, ZeroLengthsAndTheModelsHeadShape) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  // Every length 0: rows all -inf, written by the prologue alone.
  const Problem zero = make_problem(5, 2, 2, {0, 0, 0, 0}, 128);
  auto [got0, want0] = run_both(zero, false, 3, 64, device);
  expect_bitwise(got0, want0, "all zero");
  expect_bitwise(got0, std::vector<float>(4 * 128, kNegInf), "all zero are -inf");
  // DeepSeek-V4's indexer heads: 64 heads of 128, a 64-token batch.
  const Problem model = make_problem(6, 64, 1, random_lens(6, 64, 512), 512, 64, 128);
  auto [got, want] = run_both(model, true, 132, 64, device);
  expect_bitwise(got, want, "64 x 128 heads");
}

TEST(IndexerLogitsGpu, MatchesTheReferenceFormulaWithinTheUnitTestsTolerance) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Problem p = make_problem(7, 3, 2, random_lens(7, 6, 300), 300, 8, 32);
  const IndexerLogitsArgs h = host_args(p, true, schedule_for(p, true, 64, 8), 8, 64);
  const IndexerLogitsArgs d = device_args(h, device);
  indexer_logits(d);
  const std::vector<float> got = elements<float>(d.logits);
  // reference/indexer's formula (ref::dot: another summation order inside the dot), as
  // tests/unit/test_indexer_logits.cpp compares it: within 1e-5 * (1 + |r|).
  for (int64_t token = 0; token < p.rows * p.next_n; ++token) {
    const auto len = static_cast<int64_t>(p.context_lens.get({token / p.next_n, token % p.next_n}));
    for (int64_t t = 0; t < p.max_context; ++t) {
      const float g = got[static_cast<size_t>(token * p.max_context + t)];
      if (t >= len) {
        ASSERT_EQ(g, kNegInf) << "token " << token << " key " << t;
        continue;
      }
      const auto page = static_cast<int64_t>(p.block_table.get({token / p.next_n, t / kIndexerPageKeys}));
      const float* k = p.kv_pages.data<float>() + (page * kIndexerPageKeys + t % kIndexerPageKeys) * p.head_dim;
      double sum = 0.0;
      for (int64_t hd = 0; hd < p.heads; ++hd) {
        const float* qh = p.q.data<float>() + (token * p.heads + hd) * p.head_dim;
        const auto logit = static_cast<float>(ref::dot(qh, k, p.head_dim));
        sum += static_cast<double>(p.weights.data<float>()[token * p.heads + hd] * std::max(logit, 0.0f));
      }
      const auto r = static_cast<float>(sum);
      ASSERT_NEAR(g, r, 1e-5f * (1.0f + std::fabs(r))) << "token " << token << " key " << t;
    }
  }
}

TEST(IndexerLogitsGpu, TenRerunsOnAStreamAndAGraphReplayAreBitwiseIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Problem p = make_problem(8, 4, 2, random_lens(8, 8, 256), 256);
  const IndexerLogitsArgs h = host_args(p, true, schedule_for(p, true, 64, 6), 6, 64);
  indexer_logits(h);
  const std::vector<float> want = elements<float>(h.logits);
  const IndexerLogitsArgs d = device_args(h, device);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    const StreamScope scope(stream);
    for (int run = 0; run < 10; ++run) {
      indexer_logits(d);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      expect_bitwise(elements<float>(d.logits), want, "rerun " + std::to_string(run));
    }
    // Captured (scratch allocation, counter memset and kernel in the graph), replayed twice.
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), cudaSuccess);
    indexer_logits(d);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (int replay = 0; replay < 2; ++replay) {
      ASSERT_EQ(cudaMemsetAsync(d.logits.data_ptr(), 0xff, static_cast<size_t>(d.logits.numel()) * 4, stream), cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      expect_bitwise(elements<float>(d.logits), want, "graph replay " + std::to_string(replay));
    }
    EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(IndexerLogitsGpu, AllResidentBlocksWorkAndOneMoreIsAContractError) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Problem p = make_problem(9, 6, 2, random_lens(9, 12, 300), 300);
  const int64_t most = cuda::indexer_logits_max_blocks();
  ASSERT_GE(most, 1);
  const auto [got, want] = run_both(p, true, most, 16, device);
  expect_bitwise(got, want, "num_sms = " + std::to_string(most));
  const IndexerLogitsArgs h = host_args(p, true, schedule_for(p, true, 16, most + 1), most + 1, 16);
  try {
    indexer_logits(device_args(h, device));
    FAIL() << "num_sms past the co-resident blocks was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), kIndexerLogitsOp);
    EXPECT_EQ(e.argument(), "num_sms") << e.what();
  }
}

TEST(IndexerLogitsGpu, ContractRefusesStridedAndMixedDeviceTensors) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Problem p = make_problem(10, 2, 2, {10, 20, 30, 40}, 128);
  const IndexerLogitsArgs h = host_args(p, false, schedule_for(p, false, 64, 2), 2, 64);
  const IndexerLogitsArgs good = device_args(h, device);
  const auto refused = [](const IndexerLogitsArgs& a, const std::string& argument) {
    try {
      indexer_logits(a);
      ADD_FAILURE() << "accepted; expected a ContractError on " << argument;
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kIndexerLogitsOp);
      EXPECT_EQ(e.argument(), argument) << e.what();
    }
  };
  IndexerLogitsArgs a = good;
  a.q = good.q.transpose(2, 3);  // strided: the contract wants every tensor contiguous
  refused(a, "q");
  a = good;
  a.schedule = h.schedule;  // on the host while the rest is on the GPU
  refused(a, "schedule");
  a = good;
  a.num_sms = 3;  // the schedule has 3 rows, num_sms 3 needs 4
  refused(a, "schedule");
  EXPECT_THROW(make_indexer_logits_launch(good), ContractError);  // the cooperative form is host-only
}

// ---- seed bug A3: a non-partitioning schedule fails the launch ----------------------------------

// MTP target-verify lengths (tests/unit/test_indexer_logits.cpp): request b's draft tokens j see
// seq_len_b + j + 1 keys.
Problem target_verify_problem(uint64_t seed) {
  const std::vector<int64_t> seq = {62, 126, 199};
  std::vector<int64_t> lens;
  for (int64_t b = 0; b < 3; ++b) {
    for (int64_t j = 0; j < 3; ++j) lens.push_back(seq[static_cast<size_t>(b)] + j + 1);
  }
  return make_problem(seed, 3, 3, lens, 256);
}

// In the death-test child: launch, synchronize, exit 3 when the launch failed (0 when it worked, 4
// when the entry point threw). The kernel's printf goes to stdout, sent to stderr here for the log.
[[noreturn]] void launch_and_exit(const IndexerLogitsArgs& d) {
  std::fflush(stdout);
  (void)dup2(STDERR_FILENO, STDOUT_FILENO);
  try {
    indexer_logits(d);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "threw: %s\n", e.what());
    std::_Exit(4);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  std::fflush(stdout);
  std::fprintf(stderr, "synchronize: %s\n", cudaGetErrorString(e));
  std::fflush(stderr);
  std::_Exit(e == cudaSuccess ? 0 : 3);
}

class IndexerLogitsGpuSeedBugA3 : public ::testing::Test {
 protected:
  // A trap poisons the CUDA context: each failing launch runs in a re-executed child process.
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};
// The death tests (the `sanitizer` runs leave out *DeathTest*: their children trap by design).
using IndexerLogitsGpuSeedBugA3DeathTest = IndexerLogitsGpuSeedBugA3;

TEST_F(IndexerLogitsGpuSeedBugA3DeathTest, BNextNScheduleOnPerTokenWorkFailsTheLaunch) {
  DSV4_REQUIRE_GPU();
  const Problem p = target_verify_problem(11);
  for (int64_t num_sms : {1, 3, 8}) {
    const Tensor stale_layout = build_indexer_schedule(p.context_lens, 64, num_sms);  // from the (B, next_n) view
    const IndexerLogitsArgs h = host_args(p, true, stale_layout, num_sms, 64);
    // The host form of the same launch reports the hang.
    try {
      indexer_logits(h);
      ADD_FAILURE() << "host: expected a hang, sms " << num_sms;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("hang in 'indexer_logits'"), std::string::npos) << e.what();
    }
    Allocator device(*cuda_memory(0), AllocatorMode::testing);
    const IndexerLogitsArgs d = device_args(h, device);
    EXPECT_EXIT(launch_and_exit(d), ::testing::ExitedWithCode(3), "synchronize: ") << "sms " << num_sms;
  }
}

TEST_F(IndexerLogitsGpuSeedBugA3DeathTest, StaleScheduleWhoseBlocksAreDoneTwiceFailsTheLaunch) {
  DSV4_REQUIRE_GPU();
  // Per token, 2 SMs, built for lengths 192, 64 ((0,0) (0,2) (2,0)) and run on 64, 64: SM 0 walks past
  // row 0 over row 1, which SM 1 also does; the done-block count passes the total.
  Problem p = make_problem(21, 2, 1, {64, 64}, 256);
  const Tensor stale = build_indexer_schedule(i32_tensor({2, 1}, {192, 64}, "old_lens"), 64, 2);
  const IndexerLogitsArgs h = host_args(p, false, stale, 2, 64);
  EXPECT_THROW(indexer_logits(h), std::runtime_error);
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const IndexerLogitsArgs d = device_args(h, device);
  EXPECT_EXIT(launch_and_exit(d), ::testing::ExitedWithCode(3), "synchronize: ");
}

TEST_F(IndexerLogitsGpuSeedBugA3, TheNormalisedScheduleRuns) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const Problem p = target_verify_problem(13);
  for (int64_t num_sms : {1, 3, 8}) {
    const auto [got, want] = run_both(p, true, num_sms, 64, device);
    expect_bitwise(got, want, "normalised, sms " + std::to_string(num_sms));
  }
}

// ---- top-k --------------------------------------------------------------------------------------

struct TopkCase {
  Tensor logits, block_table, topk, kv_index, lengths;
};

// Host tensors: scores with many ties (small integers, +-0), -inf entries, subnormals; pages random
// (negative ones too: the slot arithmetic wraps the same way on both).
TopkCase make_topk_case(uint64_t seed, int64_t T, int64_t C, int64_t k, int64_t extra_pages = 0) {
  std::mt19937_64 rng(seed);
  std::vector<double> scores(static_cast<size_t>(T * C));
  const int mode = static_cast<int>(seed % 4);
  for (double& v : scores) {
    const uint64_t r = rng();
    if (r % 5 == 0) {
      v = -std::numeric_limits<double>::infinity();
    } else if (mode == 0) {
      v = std::uniform_real_distribution<double>(-2.0, 2.0)(rng);
    } else if (mode == 1) {
      v = static_cast<double>(static_cast<int>(rng() % 5) - 2);  // ties
    } else if (mode == 2) {
      v = (rng() % 2 == 0) ? 0.0 : -0.0;
    } else {
      const double picks[] = {1e-45, -1e-45, 3e-39, std::numeric_limits<double>::infinity(), -7.5, 1.0, 1.0};
      v = picks[rng() % 7];
    }
  }
  const int64_t pages = (C + kIndexerPageKeys - 1) / kIndexerPageKeys + extra_pages;
  std::vector<int64_t> table(static_cast<size_t>(T * pages));
  for (int64_t& x : table) x = static_cast<int64_t>(rng() % 1000) - 1;
  TopkCase c;
  c.logits = Tensor::from_values({T, C}, DType::f32, scores, "logits");
  c.block_table = i32_tensor({T, pages}, table, "block_table");
  c.topk = Tensor::empty({T, k}, DType::i32, "topk");
  c.kv_index = Tensor::empty({T, k}, DType::i32, "kv_index");
  c.lengths = Tensor::empty({T}, DType::i32, "lengths");
  return c;
}

TopkCase on_device(const TopkCase& h, Allocator& device) {
  TopkCase d;
  d.logits = h.logits.to(device);
  d.block_table = h.block_table.to(device);
  d.topk = Tensor::empty(h.topk.shape(), DType::i32, device, "topk");
  d.kv_index = Tensor::empty(h.kv_index.shape(), DType::i32, device, "kv_index");
  d.lengths = Tensor::empty(h.lengths.shape(), DType::i32, device, "lengths");
  return d;
}

void run_topk(TopkCase& c, int64_t k) { indexer_topk(c.logits, c.block_table, k, c.topk, c.kv_index, c.lengths); }

void expect_same_topk(const TopkCase& got, const TopkCase& want, const std::string& what) {
  expect_bitwise(elements<int32_t>(got.topk), elements<int32_t>(want.topk), what + " topk");
  expect_bitwise(elements<int32_t>(got.kv_index), elements<int32_t>(want.kv_index), what + " kv_index");
  expect_bitwise(elements<int32_t>(got.lengths), elements<int32_t>(want.lengths), what + " lengths");
}

TEST(IndexerTopkGpu, MatchesTheHostBitwiseOverShapesTiesAndK) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  uint64_t seed = 0;
  for (int64_t T : {0, 1, 2, 7, 8, 64}) {
    for (int64_t C : {1, 63, 300, 1000}) {
      for (int64_t k : {0, 1, 5, 64, 257, 2048}) {
        ++seed;
        TopkCase h = make_topk_case(seed, T, C, k, static_cast<int64_t>(seed % 2));
        run_topk(h, k);
        TopkCase d = on_device(h, device);
        run_topk(d, k);
        expect_same_topk(d, h, "T " + std::to_string(T) + " C " + std::to_string(C) + " k " + std::to_string(k) +
                                   " seed " + std::to_string(seed));
      }
    }
  }
  // Many chunks and a k inside a long run of ties (DeepSeek-V4's index_topk is 2048).
  for (uint64_t s = 1; s <= 4; ++s) {
    TopkCase h = make_topk_case(1000 + s, 8, 9000, 2048);
    run_topk(h, 2048);
    TopkCase d = on_device(h, device);
    run_topk(d, 2048);
    expect_same_topk(d, h, "C 9000 mode " + std::to_string((1000 + s) % 4));
  }
}

TEST(IndexerTopkGpu, OfGpuLogitsMatchesAStableSortAndRerunsAreIdentical) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  // The engine's pipeline: GPU logits (-inf tails), then the top-k.
  const Problem p = make_problem(41, 2, 2, {0, 37, 129, 256}, 256);
  const IndexerLogitsArgs d = device_args(host_args(p, true, schedule_for(p, true, 64, 3), 3, 64), device);
  indexer_logits(d);
  constexpr int64_t kK = 64;
  const int64_t T = 4;
  TopkCase g;
  g.logits = d.logits;
  g.block_table = d.block_table;
  g.topk = Tensor::empty({T, kK}, DType::i32, device, "topk");
  g.kv_index = Tensor::empty({T, kK}, DType::i32, device, "kv_index");
  g.lengths = Tensor::empty({T}, DType::i32, device, "lengths");
  run_topk(g, kK);
  const std::vector<float> scores = elements<float>(d.logits);
  const std::vector<int32_t> topk = elements<int32_t>(g.topk);
  const std::vector<int32_t> kv_index = elements<int32_t>(g.kv_index);
  const std::vector<int32_t> lengths = elements<int32_t>(g.lengths);
  const Tensor table = to_host(d.block_table);
  for (int64_t row = 0; row < T; ++row) {
    // reference/indexer's selection: a stable sort by score, the best min(k, len), ascending.
    const auto len = static_cast<int64_t>(p.context_lens.get({row / 2, row % 2}));
    std::vector<int32_t> order;
    for (int32_t t = 0; t < len; ++t) order.push_back(t);
    const float* r = scores.data() + row * 256;
    std::stable_sort(order.begin(), order.end(), [r](int32_t a, int32_t b) { return r[a] > r[b]; });
    order.resize(static_cast<size_t>(std::min<int64_t>(len, kK)));
    std::sort(order.begin(), order.end());
    const auto count = static_cast<int32_t>(order.size());
    order.resize(kK, -1);
    EXPECT_EQ(std::vector<int32_t>(topk.begin() + row * kK, topk.begin() + (row + 1) * kK), order) << "row " << row;
    EXPECT_EQ(lengths[static_cast<size_t>(row)], std::max(1, count)) << "row " << row;
    for (int64_t j = 0; j < kK; ++j) {
      const int32_t e = order[static_cast<size_t>(j)];
      const int32_t want = e < 0 ? -1
                                 : static_cast<int32_t>(table.get({row, e / kIndexerPageKeys})) * 64 + e % 64;
      EXPECT_EQ(kv_index[static_cast<size_t>(row * kK + j)], want) << "row " << row << " entry " << j;
    }
  }
  for (int run = 0; run < 10; ++run) {
    run_topk(g, kK);
    expect_bitwise(elements<int32_t>(g.topk), topk, "rerun " + std::to_string(run));
    expect_bitwise(elements<int32_t>(g.kv_index), kv_index, "rerun " + std::to_string(run));
    expect_bitwise(elements<int32_t>(g.lengths), lengths, "rerun " + std::to_string(run));
  }
}

TEST(IndexerTopkGpu, NanIsInvalidOnTheGpuAndAContractErrorOnTheHost) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  TopkCase with_nan = make_topk_case(77, 2, 100, 8);
  TopkCase as_inf = make_topk_case(77, 2, 100, 8);
  for (int64_t i : {3, 50, 99}) {
    with_nan.logits.set({1, i}, std::numeric_limits<double>::quiet_NaN());
    as_inf.logits.set({1, i}, -std::numeric_limits<double>::infinity());
  }
  EXPECT_THROW(run_topk(with_nan, 8), ContractError);
  run_topk(as_inf, 8);
  TopkCase d = on_device(with_nan, device);
  run_topk(d, 8);
  expect_same_topk(d, as_inf, "NaN as -inf");
}

TEST(IndexerTopkGpu, ContractRefusesStridedAndMisshapenTensors) {
  DSV4_REQUIRE_GPU();
  Allocator device(*cuda_memory(0), AllocatorMode::testing);
  const TopkCase good = on_device(make_topk_case(5, 4, 128, 8), device);
  const auto refused = [](const std::function<void()>& f, const std::string& argument) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected a ContractError on " << argument;
    } catch (const ContractError& e) {
      EXPECT_EQ(e.op(), kIndexerTopkOp);
      EXPECT_EQ(e.argument(), argument) << e.what();
    }
  };
  TopkCase c = good;
  Tensor wide = Tensor::empty({4, 256}, DType::f32, device, "wide");
  c.logits = wide.narrow(1, 0, 128);  // strided rows
  refused([&] { run_topk(c, 8); }, "logits");
  c = good;
  refused([&] { run_topk(c, 9); }, "topk");  // [4, 8] for k 9
  c = good;
  c.block_table = Tensor::empty({4, 1}, DType::i32, device, "short_table");  // 64 keys < 128 columns
  refused([&] { run_topk(c, 8); }, "block_table");
  c = good;
  c.lengths = Tensor::empty({4}, DType::i32, "host_lengths");
  refused([&] { run_topk(c, 8); }, "lengths");
  c = good;
  refused([&] { run_topk(c, -1); }, "k");
}

}  // namespace
}  // namespace dsv4::kernels
