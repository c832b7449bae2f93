// The hazard detector driven directly by observer calls, in host issue order, with no backend.
#include <algorithm>
#include <bitset>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "engine/runtime/hazard_detector.h"

namespace dsv4::rt {
namespace {

Access rd(BufferId buffer, uint64_t begin, uint64_t end) { return Access{ByteRange{buffer, begin, end}, AccessKind::read}; }
Access wr(BufferId buffer, uint64_t begin, uint64_t end) { return Access{ByteRange{buffer, begin, end}, AccessKind::write}; }

GraphNode node(const std::string& op, StreamId on, std::vector<Access> accesses, std::vector<int> predecessors = {}) {
  GraphNode n;
  n.launch.op = op;
  n.launch.accesses = std::move(accesses);
  n.captured_on = on;
  n.predecessors = std::move(predecessors);
  return n;
}

// Issues observer calls the way a runtime would, numbering launches.
class Program {
 public:
  explicit Program(HazardDetectorOptions options = {}) : det(options) {}

  StreamId stream(const std::string& name, int device = 0) {
    StreamId s{streams_++};
    det.on_stream_created(s, device, name);
    return s;
  }
  BufferId buffer(const std::string& name, uint64_t bytes = 1024) {
    BufferId b{buffers_++};
    det.on_buffer_created(b, 0, name, bytes);
    return b;
  }
  EventId event() { return EventId{events_++}; }
  uint64_t launch(StreamId s, const std::string& op, std::vector<Access> accesses, bool capturing = false) {
    Launch l;
    l.op = op;
    l.accesses = std::move(accesses);
    const uint64_t seq = seq_++;
    det.on_launch(s, seq, l, capturing);
    return seq;
  }
  void record(EventId e, StreamId s) { det.on_event_record(e, s); }
  void wait(StreamId s, EventId e) { det.on_stream_wait(s, e); }
  // The fork/join idiom: `to` waits for everything issued on `from` so far.
  void order(StreamId from, StreamId to) {
    EventId e = event();
    record(e, from);
    wait(to, e);
  }

  HazardDetector det;

 private:
  int32_t streams_ = 0;
  int32_t buffers_ = 0;
  int32_t events_ = 0;
  uint64_t seq_ = 100;  // launch_seq values distinct from node indices and ordinals
};

// ---- two streams ---------------------------------------------------------------------------------

TEST(HazardDetector, ProducerConsumerWithRecordAndWaitIsSilent) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "produce", {wr(x, 0, 256)});
  EventId e = p.event();
  p.record(e, main);
  p.wait(alt, e);
  p.launch(alt, "consume", {rd(x, 0, 256)});
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, ProducerConsumerWithoutWaitIsOneRawNamingBothSides) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  const uint64_t produce = p.launch(main, "produce", {wr(x, 0, 256)});
  EventId e = p.event();
  p.record(e, main);  // recorded but never waited on
  const uint64_t consume = p.launch(alt, "consume", {rd(x, 128, 512)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_EQ(h.kind, Hazard::raw);
  EXPECT_EQ(h.buffer, "x");
  EXPECT_EQ(h.begin_bytes, 128u);
  EXPECT_EQ(h.end_bytes, 256u);
  EXPECT_EQ(h.first_op, "produce");
  EXPECT_EQ(h.second_op, "consume");
  EXPECT_EQ(h.first_seq, produce);
  EXPECT_EQ(h.second_seq, consume);
  EXPECT_EQ(h.first_stream, "main");
  EXPECT_EQ(h.second_stream, "alt");
  EXPECT_FALSE(h.in_graph);
  const std::string text = h.describe();
  EXPECT_NE(text.find("RAW"), std::string::npos) << text;
  EXPECT_NE(text.find("'produce'"), std::string::npos) << text;
  EXPECT_NE(text.find("'alt'"), std::string::npos) << text;
  EXPECT_NE(text.find("[128, 256)"), std::string::npos) << text;
}

TEST(HazardDetector, WaitBeforeTheRecordDoesNotOrderLaterWork) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  EventId e = p.event();
  p.record(e, main);
  p.wait(alt, e);
  p.launch(main, "produce", {wr(x, 0, 64)});  // after the record: the wait does not cover it
  p.launch(alt, "consume", {rd(x, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::raw);
}

TEST(HazardDetector, WaitOnANeverRecordedEventIsANoOp) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "produce", {wr(x, 0, 64)});
  p.wait(alt, p.event());
  p.launch(alt, "consume", {rd(x, 0, 64)});
  EXPECT_EQ(p.det.hazards().size(), 1u);
}

