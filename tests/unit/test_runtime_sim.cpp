// The sim backend: schedules that keep correct programs correct and break racy ones, exact replay,
// graphs, cooperative kernels with deadlock reports, in-process collectives, and Schedule::parse.
#include <chrono>
#include <cstring>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/core/error.h"
#include "engine/runtime/sim_runtime.h"

namespace dsv4::rt {
namespace {

constexpr int kN = 64;  // floats per buffer

Schedule in_order() { return Schedule{}; }
Schedule random_schedule(uint64_t seed) {
  Schedule s;
  s.kind = Schedule::Kind::random;
  s.seed = seed;
  return s;
}
Schedule pct_schedule(uint64_t seed, int depth) {
  Schedule s;
  s.kind = Schedule::Kind::pct;
  s.seed = seed;
  s.pct_depth = depth;
  return s;
}
Schedule delay_schedule(int32_t stream, int ops) {
  Schedule s;
  s.kind = Schedule::Kind::delay;
  s.delay_stream = stream;
  s.delay_ops = ops;
  return s;
}
Schedule replay_schedule(std::vector<int32_t> choices) {
  Schedule s;
  s.kind = Schedule::Kind::replay;
  s.choices = std::move(choices);
  return s;
}

std::unique_ptr<SimRuntime> make_sim(const Schedule& schedule, int devices = 1, uint64_t max_queued_ops = 1u << 16) {
  RuntimeOptions o;
  o.devices = devices;
  SimOptions s;
  s.schedule = schedule;
  s.max_queued_ops = max_queued_ops;
  return std::make_unique<SimRuntime>(o, s);
}

BufferId floats(Runtime& rt, int device, const std::string& name, float fill = 0.0f, int n = kN) {
  const BufferId b = rt.alloc(device, static_cast<uint64_t>(n) * 4, name);
  const std::vector<float> v(static_cast<size_t>(n), fill);
  rt.upload(b, 0, v.data(), v.size() * 4);
  return b;
}

std::vector<float> read(Runtime& rt, BufferId b) {
  std::vector<float> v(rt.bytes(b) / 4);
  rt.download(b, 0, v.data(), v.size() * 4);
  return v;
}

float* f32(Runtime& rt, BufferId b) { return static_cast<float*>(rt.data(b)); }

// An element-wise host kernel out[i] = fn(in[i], other[i]) declaring what it reads and writes.
void elementwise(Runtime& rt, StreamId s, const std::string& name, BufferId out, BufferId in, BufferId other,
                 float (*fn)(float, float)) {
  Launch l;
  l.op = name;
  l.accesses = {Access{rt.all(in), AccessKind::read}, Access{rt.all(other), AccessKind::read},
                Access{rt.all(out), AccessKind::write}};
  float* o = f32(rt, out);
  const float* a = f32(rt, in);
  const float* b = f32(rt, other);
  l.host = [o, a, b, fn] {
    for (int i = 0; i < kN; ++i) o[i] = fn(a[i], b[i]);
  };
  rt.launch(s, std::move(l));
}

// ---- a multi-stream program: A produces, B and A consume, C joins both, then a copy ----------

struct Outcome {
  std::vector<float> out;
  std::vector<int32_t> decisions;
  uint64_t ops = 0;
};

Outcome run_pipeline(const Schedule& schedule, bool b_waits_for_a) {
  auto rt = make_sim(schedule);
  const StreamId a = rt->create_stream(0, "A");
  const StreamId b = rt->create_stream(0, "B");
  const StreamId c = rt->create_stream(0, "C");
  const EventId produced = rt->create_event("produced");
  const EventId squared = rt->create_event("squared");
  const EventId shifted = rt->create_event("shifted");
  const BufferId x = floats(*rt, 0, "x");
  const BufferId y = floats(*rt, 0, "y");
  const BufferId z = floats(*rt, 0, "z");
  const BufferId w = floats(*rt, 0, "w");
  const BufferId out = floats(*rt, 0, "out");
  const BufferId result = floats(*rt, 0, "result");
  std::vector<float> input(kN);
  for (int i = 0; i < kN; ++i) input[static_cast<size_t>(i)] = 0.5f * static_cast<float>(i) + 1.0f;
  rt->upload(x, 0, input.data(), input.size() * 4);

  elementwise(*rt, a, "produce", y, x, x, [](float v, float) { return 2.0f * v + 1.0f; });
  rt->record(produced, a);
  if (b_waits_for_a) rt->wait(b, produced);
  elementwise(*rt, b, "square", z, y, y, [](float v, float) { return v * v; });
  rt->record(squared, b);
  elementwise(*rt, a, "shift", w, y, y, [](float v, float) { return v + 3.0f; });
  rt->record(shifted, a);
  rt->wait(c, shifted);
  rt->wait(c, squared);
  elementwise(*rt, c, "combine", out, z, w, [](float p, float q) { return p + q; });
  rt->copy(c, rt->all(result), rt->all(out));
  rt->synchronize(c);
  rt->synchronize_device(0);
  return Outcome{read(*rt, result), rt->decisions(), rt->ops_executed()};
}

std::vector<float> pipeline_expected() {
  std::vector<float> e(kN);
  for (int i = 0; i < kN; ++i) {
    const float x = 0.5f * static_cast<float>(i) + 1.0f;
    const float y = 2.0f * x + 1.0f;
    e[static_cast<size_t>(i)] = y * y + (y + 3.0f);
  }
  return e;
}

TEST(OpTimes, SummedPerOpLargestFirstTiesByName) {
  EXPECT_TRUE(summarize_op_times({}).empty());
  const std::vector<OpTime> t =
      summarize_op_times({{"gemm", 1.5}, {"norm", 0.25}, {"gemm", 2.0}, {"attn", 0.25}, {"norm", 0.5}, {"topk", 3.5}});
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].op, "gemm");
  EXPECT_EQ(t[0].launches, 2);
  EXPECT_DOUBLE_EQ(t[0].ms, 3.5);
  EXPECT_EQ(t[1].op, "topk");  // 3.5 too: ties by name
  EXPECT_EQ(t[1].launches, 1);
  EXPECT_EQ(t[2].op, "norm");
  EXPECT_DOUBLE_EQ(t[2].ms, 0.75);
  EXPECT_EQ(t[3].op, "attn");
}

