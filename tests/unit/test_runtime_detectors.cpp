// Programs on the sim backend judged by the runtime's detectors: a missing event wait is flagged on
// every schedule (even those where the result happened to be right), a graph missing an edge is
// flagged at capture, a strided view is refused by the launch contract, and buffer reuse through the
// caching allocator is seen.
#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/runtime/hazard_detector.h"
#include "engine/runtime/sim_runtime.h"

namespace dsv4::rt {
namespace {

constexpr uint64_t kFloats = 64;

float* floats(Runtime& rt, BufferId b) { return static_cast<float*>(rt.data(b)); }

Launch fill(Runtime& rt, BufferId b, float value, const char* op) {
  Launch l;
  l.op = op;
  l.accesses = {Access{rt.all(b), AccessKind::write}};
  float* p = floats(rt, b);
  l.host = [p, value] { std::fill(p, p + kFloats, value); };
  return l;
}

Launch add_one(Runtime& rt, BufferId in, BufferId out, const char* op) {
  Launch l;
  l.op = op;
  l.accesses = {Access{rt.all(in), AccessKind::read}, Access{rt.all(out), AccessKind::write}};
  const float* a = floats(rt, in);
  float* b = floats(rt, out);
  l.host = [a, b] {
    for (uint64_t i = 0; i < kFloats; ++i) b[i] = a[i] + 1.0f;
  };
  return l;
}

struct Result {
  float value;
  std::vector<Hazard> hazards;
};

// Producer on `producer`, consumer on `consumer`; with `synchronized` the consumer waits on an event
// recorded after the producer.
Result producer_consumer(const Schedule& schedule, bool synchronized) {
  SimRuntime rt(RuntimeOptions{}, SimOptions{schedule});
  HazardDetector detector;
  rt.add_observer(&detector);
  const StreamId producer = rt.create_stream(0, "producer");
  const StreamId consumer = rt.create_stream(0, "consumer");
  const BufferId x = rt.alloc(0, kFloats * 4, "x");
  const BufferId y = rt.alloc(0, kFloats * 4, "y");
  const EventId ready = rt.create_event("x_ready");
  rt.launch(producer, fill(rt, x, 0.0f, "zero_x"));
  rt.synchronize(producer);
  rt.launch(producer, fill(rt, x, 41.0f, "write_x"));
  rt.record(ready, producer);
  if (synchronized) rt.wait(consumer, ready);
  rt.launch(consumer, add_one(rt, x, y, "read_x"));
  rt.synchronize_device(0);
  float out = 0;
  rt.download(y, 0, &out, sizeof out);
  return {out, detector.hazards()};
}

std::vector<Schedule> schedules() {
  std::vector<Schedule> out = {Schedule::parse("in-order"), Schedule::parse("delay:0:4"), Schedule::parse("delay:1:4")};
  for (uint64_t seed = 1; seed <= 20; ++seed) out.push_back(Schedule::parse("random:" + std::to_string(seed)));
  for (uint64_t seed = 1; seed <= 5; ++seed) out.push_back(Schedule::parse("pct:" + std::to_string(seed) + ":2"));
  return out;
}

TEST(RuntimeDetectors, MissingWaitIsFlaggedOnEverySchedule) {
  int wrong = 0;
  for (const Schedule& s : schedules()) {
    const Result r = producer_consumer(s, /*synchronized=*/false);
    ASSERT_EQ(r.hazards.size(), 1u) << s.str();
    const Hazard& h = r.hazards[0];
    EXPECT_EQ(h.kind, Hazard::raw) << s.str();
    EXPECT_EQ(h.buffer, "x");
    EXPECT_EQ(h.first_op, "write_x");
    EXPECT_EQ(h.second_op, "read_x");
    EXPECT_EQ(h.first_stream, "producer");
    EXPECT_EQ(h.second_stream, "consumer");
    wrong += r.value != 42.0f;
  }
  // Some schedules hid the race (the result was right) and the detector flagged it anyway; the
  // delayed producer exposes it.
  EXPECT_GT(wrong, 0);
  EXPECT_NE(producer_consumer(Schedule::parse("delay:0:4"), false).value, 42.0f);
  EXPECT_EQ(producer_consumer(Schedule::parse("in-order"), false).value, 42.0f);
}

TEST(RuntimeDetectors, SynchronizedProgramIsSilentAndRightOnEverySchedule) {
  for (const Schedule& s : schedules()) {
    const Result r = producer_consumer(s, /*synchronized=*/true);
    EXPECT_TRUE(r.hazards.empty()) << s.str() << ": " << r.hazards.front().describe();
    EXPECT_EQ(r.value, 42.0f) << s.str();
  }
}

TEST(RuntimeDetectors, GraphMissingAnEdgeIsFlaggedAtCapture) {
  for (bool joined : {true, false}) {
    SimRuntime rt(RuntimeOptions{}, SimOptions{});
    HazardDetector detector;
    rt.add_observer(&detector);
    const StreamId main = rt.create_stream(0, "main");
    const StreamId alt = rt.create_stream(0, "alt");
    const BufferId meta = rt.alloc(0, kFloats * 4, "metadata");
    const BufferId out = rt.alloc(0, kFloats * 4, "out");
    const EventId fork = rt.create_event("fork");
    const EventId built = rt.create_event("metadata_built");
    rt.begin_capture(main);
    rt.record(fork, main);
    rt.wait(alt, fork);  // alt joins the capture, forked before the metadata is written
    rt.launch(main, fill(rt, meta, 3.0f, "build_metadata"));
    if (joined) {
      rt.record(built, main);
      rt.wait(alt, built);
    }
    rt.launch(alt, add_one(rt, meta, out, "use_metadata"));
    const EventId join = rt.create_event("join");
    rt.record(join, alt);
    rt.wait(main, join);
    const GraphId g = rt.end_capture(main);
    if (joined) {
      EXPECT_TRUE(detector.hazards().empty());
    } else {
      ASSERT_EQ(detector.hazards().size(), 1u);
      EXPECT_TRUE(detector.hazards()[0].in_graph);
      EXPECT_EQ(detector.hazards()[0].buffer, "metadata");
    }
    rt.replay(g, main);
    rt.synchronize(main);
    float v = 0;
    rt.download(out, 0, &v, sizeof v);
    if (joined) {
      EXPECT_EQ(v, 4.0f);
    }
  }
}

TEST(RuntimeDetectors, StridedViewIsRefusedByTheLaunchContract) {
  SimRuntime rt(RuntimeOptions{}, SimOptions{});
  HazardDetector detector;
  rt.add_observer(&detector);
  const StreamId s = rt.create_stream(0, "main");
  const BufferId b = rt.alloc(0, kFloats * 4, "kv");
  static const Contract contract = Contract("fused_norm_rope").arg("kv").dtype(DType::f32).rank(2).contiguous();
  const Tensor qkv = Tensor::empty({4, 24}, DType::f32, "qkv_a");
  const Tensor kv = qkv.narrow(1, 8, 16);  // a last-dim slice of a wider row: not contiguous
  Launch l = fill(rt, b, 1.0f, "fused_norm_rope");
  l.check_contract = [&] { contract.check({{"kv", &kv}}); };
  try {
    rt.launch(s, l);
    FAIL() << "the strided view was accepted";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.op(), "fused_norm_rope");
    EXPECT_EQ(e.argument(), "kv");
  }
  const Tensor dense = kv.contiguous();
  l.check_contract = [&] { contract.check({{"kv", &dense}}); };
  EXPECT_NO_THROW(rt.launch(s, l));
  rt.synchronize(s);
}

// qkv_a is freed on the main stream while the kv stream may still read it; the caching allocator
// hands the same memory to the next allocation of that size (the multi-stream hazard of
// dsv4-model §6, "allocator reuse without record_stream").
std::vector<Hazard> freed_while_read(bool caching) {
  RuntimeOptions options;
  options.caching_allocator = caching;
  SimRuntime rt(options, SimOptions{});
  HazardDetector detector;
  rt.add_observer(&detector);
  const StreamId main = rt.create_stream(0, "main");
  const StreamId kv_stream = rt.create_stream(0, "kv");
  const BufferId qkv = rt.alloc(0, kFloats * 4, "qkv_a");
  const BufferId kv = rt.alloc(0, kFloats * 4, "kv");
  const EventId ready = rt.create_event("qkv_a_ready");
  rt.launch(main, fill(rt, qkv, 1.0f, "wqkv_a"));
  rt.record(ready, main);
  rt.wait(kv_stream, ready);
  rt.launch(kv_stream, add_one(rt, qkv, kv, "fused_norm_rope"));
  rt.free(qkv);  // no record_stream: the kv stream has not been waited for
  const BufferId q = rt.alloc(0, kFloats * 4, "q_lora");
  rt.launch(main, fill(rt, q, 7.0f, "wq_b"));
  rt.synchronize_device(0);
  return detector.hazards();
}

TEST(RuntimeDetectors, ReuseOfAFreedBufferIsSeenThroughTheCachingAllocator) {
  const std::vector<Hazard> cached = freed_while_read(true);
  ASSERT_EQ(cached.size(), 1u);
  EXPECT_EQ(cached[0].kind, Hazard::war);
  EXPECT_EQ(cached[0].first_op, "fused_norm_rope");
  EXPECT_EQ(cached[0].second_op, "wq_b");
  // Without the cache the memory is not reused, so there is nothing to race on.
  EXPECT_TRUE(freed_while_read(false).empty());
}

TEST(RuntimeDetectors, HostUploadWhileAStreamReadsIsFlagged) {
  SimRuntime rt(RuntimeOptions{}, SimOptions{});
  HazardDetector detector;
  rt.add_observer(&detector);
  const StreamId s = rt.create_stream(0, "main");
  const BufferId lens = rt.alloc(0, kFloats * 4, "seq_lens");
  const BufferId out = rt.alloc(0, kFloats * 4, "out");
  rt.launch(s, add_one(rt, lens, out, "build_plan"));
  const std::vector<float> next(kFloats, 2.0f);
  rt.upload(lens, 0, next.data(), kFloats * 4);  // the next batch's values, before the plan ran
  ASSERT_EQ(detector.hazards().size(), 1u);
  EXPECT_EQ(detector.hazards()[0].second_stream, "host");
  rt.synchronize(s);
  detector.clear();
  rt.upload(lens, 0, next.data(), kFloats * 4);  // after a synchronize: ordered
  EXPECT_TRUE(detector.hazards().empty());
}

TEST(RuntimeDetectors, ReplaysOfOneGraphOnTwoStreamsAreOrdered) {
  // cudaGraphLaunch orders a launch of an executable graph after its previous launches, whatever
  // the stream: the sim backend must too, and the detector must not call it a race.
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    SimRuntime rt(RuntimeOptions{}, SimOptions{Schedule::parse("random:" + std::to_string(seed))});
    HazardDetector detector;
    rt.add_observer(&detector);
    const StreamId s1 = rt.create_stream(0, "s1");
    const StreamId s2 = rt.create_stream(0, "s2");
    const BufferId x = rt.alloc(0, kFloats * 4, "x");
    rt.launch(s1, fill(rt, x, 0.0f, "zero"));
    rt.synchronize(s1);
    rt.begin_capture(s1);
    rt.launch(s1, add_one(rt, x, x, "increment"));
    const GraphId g = rt.end_capture(s1);
    rt.launch(s2, fill(rt, rt.alloc(0, 16 * 4, "unrelated"), 1.0f, "busy"));  // s2 has work of its own
    rt.replay(g, s1);
    rt.replay(g, s2);
    rt.replay(g, s1);
    rt.synchronize_device(0);
    float v = 0;
    rt.download(x, 0, &v, sizeof v);
    EXPECT_EQ(v, 3.0f) << "seed " << seed;
    EXPECT_TRUE(detector.hazards().empty()) << detector.hazards().front().describe();
  }
}