TEST(HazardDetector, WarWithoutWait) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "reader", {rd(x, 0, 64)});
  p.launch(alt, "writer", {wr(x, 32, 96)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_EQ(h.kind, Hazard::war);
  EXPECT_EQ(h.first_op, "reader");
  EXPECT_EQ(h.second_op, "writer");
  EXPECT_EQ(h.begin_bytes, 32u);
  EXPECT_EQ(h.end_bytes, 64u);
}

TEST(HazardDetector, WawWithoutWait) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "w1", {wr(x, 0, 64)});
  p.launch(alt, "w2", {wr(x, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::waw);
}

TEST(HazardDetector, ReadsNeverConflict) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "r1", {rd(x, 0, 64)});
  p.launch(alt, "r2", {rd(x, 0, 64)});
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, DisjointRangesOfOneBufferAreSilent) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  BufferId y = p.buffer("y");
  p.launch(main, "left", {wr(x, 0, 64), wr(y, 0, 8)});
  p.launch(alt, "right", {wr(x, 64, 128), rd(y, 8, 16)});  // [0,64) and [64,128) touch, do not overlap
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, StreamOrderAloneOrdersOneStream) {
  Program p;
  StreamId main = p.stream("main");
  BufferId x = p.buffer("x");
  p.launch(main, "a", {wr(x, 0, 64)});
  p.launch(main, "b", {rd(x, 0, 64), wr(x, 0, 64)});
  p.launch(main, "c", {wr(x, 0, 64)});
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, OrderingIsTransitiveThroughAThirdStream) {
  Program p;
  StreamId a = p.stream("a"), b = p.stream("b"), c = p.stream("c");
  BufferId x = p.buffer("x");
  p.launch(a, "produce", {wr(x, 0, 64)});
  p.order(a, b);
  p.launch(b, "middle", {});
  p.order(b, c);
  p.launch(c, "consume", {rd(x, 0, 64)});
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, EachPairIsReportedOncePerBuffer) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x"), y = p.buffer("y");
  p.launch(main, "produce", {wr(x, 0, 64), wr(y, 0, 64)});
  p.launch(alt, "consume", {rd(x, 0, 16), rd(x, 32, 48), rd(y, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 2u);
  EXPECT_EQ(p.det.hazards()[0].buffer, "x");
  EXPECT_EQ(p.det.hazards()[0].end_bytes, 16u);  // the first overlap found
  EXPECT_EQ(p.det.hazards()[1].buffer, "y");
}

TEST(HazardDetector, StopsRecordingAtTheCapAndCountsTheRest) {
  Program p(HazardDetectorOptions{.hazards_max = 3});
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  for (int i = 0; i < 10; ++i) {
    p.launch(main, "w", {wr(x, 0, 64)});
    p.launch(alt, "r", {rd(x, 0, 64)});
  }
  EXPECT_EQ(p.det.hazards().size(), 3u);
  EXPECT_GE(p.det.hazards_dropped(), 7u);
  p.det.clear();
  EXPECT_TRUE(p.det.hazards().empty());
  EXPECT_EQ(p.det.hazards_dropped(), 0u);
  p.launch(main, "w", {wr(x, 0, 64)});
  EXPECT_EQ(p.det.hazards().size(), 1u);  // the alt reads still race with a fresh write
}

// ---- host ----------------------------------------------------------------------------------------

TEST(HazardDetector, HostSyncOfTheProducerOrdersTheConsumer) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "produce", {wr(x, 0, 64)});
  p.det.on_host_sync_stream(main);
  p.launch(alt, "consume", {rd(x, 0, 64)});
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, HostSyncOfTheWrongStreamDoesNotOrder) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "produce", {wr(x, 0, 64)});
  p.det.on_host_sync_stream(alt);
  p.launch(alt, "consume", {rd(x, 0, 64)});
  EXPECT_EQ(p.det.hazards().size(), 1u);
}

TEST(HazardDetector, HostSyncOnAnEventOrdersWhatItCaptured) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x"), y = p.buffer("y");
  p.launch(main, "produce_x", {wr(x, 0, 64)});
  EventId e = p.event();
  p.record(e, main);
  p.launch(main, "produce_y", {wr(y, 0, 64)});
  p.det.on_host_sync_event(e);
  p.launch(alt, "consume", {rd(x, 0, 64), rd(y, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].buffer, "y");
}

TEST(HazardDetector, HostSyncOfADeviceOrdersOnlyThatDevicesStreams) {
  Program p;
  StreamId d0 = p.stream("d0", 0), d1 = p.stream("d1", 1), other = p.stream("other", 1);
  BufferId x = p.buffer("x"), y = p.buffer("y");
  p.launch(d0, "produce_x", {wr(x, 0, 64)});
  p.launch(d1, "produce_y", {wr(y, 0, 64)});
  p.det.on_host_sync_device(1);
  p.launch(other, "consume", {rd(x, 0, 64), rd(y, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].buffer, "x");
}

TEST(HazardDetector, HostUploadWhileAStreamReadsIsAHazard) {
  Program p;
  StreamId main = p.stream("main");
  BufferId x = p.buffer("tokens");
  p.launch(main, "embed", {rd(x, 0, 64)});
  p.det.on_host_access(wr(x, 0, 64));  // overwrites the input the kernel may still be reading
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_EQ(h.kind, Hazard::war);
  EXPECT_EQ(h.first_op, "embed");
  EXPECT_EQ(h.second_stream, "host");
  EXPECT_EQ(h.second_source, Hazard::host);
}

TEST(HazardDetector, HostDownloadBeforeSyncIsAHazardAndAfterSyncIsNot) {
  Program p;
  StreamId main = p.stream("main");
  BufferId x = p.buffer("logits");
  p.launch(main, "lm_head", {wr(x, 0, 64)});
  p.det.on_host_access(rd(x, 0, 64));
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::raw);
  p.det.on_host_sync_stream(main);
  p.det.on_host_access(rd(x, 0, 64));
  EXPECT_EQ(p.det.hazards().size(), 1u);
}