TEST(SimRuntime, NothingRunsAtIssueTime) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  int runs = 0;
  Launch l;
  l.op = "count";
  l.host = [&runs] { ++runs; };
  rt->launch(s, l);
  rt->launch(s, l);
  EXPECT_EQ(runs, 0);
  EXPECT_EQ(rt->ops_executed(), 0u);
  rt->synchronize(s);
  EXPECT_EQ(runs, 2);
  EXPECT_EQ(rt->ops_executed(), 2u);
}

TEST(SimRuntime, DiscardQueuedWorkDropsWhatAFailedLaunchLeftBehind) {
  RuntimeOptions o;
  o.caching_allocator = false;  // free waits for the device, as cudaFree does
  SimRuntime rt(o, SimOptions{});
  const StreamId a = rt.create_stream(0, "a"), b = rt.create_stream(0, "b");
  const EventId e = rt.create_event("e");
  const BufferId buf = rt.alloc(0, 64, "buf");
  int after = 0;
  Launch fail;
  fail.op = "fails";
  fail.host = [] { throw ContractError("fails", "x", "planted"); };
  Launch count;
  count.op = "count";
  count.host = [&after] { ++after; };
  rt.launch(a, fail);
  rt.launch(a, count);
  rt.record(e, a);
  rt.wait(b, e);
  rt.launch(b, count);
  EXPECT_THROW(rt.synchronize(a), ContractError);
  EXPECT_EQ(rt.discard_queued_work(), 4u);  // count, record, wait... everything not yet run
  rt.free(buf);                             // waits for the device: nothing is left to run
  EXPECT_EQ(after, 0);
  EXPECT_EQ(rt.discard_queued_work(), 0u);
}

TEST(SimRuntime, CorrectProgramIsBitwiseIdenticalUnderInOrderDelayAndPct) {
  const std::vector<float> expected = pipeline_expected();
  const Outcome base = run_pipeline(in_order(), true);
  ASSERT_EQ(base.out, expected);
  std::set<std::vector<int32_t>> interleavings = {base.decisions};
  for (int32_t stream = 0; stream < 3; ++stream) {
    for (int ops : {1, 2, 5, 1000}) {
      const Outcome o = run_pipeline(delay_schedule(stream, ops), true);
      EXPECT_EQ(o.out, expected) << "delay " << stream << ":" << ops;
      interleavings.insert(o.decisions);
    }
  }
  EXPECT_GE(interleavings.size(), 3u);  // the delays really reorder the streams
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    for (int depth : {1, 2, 3}) {
      EXPECT_EQ(run_pipeline(pct_schedule(seed, depth), true).out, expected) << "pct " << seed << ":" << depth;
    }
  }
}

TEST(SimRuntime, CorrectProgramIsBitwiseIdenticalUnder1000RandomSchedules) {
  const std::vector<float> expected = pipeline_expected();
  std::set<std::vector<int32_t>> distinct;
  for (uint64_t seed = 1; seed <= 1000; ++seed) {
    const Outcome o = run_pipeline(random_schedule(seed), true);
    ASSERT_EQ(o.out, expected) << "random seed " << seed;
    distinct.insert(o.decisions);
  }
  // The schedules really differ: otherwise the 1,000 runs would prove nothing.
  EXPECT_GT(distinct.size(), 5u);
}

