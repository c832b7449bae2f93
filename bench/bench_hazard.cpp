// The hazard detector's cost per observed call: it sits on every launch when enabled, so it must
// stay small next to a kernel launch (a few microseconds on `cuda`).
// Run: build/bench/bench_hazard
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "engine/runtime/hazard_detector.h"

namespace dsv4::rt {
namespace {

constexpr uint64_t kBufferBytes = 1 << 20;

void announce(HazardDetector& det, int streams, int buffers) {
  for (int s = 0; s < streams; ++s) det.on_stream_created(StreamId{s}, 0, "s" + std::to_string(s));
  for (int b = 0; b < buffers; ++b) det.on_buffer_created(BufferId{b}, 0, "b" + std::to_string(b), kBufferBytes);
}

// Launches touching `accesses` random sixteenths of random buffers, the last one written.
std::vector<Launch> random_launches(int buffers, int accesses, size_t count) {
  std::mt19937_64 rng(7);
  std::vector<Launch> out(count);
  for (size_t i = 0; i < count; ++i) {
    out[i].op = "kernel_" + std::to_string(i);
    for (int k = 0; k < accesses; ++k) {
      const auto b = static_cast<int32_t>(rng() % static_cast<uint64_t>(buffers));
      const uint64_t slice = (rng() % 16) * (kBufferBytes / 16);
      out[i].accesses.push_back(Access{ByteRange{BufferId{b}, slice, slice + kBufferBytes / 16},
                                       k == accesses - 1 ? AccessKind::write : AccessKind::read});
    }
  }
  return out;
}

// A legal multi-stream pipeline: each launch is followed by a record and a wait handing over to the
// next stream; the host synchronizes every 256 launches, as a decode loop does per step.
void BM_LaunchForkJoin(benchmark::State& state) {
  const int streams = static_cast<int>(state.range(0));
  const int accesses = static_cast<int>(state.range(1));
  HazardDetector det;
  announce(det, streams, 64);
  const std::vector<Launch> launches = random_launches(64, accesses, 256);
  uint64_t i = 0;
  for (auto _ : state) {
    const int s = static_cast<int>(i % static_cast<uint64_t>(streams));
    det.on_launch(StreamId{s}, i, launches[i % launches.size()], false);
    det.on_event_record(EventId{s}, StreamId{s});
    det.on_stream_wait(StreamId{(s + 1) % streams}, EventId{s});
    if (i % 256 == 255) det.on_host_sync_device(0);
    ++i;
  }
  if (!det.hazards().empty()) state.SkipWithError("a legal program was flagged");
  state.counters["history_entries"] = static_cast<double>(det.history_entries());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LaunchForkJoin)->Args({1, 3})->Args({4, 3})->Args({8, 3})->Args({4, 8});

// Launches on one stream writing ever new 64-byte records of one big buffer with no host sync in
// between: the history of that buffer grows to `range(0)` live entries, which each access searches.
void BM_LaunchLargeHistory(benchmark::State& state) {
  const auto live = static_cast<uint64_t>(state.range(0));
  HazardDetector det;
  announce(det, 2, 1);
  Launch l;
  l.op = "append";
  l.accesses.resize(1);
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t at_bytes = (i % live) * 64;
    l.accesses[0] = Access{ByteRange{BufferId{0}, at_bytes, at_bytes + 64}, AccessKind::write};
    det.on_launch(StreamId{0}, i, l, false);
    ++i;
  }
  state.counters["history_entries"] = static_cast<double>(det.history_entries());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LaunchLargeHistory)->Arg(64)->Arg(4096);

// Replaying a captured decode step: `range(0)` nodes in two branches that join at the end.
void BM_GraphReplay(benchmark::State& state) {
  const auto nodes = static_cast<int>(state.range(0));
  HazardDetector det;
  announce(det, 2, 64);
  const std::vector<Launch> launches = random_launches(64, 3, static_cast<size_t>(nodes));
  GraphTopology g;
  for (int n = 0; n < nodes; ++n) {
    GraphNode node;
    node.launch = launches[static_cast<size_t>(n)];
    node.launch.accesses.back().kind = AccessKind::read;  // keep the branches race-free
    node.captured_on = StreamId{n % 2};
    if (n >= 2) node.predecessors.push_back(n - 2);
    g.nodes.push_back(std::move(node));
  }
  for (auto _ : state) {
    det.on_graph_replay(GraphId{0}, StreamId{0}, g);
    det.on_host_sync_stream(StreamId{0});
  }
  state.SetItemsProcessed(state.iterations() * nodes);  // items: replayed nodes
}
BENCHMARK(BM_GraphReplay)->Arg(64)->Arg(1024);

// The capture-end check of a graph on its own (pairwise within each buffer).
void BM_CaptureEndCheck(benchmark::State& state) {
  const auto nodes = static_cast<int>(state.range(0));
  HazardDetector det;
  announce(det, 2, 64);
  const std::vector<Launch> launches = random_launches(64, 3, static_cast<size_t>(nodes));
  GraphTopology g;
  for (int n = 0; n < nodes; ++n) {
    GraphNode node;
    node.launch = launches[static_cast<size_t>(n)];
    node.captured_on = StreamId{0};
    if (n >= 1) node.predecessors.push_back(n - 1);  // one chain: every pair ordered
    g.nodes.push_back(std::move(node));
  }
  for (auto _ : state) det.on_capture_end(StreamId{0}, GraphId{0}, g);
  state.SetItemsProcessed(state.iterations() * nodes);
}
BENCHMARK(BM_CaptureEndCheck)->Arg(256)->Arg(2048);

}  // namespace
}  // namespace dsv4::rt