TEST(HazardDetector, WorkIssuedAfterAHostAccessIsOrderedAfterIt) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.det.on_host_access(wr(x, 0, 64));
  p.launch(main, "read", {rd(x, 0, 64)});
  p.launch(alt, "write", {wr(x, 64, 128)});
  EXPECT_TRUE(p.det.hazards().empty());
}

// ---- graphs --------------------------------------------------------------------------------------

TEST(HazardDetector, CapturedGraphWithAMissingEdgeIsFlaggedAtCaptureEnd) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId meta = p.buffer("meta");
  GraphTopology g;
  g.nodes.push_back(node("upgrade", main, {wr(meta, 0, 64)}));
  g.nodes.push_back(node("indexer", alt, {rd(meta, 0, 64)}));  // no edge from "upgrade"
  p.det.on_capture_begin(main);
  p.det.on_capture_end(main, GraphId{7}, g);
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_TRUE(h.in_graph);
  EXPECT_EQ(h.kind, Hazard::raw);
  EXPECT_EQ(h.first_op, "upgrade");
  EXPECT_EQ(h.second_op, "indexer");
  EXPECT_EQ(h.first_seq, 0u);
  EXPECT_EQ(h.second_seq, 1u);
  EXPECT_EQ(h.first_stream, "main");
  EXPECT_EQ(h.second_stream, "alt");
  EXPECT_EQ(h.first_graph, 7);
  EXPECT_NE(h.describe().find("captured graph 7"), std::string::npos) << h.describe();
}

TEST(HazardDetector, CapturedGraphWithTheEdgeIsSilentTransitively) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId meta = p.buffer("meta");
  GraphTopology g;
  g.nodes.push_back(node("upgrade", main, {wr(meta, 0, 64)}));
  g.nodes.push_back(node("fork", main, {}, {0}));
  g.nodes.push_back(node("indexer", alt, {rd(meta, 0, 64)}, {1}));
  g.nodes.push_back(node("compressor", alt, {rd(meta, 0, 64)}, {1}));
  p.det.on_capture_end(main, GraphId{0}, g);
  EXPECT_TRUE(p.det.hazards().empty());
}

TEST(HazardDetector, LaunchesIssuedDuringCaptureAreNotExecutions) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId meta = p.buffer("meta");
  p.det.on_capture_begin(main);
  EventId fork = p.event();
  p.record(fork, main);
  p.wait(alt, fork);  // alt joins the capture
  p.launch(main, "upgrade", {wr(meta, 0, 64)}, /*capturing=*/true);
  p.launch(alt, "indexer", {rd(meta, 0, 64)}, /*capturing=*/true);
  EventId join = p.event();
  p.record(join, alt);
  p.wait(main, join);
  EXPECT_TRUE(p.det.hazards().empty());
  GraphTopology g;
  g.nodes.push_back(node("upgrade", main, {wr(meta, 0, 64)}));
  g.nodes.push_back(node("indexer", alt, {rd(meta, 0, 64)}));
  p.det.on_capture_end(main, GraphId{1}, g);
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_TRUE(p.det.hazards()[0].in_graph);
  // After capture, both streams are eager again: events recorded now order real work.
  p.launch(main, "eager_write", {wr(meta, 0, 64)});
  p.order(main, alt);
  p.launch(alt, "eager_read", {rd(meta, 0, 64)});
  EXPECT_EQ(p.det.hazards().size(), 1u);
}

TEST(HazardDetector, CaptureEdgesDoNotOrderEagerWork) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x");
  p.launch(main, "eager_write", {wr(x, 0, 64)});
  p.det.on_capture_begin(main);
  EventId fork = p.event();
  p.record(fork, main);  // a captured record: not main's eager clock
  p.wait(alt, fork);
  p.det.on_capture_end(main, GraphId{0}, GraphTopology{});
  p.launch(alt, "eager_read", {rd(x, 0, 64)});
  EXPECT_EQ(p.det.hazards().size(), 1u);
}