TEST(SimRuntime, MissingWaitIsWrongUnderADelayOfTheProducer) {
  const std::vector<float> expected = pipeline_expected();
  EXPECT_EQ(run_pipeline(in_order(), false).out, expected);  // the benign schedule hides the bug
  EXPECT_NE(run_pipeline(delay_schedule(0, 1000), false).out, expected);
  EXPECT_EQ(run_pipeline(delay_schedule(0, 1000), true).out, expected);  // and the wait fixes it
}

TEST(SimRuntime, PctFindsTheMissingWaitWithSomeSeed) {
  const std::vector<float> expected = pipeline_expected();
  int wrong = 0;
  for (uint64_t seed = 1; seed <= 50; ++seed) wrong += run_pipeline(pct_schedule(seed, 2), false).out != expected;
  EXPECT_GT(wrong, 0);
}

TEST(SimRuntime, ReplayOfDecisionsReproducesResultAndDecisions) {
  for (uint64_t seed : {3u, 17u, 99u}) {
    const Outcome first = run_pipeline(random_schedule(seed), true);
    ASSERT_FALSE(first.decisions.empty());
    const Outcome again = run_pipeline(replay_schedule(first.decisions), true);
    EXPECT_EQ(again.out, first.out);
    EXPECT_EQ(again.decisions, first.decisions);
    EXPECT_EQ(again.ops, first.ops);
  }
  // A racy run's wrong answer replays exactly too: that is what a case file needs.
  const std::vector<float> expected = pipeline_expected();
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    const Outcome racy = run_pipeline(random_schedule(seed), false);
    if (racy.out == expected) continue;
    const Outcome again = run_pipeline(replay_schedule(racy.decisions), false);
    EXPECT_EQ(again.out, racy.out);
    EXPECT_EQ(again.decisions, racy.decisions);
    return;
  }
  FAIL() << "no random schedule among 200 exposed the missing wait";
}

TEST(SimRuntime, ReplayThatDivergesThrowsLogicError) {
  try {
    run_pipeline(replay_schedule({5}), true);
    FAIL() << "expected a divergence";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("diverged"), std::string::npos) << e.what();
  }
}

TEST(SimRuntime, WaitAwaitsTheRecordIssuedBeforeItNotALaterOne) {
  auto rt = make_sim(delay_schedule(0, 2));  // hold back A so that B may overtake its second half
  const StreamId a = rt->create_stream(0, "A");
  const StreamId b = rt->create_stream(0, "B");
  const EventId e = rt->create_event("e");
  bool first = false;
  bool second = false;
  bool saw_first = false;
  bool saw_second = true;
  Launch l1{.op = "first"};
  l1.host = [&] { first = true; };
  Launch l2{.op = "second"};
  l2.host = [&] { second = true; };
  Launch check{.op = "check"};
  check.host = [&] {
    saw_first = first;
    saw_second = second;
  };
  rt->launch(a, l1);
  rt->record(e, a);
  rt->wait(b, e);
  rt->launch(b, check);
  rt->launch(a, l2);
  rt->record(e, a);
  rt->synchronize(b);
  EXPECT_TRUE(saw_first);
  EXPECT_FALSE(saw_second);  // the second record came after the wait was issued
  rt->synchronize(e);        // the host waits for the last record issued
  EXPECT_TRUE(second);
}

TEST(SimRuntime, WaitOnANeverRecordedEventIsANoOp) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  const EventId e = rt->create_event("never");
  rt->wait(s, e);
  bool ran = false;
  Launch l{.op = "k"};
  l.host = [&] { ran = true; };
  rt->launch(s, l);
  rt->synchronize(s);
  EXPECT_TRUE(ran);
  EXPECT_TRUE(rt->query(e));
  rt->synchronize(e);
}

TEST(SimRuntime, QueryAdvancesAtMostOneOp) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  const EventId e = rt->create_event("done");
  Launch l{.op = "k"};
  l.host = [] {};
  for (int i = 0; i < 3; ++i) rt->launch(s, l);
  rt->record(e, s);
  for (uint64_t i = 1; i <= 3; ++i) {
    EXPECT_FALSE(rt->query(e));
    EXPECT_EQ(rt->ops_executed(), i);
  }
  EXPECT_TRUE(rt->query(e));  // the record ran
  EXPECT_EQ(rt->ops_executed(), 4u);
  EXPECT_TRUE(rt->query(e));
  EXPECT_EQ(rt->ops_executed(), 4u);
}

