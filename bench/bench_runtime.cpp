// The sim backend's own overhead per launch: an empty host kernel issued and run through the
// scheduler, on one stream and on two streams linked by record/wait. The host synchronizes every
// kBatch launches, as an engine step would. Targets: under 2 us per launch, under 10 us with the
// hazard detector registered (each launch then declares a read and a write range).
#include <benchmark/benchmark.h>

#include "engine/runtime/hazard_detector.h"
#include "engine/runtime/sim_runtime.h"

namespace {

using dsv4::rt::EventId;
using dsv4::rt::Launch;
using dsv4::rt::RuntimeOptions;
using dsv4::rt::Schedule;
using dsv4::rt::SimOptions;
using dsv4::rt::SimRuntime;
using dsv4::rt::StreamId;

constexpr int kBatch = 256;  // launches between host synchronizations

SimOptions options_for(int64_t strategy) {
  SimOptions o;
  if (strategy == 1) o.schedule = Schedule::parse("random:1");
  if (strategy == 2) o.schedule = Schedule::parse("pct:1:3");
  return o;
}

Launch empty_kernel() {
  Launch l;
  l.op = "empty";
  l.host = [] {};
  return l;
}

// Arg: 0 in-order, 1 random, 2 pct.
void BM_SimLaunchOneStream(benchmark::State& state) {
  SimRuntime rt(RuntimeOptions{}, options_for(state.range(0)));
  const StreamId s = rt.create_stream(0, "s");
  const Launch empty = empty_kernel();
  int pending = 0;
  for (auto _ : state) {
    rt.launch(s, empty);
    if (++pending == kBatch) {
      rt.synchronize(s);
      pending = 0;
    }
  }
  rt.synchronize(s);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SimLaunchOneStream)->Arg(0)->Arg(1)->Arg(2);

// Per iteration: a launch on A, record on A, wait on B, a launch on B (two launches).
void BM_SimLaunchTwoStreamsRecordWait(benchmark::State& state) {
  SimRuntime rt(RuntimeOptions{}, options_for(state.range(0)));
  const StreamId a = rt.create_stream(0, "A");
  const StreamId b = rt.create_stream(0, "B");
  const EventId e = rt.create_event("a_done");
  const Launch empty = empty_kernel();
  int pending = 0;
  for (auto _ : state) {
    rt.launch(a, empty);
    rt.record(e, a);
    rt.wait(b, e);
    rt.launch(b, empty);
    pending += 2;
    if (pending >= kBatch) {
      rt.synchronize(b);
      pending = 0;
    }
  }
  rt.synchronize_device(0);
  state.SetItemsProcessed(2 * state.iterations());
}
BENCHMARK(BM_SimLaunchTwoStreamsRecordWait)->Arg(0)->Arg(1)->Arg(2);

// Per iteration the same two-stream program with declared accesses (A writes x, B reads x and
// writes y), with the hazard detector registered or not (arg).
void BM_SimLaunchWithDetector(benchmark::State& state) {
  SimRuntime rt(RuntimeOptions{}, options_for(0));
  dsv4::rt::HazardDetector detector;
  if (state.range(0) != 0) rt.add_observer(&detector);
  const StreamId a = rt.create_stream(0, "A");
  const StreamId b = rt.create_stream(0, "B");
  const EventId e = rt.create_event("x_ready");
  const auto x = rt.alloc(0, 4096, "x");
  const auto y = rt.alloc(0, 4096, "y");
  Launch produce = empty_kernel();
  produce.accesses = {{rt.all(x), dsv4::rt::AccessKind::write}};
  Launch consume = empty_kernel();
  consume.accesses = {{rt.all(x), dsv4::rt::AccessKind::read}, {rt.all(y), dsv4::rt::AccessKind::write}};
  int pending = 0;
  for (auto _ : state) {
    rt.launch(a, produce);
    rt.record(e, a);
    rt.wait(b, e);
    rt.launch(b, consume);
    rt.record(e, b);
    rt.wait(a, e);
    pending += 2;
    if (pending >= kBatch) {
      rt.synchronize_device(0);
      pending = 0;
    }
  }
  rt.synchronize_device(0);
  state.SetItemsProcessed(2 * state.iterations());
  state.counters["hazards"] = static_cast<double>(detector.hazards().size());
}
BENCHMARK(BM_SimLaunchWithDetector)->Arg(0)->Arg(1)->ArgNames({"detector"});

}  // namespace