TEST(HazardDetector, ReplayRacingWithAnotherStreamIsFlagged) {
  Program p;
  StreamId main = p.stream("main"), side = p.stream("side");
  BufferId kv = p.buffer("kv");
  GraphTopology g;
  g.nodes.push_back(node("attn", main, {rd(kv, 0, 512)}));
  g.nodes.push_back(node("store", main, {wr(kv, 512, 1024)}, {0}));
  p.det.on_capture_end(main, GraphId{3}, g);
  ASSERT_TRUE(p.det.hazards().empty());
  p.det.on_graph_replay(GraphId{3}, main, g);
  p.launch(side, "evict", {wr(kv, 0, 64)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_EQ(h.kind, Hazard::war);
  EXPECT_EQ(h.first_op, "attn");
  EXPECT_EQ(h.first_source, Hazard::graph_node);
  EXPECT_EQ(h.first_graph, 3);
  EXPECT_EQ(h.first_seq, 0u);
  EXPECT_EQ(h.first_stream, "main");
  EXPECT_EQ(h.second_op, "evict");
  EXPECT_FALSE(h.in_graph);
}

TEST(HazardDetector, ReplayIsOrderedAfterItsStreamAndBeforeLaterWorkOnIt) {
  Program p;
  StreamId main = p.stream("main"), side = p.stream("side");
  BufferId in = p.buffer("in"), out = p.buffer("out");
  GraphTopology g;
  g.nodes.push_back(node("a", main, {rd(in, 0, 64), wr(out, 0, 32)}));
  g.nodes.push_back(node("b", side, {rd(in, 0, 64), wr(out, 32, 64)}));  // parallel branch
  g.nodes.push_back(node("c", main, {rd(out, 0, 64)}, {0, 1}));
  p.launch(side, "fill", {wr(in, 0, 64)});
  p.order(side, main);
  for (int step = 0; step < 5; ++step) {
    p.det.on_graph_replay(GraphId{0}, main, g);  // replays on one stream follow each other
  }
  p.launch(main, "sample", {rd(out, 0, 64)});
  p.order(main, side);
  p.launch(side, "refill", {wr(in, 0, 64)});
  EXPECT_TRUE(p.det.hazards().empty());
  EXPECT_LE(p.det.clock_components(), 6u);  // host + 2 streams + lanes reused across replays
}

TEST(HazardDetector, ReplaysOfOneGraphAreOrderedButTwoGraphsOnUnorderedStreamsRace) {
  Program p;
  StreamId s1 = p.stream("s1"), s2 = p.stream("s2");
  BufferId out = p.buffer("out");
  GraphTopology g;
  g.nodes.push_back(node("write", s1, {wr(out, 0, 64)}));
  // cudaGraphLaunch orders each launch of an executable graph after its previous launches.
  p.det.on_graph_replay(GraphId{0}, s1, g);
  p.det.on_graph_replay(GraphId{0}, s2, g);
  EXPECT_TRUE(p.det.hazards().empty());
  // A second instantiation of the same topology is another graph: nothing orders the two.
  p.det.on_graph_replay(GraphId{1}, s1, g);
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::waw);
}

TEST(HazardDetector, RaceInsideAGraphIsReportedOnceAcrossCaptureAndReplays) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId meta = p.buffer("meta");
  GraphTopology g;
  g.nodes.push_back(node("upgrade", alt, {wr(meta, 0, 64)}));
  g.nodes.push_back(node("indexer", main, {rd(meta, 0, 64)}));
  p.det.on_capture_end(main, GraphId{2}, g);
  for (int step = 0; step < 3; ++step) {
    p.det.on_graph_replay(GraphId{2}, main, g);
    p.det.on_host_sync_stream(main);
  }
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_TRUE(p.det.hazards()[0].in_graph);
}

// ---- collectives ---------------------------------------------------------------------------------

TEST(HazardDetector, CollectiveOrdersItsParticipants) {
  Program p;
  StreamId r0 = p.stream("rank0", 0), r1 = p.stream("rank1", 1), idle = p.stream("idle", 0);
  BufferId x0 = p.buffer("x0"), x1 = p.buffer("x1");
  p.launch(r0, "produce", {wr(x0, 0, 64)});
  p.det.on_collective("all_reduce", {r0, r1}, {{rd(x0, 0, 64), wr(x0, 64, 128)}, {rd(x1, 0, 64), wr(x1, 64, 128)}});
  p.launch(r1, "after", {rd(x0, 0, 128)});  // ordered through the collective
  EXPECT_TRUE(p.det.hazards().empty());
  p.launch(idle, "bystander", {rd(x0, 64, 128)});  // not a participant: races with the collective's write
  ASSERT_EQ(p.det.hazards().size(), 1u);
  const Hazard& h = p.det.hazards()[0];
  EXPECT_EQ(h.kind, Hazard::raw);
  EXPECT_EQ(h.first_op, "all_reduce");
  EXPECT_EQ(h.first_source, Hazard::collective);
  EXPECT_EQ(h.first_stream, "rank0");
  EXPECT_EQ(h.second_op, "bystander");
}

TEST(HazardDetector, CollectiveRacingWithAnUnorderedProducerIsFlagged) {
  Program p;
  StreamId r0 = p.stream("rank0"), r1 = p.stream("rank1"), copy = p.stream("copy");
  BufferId x0 = p.buffer("x0"), x1 = p.buffer("x1");
  p.launch(copy, "fill", {wr(x0, 0, 64)});  // the collective's stream never waits for it
  p.det.on_collective("all_gather", {r0, r1}, {{rd(x0, 0, 64)}, {wr(x1, 0, 64)}});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].second_op, "all_gather");
  EXPECT_EQ(p.det.hazards()[0].second_stream, "rank0");
}

// ---- the seed bugs' shapes -----------------------------------------------------------------------