TEST(SimRuntime, AFullQueueRunsOpsOnItsOwn) {
  auto rt = make_sim(in_order(), 1, 4);
  const StreamId s = rt->create_stream(0, "s");
  Launch l{.op = "k"};
  l.host = [] {};
  for (int i = 0; i < 10; ++i) rt->launch(s, l);
  EXPECT_EQ(rt->ops_executed(), 6u);  // every launch past the fourth made room for itself
  rt->synchronize(s);
  EXPECT_EQ(rt->ops_executed(), 10u);
}

TEST(SimRuntime, AnExceptionInAHostKernelReachesTheHost) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  Launch l{.op = "bad"};
  l.host = [] { throw std::runtime_error("kernel failed"); };
  rt->launch(s, l);
  EXPECT_THROW(rt->synchronize(s), std::runtime_error);
}

TEST(SimRuntime, LaunchWithoutAHostImplementationIsRefused) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  Launch l{.op = "cuda_only"};
  l.cuda = [](void*) {};
  EXPECT_THROW(rt->launch(s, l), ContractError);
}

TEST(SimRuntime, RuntimeCallsFromInsideAKernelAreRefused) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  Launch inner{.op = "inner"};
  inner.host = [] {};
  Launch outer{.op = "outer"};
  outer.host = [&] { rt->launch(s, inner); };
  rt->launch(s, outer);
  EXPECT_THROW(rt->synchronize(s), ContractError);
}

// ---- graphs ---------------------------------------------------------------------------------------

struct ForkJoin {
  StreamId s, t;
  EventId fork, join;
  BufferId in, a, b, c, d, out;
};

ForkJoin make_fork_join(Runtime& rt) {
  ForkJoin f;
  f.s = rt.create_stream(0, "S");
  f.t = rt.create_stream(0, "T");
  f.fork = rt.create_event("fork");
  f.join = rt.create_event("join");
  f.in = floats(rt, 0, "in");
  f.a = floats(rt, 0, "a");
  f.b = floats(rt, 0, "b");
  f.c = floats(rt, 0, "c");
  f.d = floats(rt, 0, "d");
  f.out = floats(rt, 0, "out");
  return f;
}

// S: k1, k3, fork; T: k2 (reads k1's and k3's outputs) || S: k5; join; S: k4. With `early_fork` the
// fork event is recorded before k3 (a real bug class, legal under CUDA capture): k2 then lacks its
// edge from k3.
void issue_fork_join(Runtime& rt, const ForkJoin& f, bool early_fork) {
  elementwise(rt, f.s, "k1", f.a, f.in, f.in, [](float v, float) { return 2.0f * v; });
  if (early_fork) {
    rt.record(f.fork, f.s);
    rt.wait(f.t, f.fork);
  }
  elementwise(rt, f.s, "k3", f.c, f.a, f.a, [](float v, float) { return 3.0f * v; });
  if (!early_fork) {
    rt.record(f.fork, f.s);
    rt.wait(f.t, f.fork);
  }
  elementwise(rt, f.t, "k2", f.b, f.a, f.c, [](float p, float q) { return p + q + 1.0f; });
  elementwise(rt, f.s, "k5", f.d, f.a, f.a, [](float v, float) { return v - 1.0f; });
  rt.record(f.join, f.t);
  rt.wait(f.s, f.join);
  elementwise(rt, f.s, "k4", f.out, f.b, f.c, [](float p, float q) { return p * q - 1.0f; });
  elementwise(rt, f.s, "k6", f.out, f.out, f.d, [](float p, float q) { return p - q; });
}

std::vector<float> input_for(int round) {
  std::vector<float> v(kN);
  for (int i = 0; i < kN; ++i) v[static_cast<size_t>(i)] = static_cast<float>(round * 100 + i) * 0.25f;
  return v;
}

std::vector<float> eager_fork_join(const std::vector<float>& input) {
  auto rt = make_sim(in_order());
  const ForkJoin f = make_fork_join(*rt);
  rt->upload(f.in, 0, input.data(), input.size() * 4);
  issue_fork_join(*rt, f, false);
  rt->synchronize_device(0);
  return read(*rt, f.out);
}