TEST(RuntimeDetectors, TestingAllocatorPoisonsBuffersAndNamesGuardDamage) {
  RuntimeOptions options;
  options.allocator_mode = AllocatorMode::testing;
  options.caching_allocator = false;  // as under sanitizers
  SimRuntime rt(options, SimOptions{});
  const StreamId s = rt.create_stream(0, "main");
  const BufferId state = rt.alloc(0, kFloats * 4, "layers.2.attn.compress_state", DType::f32);
  float first = 0;
  rt.download(state, 0, &first, sizeof first);
  EXPECT_TRUE(std::isnan(first)) << "fresh memory is poisoned";
  // A kernel that writes one float past its declared range (a page size of 0 sends writes there).
  Launch l = fill(rt, state, 1.0f, "write_state_rows");
  float* p = floats(rt, state);
  l.host = [p] { std::fill(p, p + kFloats + 1, 1.0f); };
  rt.launch(s, l);
  rt.synchronize(s);
  const auto damage = rt.check_guards();
  ASSERT_EQ(damage.size(), 1u);
  EXPECT_EQ(damage[0].owner, "layers.2.attn.compress_state");
  EXPECT_NE(damage[0].describe().find("after the end"), std::string::npos);
}

TEST(RuntimeDetectors, CachedBufferIsPoisonedAgainForItsNextOwner) {
  RuntimeOptions options;
  options.allocator_mode = AllocatorMode::testing;
  SimRuntime rt(options, SimOptions{});
  const StreamId s = rt.create_stream(0, "main");
  const BufferId a = rt.alloc(0, kFloats * 4, "qkv_a", DType::f32);
  rt.launch(s, fill(rt, a, 5.0f, "wqkv_a"));
  rt.synchronize(s);
  rt.free(a);
  const BufferId b = rt.alloc(0, kFloats * 4, "q_lora", DType::f32);
  EXPECT_EQ(b, a) << "the cache hands the same memory back";
  float v = 0;
  rt.download(b, 0, &v, sizeof v);
  EXPECT_TRUE(std::isnan(v)) << "the old owner's 5.0 must not show through";
}

TEST(RuntimeDetectors, CommunicatorsSpanningProcessesAreRefusedOnSim) {
  SimRuntime rt(RuntimeOptions{}, SimOptions{});
  const StreamId s = rt.create_stream(0, "rank0");
  EXPECT_THROW(rt.join_communicator(s, 0, 2, "/tmp/dsv4_never", "pp"), ContractError);
}

}  // namespace
}  // namespace dsv4::rt