// bug-classes A2: alt streams fork from main, then the first one to reach the lazy metadata
// upgrade writes it on its own stream, and another alt stream reads it with no edge.
TEST(HazardDetector, SeedBugLazyMetadataUpgradeAfterTheForkIsFlagged) {
  Program p;
  StreamId main = p.stream("main"), indexer = p.stream("stream_indexer"), compressor = p.stream("stream_compressor");
  BufferId meta = p.buffer("forward_metadata");
  EventId fork = p.event();
  p.record(fork, main);  // fork BEFORE the upgrade
  p.wait(indexer, fork);
  p.wait(compressor, fork);
  p.launch(indexer, "upgrade_forward_metadata", {wr(meta, 0, 256)});
  p.launch(compressor, "core_compressor", {rd(meta, 0, 256)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].first_stream, "stream_indexer");
  EXPECT_EQ(p.det.hazards()[0].second_stream, "stream_compressor");
  EXPECT_EQ(p.det.hazards()[0].buffer, "forward_metadata");
}

TEST(HazardDetector, SeedBugMainStreamWritesAfterForkIsFlagged) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId meta = p.buffer("forward_metadata");
  EventId fork = p.event();
  p.record(fork, main);
  p.wait(alt, fork);
  p.launch(main, "upgrade_forward_metadata", {wr(meta, 0, 256)});
  p.launch(alt, "indexer", {rd(meta, 0, 256)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::raw);
}

TEST(HazardDetector, SeedBugFixUpgradesOnMainBeforeTheForkAndIsSilent) {
  Program p;
  StreamId main = p.stream("main"), indexer = p.stream("stream_indexer"), compressor = p.stream("stream_compressor");
  BufferId meta = p.buffer("forward_metadata");
  p.launch(main, "upgrade_forward_metadata", {wr(meta, 0, 256)});
  EventId fork = p.event();
  p.record(fork, main);
  p.wait(indexer, fork);
  p.wait(compressor, fork);
  p.launch(indexer, "indexer_compressor", {rd(meta, 0, 256)});
  p.launch(compressor, "core_compressor", {rd(meta, 0, 256)});
  EXPECT_TRUE(p.det.hazards().empty());
}

// bug-classes: a tensor freed while another stream still reads it; its memory is reused at once.
TEST(HazardDetector, SeedBugReuseOfMemoryStillReadByAnotherStreamIsFlagged) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId pool = p.buffer("workspace");
  p.launch(main, "produce", {wr(pool, 0, 128)});
  p.order(main, alt);
  p.launch(alt, "consume", {rd(pool, 0, 128)});
  // main frees the tensor and hands its bytes to the next one without waiting for alt.
  p.launch(main, "next_tensor_init", {wr(pool, 0, 128)});
  ASSERT_EQ(p.det.hazards().size(), 1u);
  EXPECT_EQ(p.det.hazards()[0].kind, Hazard::war);
  EXPECT_EQ(p.det.hazards()[0].first_op, "consume");
  EXPECT_EQ(p.det.hazards()[0].second_op, "next_tensor_init");
}

// ---- history bounds ------------------------------------------------------------------------------

TEST(HazardDetector, HistoryStaysSmallOverLongPrograms) {
  Program p;
  StreamId main = p.stream("main"), alt = p.stream("alt");
  BufferId x = p.buffer("x", 1 << 20), y = p.buffer("y", 1 << 20), log = p.buffer("log", 20000 * 64);
  for (int i = 0; i < 20000; ++i) {
    const auto page = static_cast<uint64_t>(i % 64) * 4096;
    const auto record = static_cast<uint64_t>(i) * 64;  // never overwritten: only host syncs retire it
    p.launch(main, "write", {wr(x, page, page + 4096), rd(y, 0, 1 << 20), wr(log, record, record + 64)});
    p.order(main, alt);
    p.launch(alt, "read", {rd(x, page, page + 4096), wr(y, page, page + 4096)});
    p.order(alt, main);
    if (i % 100 == 99) p.det.on_host_sync_device(0);
  }
  EXPECT_TRUE(p.det.hazards().empty());
  EXPECT_LT(p.det.history_entries(), 800u);
}

// ---- randomized: the detector against an explicit happens-before DAG -----------------------------

constexpr size_t kOracleNodesMax = 512;

// Happens-before computed the plain way: every operation is a node, edges are stream order, event
// waits, host order and syncs, graph edges; ordered means reachable.
class Oracle {
 public:
  int add_node(const std::vector<int>& predecessors) {
    std::bitset<kOracleNodesMax> mine;
    for (int p : predecessors) {
      if (p < 0) continue;
      mine |= ancestors_[static_cast<size_t>(p)];
      mine.set(static_cast<size_t>(p));
    }
    EXPECT_LT(ancestors_.size(), kOracleNodesMax);
    ancestors_.push_back(mine);
    return static_cast<int>(ancestors_.size() - 1);
  }
  void add_access(int node, const Access& a, const std::string& who) { accesses_.push_back({node, a, who}); }