// Captures the fork/join once, then replays it for rounds 0..2 with fresh inputs uploaded in place.
std::vector<std::vector<float>> replay_fork_join(const Schedule& schedule, bool early_fork,
                                                 std::vector<int32_t>* decisions = nullptr) {
  auto rt = make_sim(schedule);
  const ForkJoin f = make_fork_join(*rt);
  rt->begin_capture(f.s);
  issue_fork_join(*rt, f, early_fork);
  const GraphId g = rt->end_capture(f.s);
  EXPECT_EQ(rt->ops_executed(), 0u);  // captured work is not queued
  std::vector<std::vector<float>> outs;
  for (int round = 0; round < 3; ++round) {
    const std::vector<float> input = input_for(round);
    rt->upload(f.in, 0, input.data(), input.size() * 4);
    rt->replay(g, f.s);
    rt->synchronize(f.s);
    outs.push_back(read(*rt, f.out));
  }
  if (decisions) *decisions = rt->decisions();
  return outs;
}

TEST(SimRuntime, GraphCaptureRecordsTheForkJoinEdges) {
  for (bool early_fork : {false, true}) {
    auto rt = make_sim(in_order());
    const ForkJoin f = make_fork_join(*rt);
    rt->begin_capture(f.s);
    issue_fork_join(*rt, f, early_fork);
    const GraphId g = rt->end_capture(f.s);
    const GraphTopology& topo = rt->topology(g);
    ASSERT_EQ(topo.nodes.size(), 6u);  // k1 k3 k2 k5 k4 k6
    EXPECT_EQ(topo.nodes[2].predecessors, (std::vector<int>{early_fork ? 0 : 1}));
    EXPECT_EQ(topo.nodes[4].predecessors, (std::vector<int>{2, 3}));
  }
}

TEST(SimRuntime, GraphReplaysEqualEagerExecutionUnderEverySchedule) {
  std::vector<std::vector<float>> eager;
  for (int round = 0; round < 3; ++round) eager.push_back(eager_fork_join(input_for(round)));
  EXPECT_NE(eager[0], eager[1]);  // the in-place input update matters
  EXPECT_EQ(replay_fork_join(in_order(), false), eager);
  EXPECT_EQ(replay_fork_join(delay_schedule(0, 100), false), eager);
  EXPECT_EQ(replay_fork_join(delay_schedule(1, 100), false), eager);
  for (uint64_t seed = 1; seed <= 100; ++seed) {
    ASSERT_EQ(replay_fork_join(random_schedule(seed), false), eager) << "random seed " << seed;
    ASSERT_EQ(replay_fork_join(pct_schedule(seed, 3), false), eager) << "pct seed " << seed;
  }
}

TEST(SimRuntime, GraphMissingAnEdgeIsWrongUnderSomeRandomSchedule) {
  std::vector<std::vector<float>> eager;
  for (int round = 0; round < 3; ++round) eager.push_back(eager_fork_join(input_for(round)));
  EXPECT_EQ(replay_fork_join(in_order(), true), eager);  // node order happens to be benign
  int wrong_seed = -1;
  for (int seed = 1; seed <= 300 && wrong_seed < 0; ++seed) {
    if (replay_fork_join(random_schedule(static_cast<uint64_t>(seed)), true) != eager) wrong_seed = seed;
  }
  ASSERT_GT(wrong_seed, 0) << "no schedule among 300 ran k2 before k3";
  // Decisions inside replays are node indices, and they replay exactly.
  std::vector<int32_t> decisions;
  const auto wrong = replay_fork_join(random_schedule(static_cast<uint64_t>(wrong_seed)), true, &decisions);
  std::vector<int32_t> again;
  EXPECT_EQ(replay_fork_join(replay_schedule(decisions), true, &again), wrong);
  EXPECT_EQ(again, decisions);
}

// ---- cooperative kernels -------------------------------------------------------------------------

BlockTask count_then_wait(BlockContext& ctx, int* counter, int target, std::vector<int>* finish_order) {
  *counter += 1;
  co_await ctx.wait_until([counter, target] { return *counter >= target; }, "counter >= " + std::to_string(target));
  finish_order->push_back(ctx.block());
}

Launch counting_kernel(const std::string& name, int blocks, int* counter, int target, std::vector<int>* order) {
  Launch l;
  l.op = name;
  l.blocks = blocks;
  l.cooperative = [counter, target, order](BlockContext& ctx) { return count_then_wait(ctx, counter, target, order); };
  return l;
}

TEST(SimRuntime, CooperativeBlocksThatWaitForEachOtherComplete) {
  for (const Schedule& schedule : {in_order(), random_schedule(5), pct_schedule(9, 3), delay_schedule(0, 3)}) {
    auto rt = make_sim(schedule);
    const StreamId s = rt->create_stream(0, "s");
    int counter = 0;
    std::vector<int> order;
    rt->launch(s, counting_kernel("grid_barrier", 4, &counter, 4, &order));
    rt->synchronize(s);
    EXPECT_EQ(counter, 4) << schedule.str();
    EXPECT_EQ(order.size(), 4u) << schedule.str();
  }
}

TEST(SimRuntime, CooperativeBlockChoicesAreRecordedAndReplayed) {
  auto run = [](const Schedule& schedule, std::vector<int32_t>* decisions) {
    auto rt = make_sim(schedule);
    const StreamId s = rt->create_stream(0, "s");
    int counter = 0;
    std::vector<int> order;
    rt->launch(s, counting_kernel("grid_barrier", 6, &counter, 6, &order));
    rt->synchronize(s);
    *decisions = rt->decisions();
    return order;
  };
  std::vector<int32_t> decisions;
  const std::vector<int> order = run(random_schedule(11), &decisions);
  EXPECT_FALSE(decisions.empty());
  std::vector<int32_t> again;
  EXPECT_EQ(run(replay_schedule(decisions), &again), order);
  EXPECT_EQ(again, decisions);
}

TEST(SimRuntime, CooperativeDeadlockIsAHangNamingTheKernelAndEveryWaitingBlock) {
  auto rt = make_sim(random_schedule(1));
  const StreamId s = rt->create_stream(0, "s");
  int counter = 0;
  std::vector<int> order;
  rt->launch(s, counting_kernel("stuck_barrier", 4, &counter, 5, &order));
  const auto start = std::chrono::steady_clock::now();
  try {
    rt->synchronize(s);
    FAIL() << "expected a HangError";
  } catch (const HangError& e) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 1.0);
    EXPECT_EQ(e.kernel(), "stuck_barrier");
    EXPECT_EQ(e.waiting_blocks(), (std::vector<int>{0, 1, 2, 3}));
    const std::string what = e.what();
    EXPECT_NE(what.find("stuck_barrier"), std::string::npos) << what;
    EXPECT_NE(what.find("block 3 waits for 'counter >= 5'"), std::string::npos) << what;
  }
}

BlockTask throwing_block(BlockContext& ctx) {
  if (ctx.block() == 2) throw std::runtime_error("block 2 failed");
  co_return;
}

TEST(SimRuntime, AnExceptionInsideABlockReachesTheHost) {
  auto rt = make_sim(in_order());
  const StreamId s = rt->create_stream(0, "s");
  Launch l{.op = "thrower", .blocks = 4};
  l.cooperative = [](BlockContext& ctx) { return throwing_block(ctx); };
  rt->launch(s, l);
  try {
    rt->synchronize(s);
    FAIL() << "expected the block's exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "block 2 failed");
  }
}

// ---- collectives ---------------------------------------------------------------------------------

struct Ranks {
  std::unique_ptr<SimRuntime> rt;
  std::vector<StreamId> streams;
  int comm = -1;
};

Ranks four_ranks(const Schedule& schedule) {
  Ranks r;
  r.rt = make_sim(schedule, 4);
  for (int d = 0; d < 4; ++d) r.streams.push_back(r.rt->create_stream(d, "rank" + std::to_string(d)));
  r.comm = r.rt->create_communicator(r.streams, "world");
  return r;
}