  // Unordered conflicting pairs as (lower who, higher who, buffer) -> the later access's who.
  std::map<std::tuple<std::string, std::string, int32_t>, std::string> races() const {
    std::map<std::tuple<std::string, std::string, int32_t>, std::string> out;
    for (size_t i = 0; i < accesses_.size(); ++i) {
      for (size_t j = i + 1; j < accesses_.size(); ++j) {
        const Item& x = accesses_[i];
        const Item& y = accesses_[j];
        if (x.node == y.node) continue;
        if (x.access.kind == AccessKind::read && y.access.kind == AccessKind::read) continue;
        if (!x.access.range.overlaps(y.access.range)) continue;
        const auto xn = static_cast<size_t>(x.node), yn = static_cast<size_t>(y.node);
        if (ancestors_[yn].test(xn) || ancestors_[xn].test(yn)) continue;
        out.emplace(std::make_tuple(std::min(x.who, y.who), std::max(x.who, y.who), x.access.range.buffer.value), y.who);
      }
    }
    return out;
  }

 private:
  struct Item {
    int node;
    Access access;
    std::string who;
  };
  std::vector<std::bitset<kOracleNodesMax>> ancestors_;
  std::vector<Item> accesses_;
};

std::string who_of(Hazard::Source source, const std::string& op, const std::string& stream, uint64_t seq,
                   int32_t graph) {
  if (source == Hazard::graph_node) return "g" + std::to_string(graph) + "n" + std::to_string(seq);
  return op + "|" + stream + "|" + std::to_string(seq);
}

struct RandomRun {
  std::map<std::tuple<std::string, std::string, int32_t>, std::string> expected;
  std::set<std::tuple<std::string, std::string, int32_t>> reported;
  std::string trace;
};