void run_collectives(const Schedule& schedule) {
  Ranks w = four_ranks(schedule);
  SimRuntime& rt = *w.rt;
  constexpr int kChunk = 4;
  std::vector<BufferId> send, gathered, reduce_in, reduced, p2p;
  for (int d = 0; d < 4; ++d) {
    send.push_back(floats(rt, d, "send", -1.0f, kChunk));
    gathered.push_back(floats(rt, d, "gathered", -1.0f, 4 * kChunk));
    reduce_in.push_back(floats(rt, d, "reduce_in", -1.0f, kChunk));
    reduced.push_back(floats(rt, d, "reduced", -1.0f, kChunk));
    p2p.push_back(floats(rt, d, "p2p", -1.0f, kChunk));
  }
  // Each rank's inputs are written by a kernel on its stream: the collective must run after it.
  for (int d = 0; d < 4; ++d) {
    Launch fill{.op = "fill"};
    float* sp = f32(rt, send[static_cast<size_t>(d)]);
    float* rp = f32(rt, reduce_in[static_cast<size_t>(d)]);
    float* pp = f32(rt, p2p[static_cast<size_t>(d)]);
    fill.host = [sp, rp, pp, d] {
      for (int i = 0; i < kChunk; ++i) {
        sp[i] = static_cast<float>(10 * d + i);
        rp[i] = static_cast<float>(d) + 0.25f * static_cast<float>(i);
        pp[i] = static_cast<float>(100 * d + i);
      }
    };
    rt.launch(w.streams[static_cast<size_t>(d)], fill);
  }
  // Rank 0 issues its part and then a consumer before the other ranks join: the consumer must
  // still see the gathered data.
  rt.all_gather(w.comm, 0, rt.all(send[0]), rt.all(gathered[0]));
  std::vector<float> seen_by_rank0;
  Launch consume{.op = "consume"};
  const float* g0 = f32(rt, gathered[0]);
  consume.host = [g0, &seen_by_rank0] { seen_by_rank0.assign(g0, g0 + 4 * kChunk); };
  rt.launch(w.streams[0], consume);
  for (int d = 1; d < 4; ++d) {
    rt.all_gather(w.comm, d, rt.all(send[static_cast<size_t>(d)]), rt.all(gathered[static_cast<size_t>(d)]));
  }
  for (int d = 0; d < 4; ++d) {
    const auto i = static_cast<size_t>(d);
    rt.all_reduce_sum_f32(w.comm, d, rt.all(reduce_in[i]), rt.all(reduced[i]));
  }
  rt.send(w.comm, 0, 3, rt.all(p2p[0]));
  rt.recv(w.comm, 3, 0, rt.all(p2p[3]));
  rt.recv(w.comm, 1, 2, rt.all(p2p[1]));  // the receiver first this time
  rt.send(w.comm, 2, 1, rt.all(p2p[2]));
  for (int d = 0; d < 4; ++d) rt.barrier(w.comm, d);
  for (int d = 0; d < 4; ++d) rt.synchronize_device(d);

  std::vector<float> want_gather;
  for (int d = 0; d < 4; ++d) {
    for (int i = 0; i < kChunk; ++i) want_gather.push_back(static_cast<float>(10 * d + i));
  }
  std::vector<float> want_reduce;
  for (int i = 0; i < kChunk; ++i) want_reduce.push_back(0.0f + 1.0f + 2.0f + 3.0f + 4 * 0.25f * static_cast<float>(i));
  for (int d = 0; d < 4; ++d) {
    EXPECT_EQ(read(rt, gathered[static_cast<size_t>(d)]), want_gather) << schedule.str() << " rank " << d;
    EXPECT_EQ(read(rt, reduced[static_cast<size_t>(d)]), want_reduce) << schedule.str() << " rank " << d;
  }
  EXPECT_EQ(seen_by_rank0, want_gather) << schedule.str();
  EXPECT_EQ(read(rt, p2p[3]), (std::vector<float>{0, 1, 2, 3})) << schedule.str();
  EXPECT_EQ(read(rt, p2p[1]), (std::vector<float>{200, 201, 202, 203})) << schedule.str();
}

TEST(SimRuntime, CollectivesOnFourDevicesMoveTheRightData) {
  run_collectives(in_order());
  for (int32_t s = 0; s < 4; ++s) run_collectives(delay_schedule(s, 50));
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    run_collectives(random_schedule(seed));
    run_collectives(pct_schedule(seed, 3));
  }
}

TEST(SimRuntime, AllGatherInPlace) {
  Ranks w = four_ranks(random_schedule(4));
  SimRuntime& rt = *w.rt;
  std::vector<BufferId> buf;
  for (int d = 0; d < 4; ++d) {
    buf.push_back(floats(rt, d, "kv", -1.0f, 4));
    const float own = static_cast<float>(d + 1);
    rt.upload(buf.back(), static_cast<uint64_t>(d) * 4, &own, 4);
  }
  for (int d = 0; d < 4; ++d) {
    const BufferId b = buf[static_cast<size_t>(d)];
    rt.all_gather(w.comm, d, rt.range(b, static_cast<uint64_t>(d) * 4, static_cast<uint64_t>(d + 1) * 4), rt.all(b));
  }
  for (int d = 0; d < 4; ++d) rt.synchronize(w.streams[static_cast<size_t>(d)]);
  for (int d = 0; d < 4; ++d) EXPECT_EQ(read(rt, buf[static_cast<size_t>(d)]), (std::vector<float>{1, 2, 3, 4}));
}

TEST(SimRuntime, ARankThatNeverIssuesItsPartIsAHangNamingTheCollective) {
  Ranks w = four_ranks(in_order());
  SimRuntime& rt = *w.rt;
  std::vector<BufferId> send, recv;
  for (int d = 0; d < 4; ++d) {
    send.push_back(floats(rt, d, "send", 1.0f, 4));
    recv.push_back(floats(rt, d, "recv", 0.0f, 16));
  }
  for (int d = 0; d < 3; ++d) {  // rank 3 never joins
    rt.all_gather(w.comm, d, rt.all(send[static_cast<size_t>(d)]), rt.all(recv[static_cast<size_t>(d)]));
  }
  bool after_ran = false;
  Launch after{.op = "after"};
  after.host = [&after_ran] { after_ran = true; };
  rt.launch(w.streams[0], after);
  const auto start = std::chrono::steady_clock::now();
  try {
    rt.synchronize(w.streams[0]);
    FAIL() << "expected a HangError";
  } catch (const HangError& e) {
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
    EXPECT_EQ(e.kernel(), "all_gather");
    const std::string what = e.what();
    EXPECT_NE(what.find("communicator 'world'"), std::string::npos) << what;
    EXPECT_NE(what.find("rank(s) 3 never issued their part"), std::string::npos) << what;
  }
  EXPECT_FALSE(after_ran);
  EXPECT_THROW(rt.synchronize_device(1), HangError);
}

TEST(SimRuntime, AnUnmatchedSendIsAHangNamingThePeer) {
  Ranks w = four_ranks(in_order());
  SimRuntime& rt = *w.rt;
  const BufferId b = floats(rt, 1, "payload", 1.0f, 4);
  rt.send(w.comm, 1, 2, rt.all(b));
  try {
    rt.synchronize(w.streams[1]);
    FAIL() << "expected a HangError";
  } catch (const HangError& e) {
    EXPECT_EQ(e.kernel(), "send");
    EXPECT_NE(std::string(e.what()).find("peer rank 2 never issued the matching recv"), std::string::npos) << e.what();
  }
}

TEST(SimRuntime, MismatchedAllGatherSizesAreRefused) {
  Ranks w = four_ranks(in_order());
  SimRuntime& rt = *w.rt;
  std::vector<BufferId> send, recv;
  for (int d = 0; d < 4; ++d) {
    send.push_back(floats(rt, d, "send", 1.0f, 4));
    recv.push_back(floats(rt, d, "recv", 0.0f, d == 3 ? 8 : 16));
  }
  for (size_t d = 0; d < 3; ++d) rt.all_gather(w.comm, static_cast<int>(d), rt.all(send[d]), rt.all(recv[d]));
  EXPECT_THROW(rt.all_gather(w.comm, 3, rt.all(send[3]), rt.all(recv[3])), ContractError);
}

TEST(SimRuntime, RanksSharingAStreamAreRefusedAndOthersStillWork) {
  auto rt = make_sim(random_schedule(2));
  const StreamId s = rt->create_stream(0, "shared");
  const StreamId other = rt->create_stream(0, "other");
  EXPECT_THROW(rt->create_communicator({s, s, other}, "bad"), ContractError);
  const int good = rt->create_communicator({s, other}, "good");
  Launch noop{.op = "noop"};
  noop.host = [] {};
  rt->launch(s, noop);
  rt->barrier(good, 0);
  rt->barrier(good, 1);
  rt->synchronize_device(0);
  EXPECT_EQ(rt->ops_executed(), 2u);  // noop and the barrier
}

// ---- Schedule::parse ---------------------------------------------------------------------------

TEST(SimSchedule, ParsesTheFourSpellings) {
  EXPECT_EQ(Schedule::parse("in-order").kind, Schedule::Kind::in_order);
  const Schedule r = Schedule::parse("random:42");
  EXPECT_EQ(r.kind, Schedule::Kind::random);
  EXPECT_EQ(r.seed, 42u);
  const Schedule p = Schedule::parse("pct:18446744073709551615:3");
  EXPECT_EQ(p.kind, Schedule::Kind::pct);
  EXPECT_EQ(p.seed, 18446744073709551615ull);
  EXPECT_EQ(p.pct_depth, 3);
  const Schedule d = Schedule::parse("delay:2:10");
  EXPECT_EQ(d.kind, Schedule::Kind::delay);
  EXPECT_EQ(d.delay_stream, 2);
  EXPECT_EQ(d.delay_ops, 10);
  for (const char* text : {"in-order", "random:7", "pct:7:2", "delay:1:0"}) {
    EXPECT_EQ(Schedule::parse(text).str(), text);
  }
}

TEST(SimSchedule, RejectsBadSpellingsNamingTheFlag) {
  for (const char* text : {"", "inorder", "in-order:1", "random", "random:", "random:-1", "random:0x10", "random:1:2",
                           "random:18446744073709551616", "pct:1", "pct:1:0", "pct:1:65", "pct:a:2", "delay:1",
                           "delay:-1:2", "delay:1:x", "delay:1:2:3", "replay", "RANDOM:1", "random: 1"}) {
    try {
      Schedule::parse(text, "--sched");
      ADD_FAILURE() << "accepted '" << text << "'";
    } catch (const InputError& e) {
      EXPECT_EQ(e.source(), "--sched") << text;
      EXPECT_EQ(e.field(), "schedule") << text;
      EXPECT_NE(std::string(e.what()).find("--sched"), std::string::npos) << text;
    }
  }
}

}  // namespace
}  // namespace dsv4::rt