// Generates one random program, feeding the detector and the oracle the same operations.
RandomRun run_random_program(uint64_t seed, bool prune) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  HazardDetector det(HazardDetectorOptions{.hazards_max = 1u << 20, .prune_history = prune});
  Oracle oracle;
  std::map<int, int> replay_end;  // graph -> the oracle node where its last replay ended
  std::ostringstream trace;
  RandomRun run;

  const int stream_count = pick(2, 4), buffer_count = pick(1, 3), event_count = pick(1, 3);
  for (int s = 0; s < stream_count; ++s) det.on_stream_created(StreamId{s}, s % 2, "s" + std::to_string(s));
  for (int b = 0; b < buffer_count; ++b) det.on_buffer_created(BufferId{b}, 0, "b" + std::to_string(b), 16);
  auto random_access = [&]() {
    const auto begin = static_cast<uint64_t>(pick(0, 15));
    const uint64_t end = std::min<uint64_t>(16, begin + static_cast<uint64_t>(pick(1, 8)));
    return Access{ByteRange{BufferId{pick(0, buffer_count - 1)}, begin, end},
                  pick(0, 9) < 4 ? AccessKind::write : AccessKind::read};
  };
  auto access_text = [](const Access& a) {
    return std::string(a.kind == AccessKind::write ? "w" : "r") + "b" + std::to_string(a.range.buffer.value) + "[" +
           std::to_string(a.range.begin) + "," + std::to_string(a.range.end) + ")";
  };

  // Graphs, checked at capture end on their own.
  const int graph_count = pick(0, 2);
  std::vector<GraphTopology> graphs(static_cast<size_t>(graph_count));
  for (int g = 0; g < graph_count; ++g) {
    GraphTopology& topo = graphs[static_cast<size_t>(g)];
    Oracle alone;
    const int nodes = pick(2, 4);
    for (int i = 0; i < nodes; ++i) {
      std::vector<int> preds;
      for (int j = 0; j < i; ++j) {
        if (pick(0, 9) < 4) preds.push_back(j);
      }
      std::vector<Access> accesses;
      for (int k = pick(1, 2); k > 0; --k) accesses.push_back(random_access());
      topo.nodes.push_back(node("g" + std::to_string(g) + "n" + std::to_string(i), StreamId{pick(0, stream_count - 1)},
                                accesses, preds));
      const int id = alone.add_node(preds);
      trace << "graph " << g << " node " << i << " preds";
      for (int q : preds) trace << " " << q;
      for (const Access& a : accesses) {
        alone.add_access(id, a, "g" + std::to_string(g) + "n" + std::to_string(i));
        trace << " " << access_text(a);
      }
      trace << "\n";
    }
    // Half the graphs skip the capture-end check, so races inside a replay must be found by the
    // replay itself (at capture end they would already be reported, under the same pair).
    if (pick(0, 1) == 0) {
      for (auto& [key, later] : alone.races()) run.expected.emplace(key, later);
      det.on_capture_end(StreamId{0}, GraphId{g}, topo);
      trace << "capture end of graph " << g << "\n";
    }
  }

  std::vector<int> last(static_cast<size_t>(stream_count), -1);
  std::vector<int> event_node(static_cast<size_t>(event_count), -1);
  std::vector<bool> recorded(static_cast<size_t>(event_count), false);
  int host_last = -1;
  uint64_t seq = 0, host_ordinal = 0, collective_ordinal = 0;
  const int steps = pick(20, 60);
  for (int step = 0; step < steps; ++step) {
    const int r = pick(0, 99);
    const int s = pick(0, stream_count - 1);
    const auto su = static_cast<size_t>(s);
    const std::string sname = "s" + std::to_string(s);
    if (r < 40 || (r >= 89 && graph_count == 0)) {
      Launch l;
      l.op = "k" + std::to_string(seq);
      for (int k = pick(1, 3); k > 0; --k) l.accesses.push_back(random_access());
      const int id = oracle.add_node({last[su], host_last});
      last[su] = id;
      trace << "launch " << l.op << " on " << sname;
      for (const Access& a : l.accesses) {
        oracle.add_access(id, a, l.op + "|" + sname + "|" + std::to_string(seq));
        trace << " " << access_text(a);
      }
      trace << "\n";
      det.on_launch(StreamId{s}, seq, l, false);
      ++seq;
    } else if (r < 52) {
      const int e = pick(0, event_count - 1);
      event_node[static_cast<size_t>(e)] = last[su];
      recorded[static_cast<size_t>(e)] = true;
      trace << "record e" << e << " on " << sname << "\n";
      det.on_event_record(EventId{e}, StreamId{s});
    } else if (r < 67) {
      const int e = pick(0, event_count - 1);
      if (recorded[static_cast<size_t>(e)]) last[su] = oracle.add_node({last[su], event_node[static_cast<size_t>(e)]});
      trace << sname << " waits e" << e << "\n";
      det.on_stream_wait(StreamId{s}, EventId{e});
    } else if (r < 71) {
      host_last = oracle.add_node({host_last, last[su]});
      trace << "host syncs " << sname << "\n";
      det.on_host_sync_stream(StreamId{s});
    } else if (r < 74) {
      const int e = pick(0, event_count - 1);
      if (recorded[static_cast<size_t>(e)]) host_last = oracle.add_node({host_last, event_node[static_cast<size_t>(e)]});
      trace << "host syncs e" << e << "\n";
      det.on_host_sync_event(EventId{e});
    } else if (r < 77) {
      const int d = pick(0, 1);
      std::vector<int> preds{host_last};
      for (int t = d; t < stream_count; t += 2) preds.push_back(last[static_cast<size_t>(t)]);
      host_last = oracle.add_node(preds);
      trace << "host syncs device " << d << "\n";
      det.on_host_sync_device(d);
    } else if (r < 83) {
      const Access a = random_access();
      host_last = oracle.add_node({host_last});
      const std::string op = a.kind == AccessKind::write ? "host write" : "host read";
      oracle.add_access(host_last, a, op + "|host|" + std::to_string(host_ordinal));
      trace << "host " << access_text(a) << "\n";
      det.on_host_access(a);
      ++host_ordinal;
    } else if (r < 89) {
      std::vector<int> order(static_cast<size_t>(stream_count));
      for (int t = 0; t < stream_count; ++t) order[static_cast<size_t>(t)] = t;
      std::shuffle(order.begin(), order.end(), rng);
      order.resize(static_cast<size_t>(pick(2, stream_count)));
      const std::string op = "coll" + std::to_string(collective_ordinal);
      std::vector<int> preds{host_last};
      for (int t : order) preds.push_back(last[static_cast<size_t>(t)]);
      const int id = oracle.add_node(preds);
      std::vector<StreamId> streams;
      std::vector<std::vector<Access>> accesses;
      trace << op << " on";
      for (int t : order) {
        streams.push_back(StreamId{t});
        accesses.emplace_back();
        trace << " s" << t;
        for (int k = pick(0, 2); k > 0; --k) {
          accesses.back().push_back(random_access());
          oracle.add_access(id, accesses.back().back(), op + "|s" + std::to_string(t) + "|" + std::to_string(collective_ordinal));
          trace << " " << access_text(accesses.back().back());
        }
        last[static_cast<size_t>(t)] = id;
      }
      trace << "\n";
      det.on_collective(op, streams, accesses);
      ++collective_ordinal;
    } else {
      const int g = pick(0, graph_count - 1);
      const GraphTopology& topo = graphs[static_cast<size_t>(g)];
      // cudaGraphLaunch orders a replay after the previous replays of the same graph.
      std::vector<int> start_preds{last[su], host_last};
      if (auto it = replay_end.find(g); it != replay_end.end()) start_preds.push_back(it->second);
      const int start = oracle.add_node(start_preds);
      std::vector<int> ids;
      for (size_t i = 0; i < topo.nodes.size(); ++i) {
        std::vector<int> preds{start};
        for (int q : topo.nodes[i].predecessors) preds.push_back(ids[static_cast<size_t>(q)]);
        ids.push_back(oracle.add_node(preds));
        for (const Access& a : topo.nodes[i].launch.accesses) {
          oracle.add_access(ids.back(), a, "g" + std::to_string(g) + "n" + std::to_string(i));
        }
      }
      ids.push_back(start);
      last[su] = oracle.add_node(ids);
      replay_end[g] = last[su];
      trace << "replay graph " << g << " on " << sname << "\n";
      det.on_graph_replay(GraphId{g}, StreamId{s}, topo);
    }
  }
  for (auto& [key, later] : oracle.races()) run.expected.emplace(key, later);
  for (const Hazard& h : det.hazards()) {
    const std::string a = who_of(h.first_source, h.first_op, h.first_stream, h.first_seq, h.first_graph);
    const std::string b = who_of(h.second_source, h.second_op, h.second_stream, h.second_seq, h.second_graph);
    const int32_t buffer = std::stoi(h.buffer.substr(1));
    run.reported.emplace(std::min(a, b), std::max(a, b), buffer);
  }
  run.trace = trace.str();
  return run;
}

std::string pair_text(const std::tuple<std::string, std::string, int32_t>& p) {
  return std::get<0>(p) + " x " + std::get<1>(p) + " on b" + std::to_string(std::get<2>(p));
}

TEST(HazardDetectorRandomized, ReportsExactlyTheUnorderedConflictingPairsWithoutPruning) {
  int failures = 0;
  size_t races_seen = 0;
  for (uint64_t seed = 1; seed <= 3000 && failures < 3; ++seed) {
    const RandomRun run = run_random_program(seed, /*prune=*/false);
    std::set<std::tuple<std::string, std::string, int32_t>> expected;
    for (const auto& [key, later] : run.expected) expected.insert(key);
    races_seen += expected.size();
    if (expected == run.reported) continue;
    ++failures;
    std::string diff;
    for (const auto& k : expected) {
      if (!run.reported.count(k)) diff += "  missed: " + pair_text(k) + "\n";
    }
    for (const auto& k : run.reported) {
      if (!expected.count(k)) diff += "  spurious: " + pair_text(k) + "\n";
    }
    ADD_FAILURE() << "seed " << seed << "\n" << diff << "program:\n" << run.trace;
  }
  EXPECT_GT(races_seen, 1000u);  // the generator does produce races, and plenty of them
}

TEST(HazardDetectorRandomized, PrunedHistoryReportsOnlyRealRacesAndEveryRacyAccess) {
  int failures = 0;
  for (uint64_t seed = 1; seed <= 3000 && failures < 3; ++seed) {
    const RandomRun run = run_random_program(seed, /*prune=*/true);
    std::string diff;
    for (const auto& k : run.reported) {
      if (!run.expected.count(k)) diff += "  spurious: " + pair_text(k) + "\n";
    }
    for (const auto& [key, later] : run.expected) {
      if (run.reported.count(key)) continue;
      // Pruning may report a racy access against a newer conflicting access instead.
      const bool covered = std::any_of(run.reported.begin(), run.reported.end(), [&](const auto& r) {
        return std::get<2>(r) == std::get<2>(key) && (std::get<0>(r) == later || std::get<1>(r) == later);
      });
      if (!covered) diff += "  racy access never reported: " + later + " (" + pair_text(key) + ")\n";
    }
    if (diff.empty()) continue;
    ++failures;
    ADD_FAILURE() << "seed " << seed << "\n" << diff << "program:\n" << run.trace;
  }
}

// ---- cost ----------------------------------------------------------------------------------------

// A rough number, printed, not asserted (timed assertions belong in bench/): a decode-like program
// of 4 streams forking and joining around 64 buffers, with a host sync every 256 launches.
TEST(HazardDetectorCost, PrintsTheCostPerLaunch) {
  HazardDetector det;
  constexpr int kStreams = 4, kBuffers = 64, kLaunches = 200000;
  constexpr uint64_t kBufferBytes = 1 << 20;
  for (int s = 0; s < kStreams; ++s) det.on_stream_created(StreamId{s}, 0, "s" + std::to_string(s));
  for (int b = 0; b < kBuffers; ++b) det.on_buffer_created(BufferId{b}, 0, "b" + std::to_string(b), kBufferBytes);
  std::mt19937_64 rng(42);
  std::vector<Launch> launches(64);
  for (size_t i = 0; i < launches.size(); ++i) {
    launches[i].op = "kernel_" + std::to_string(i);
    for (int k = 0; k < 3; ++k) {
      const auto b = static_cast<int32_t>(rng() % kBuffers);
      const uint64_t slice = (rng() % 16) * (kBufferBytes / 16);
      launches[i].accesses.push_back(Access{ByteRange{BufferId{b}, slice, slice + kBufferBytes / 16},
                                            k == 2 ? AccessKind::write : AccessKind::read});
    }
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kLaunches; ++i) {
    // Round-robin over streams, each ordered after the previous one: a legal multi-stream pipeline.
    const int s = i % kStreams;
    det.on_launch(StreamId{s}, static_cast<uint64_t>(i), launches[static_cast<size_t>(i) % launches.size()], false);
    det.on_event_record(EventId{s}, StreamId{s});
    det.on_stream_wait(StreamId{(s + 1) % kStreams}, EventId{s});
    if (i % 256 == 255) det.on_host_sync_device(0);
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  std::printf("hazard detector: %.0f ns per launch (3 accesses, record + wait each), %zu history entries\n",
              ns / kLaunches, det.history_entries());
  EXPECT_TRUE(det.hazards().empty());
}

}  // namespace
}  // namespace dsv4::rt
