// The cross-stream hazard detector (design.md, "The runtime"): a RuntimeObserver that keeps vector
// clocks over stream order, event record/wait, graph edges, host synchronizations and collectives,
// and reports every pair of accesses to overlapping bytes, at least one a write, that no
// happens-before edge orders. It judges the issued program, not the schedule that ran, so it flags a
// missing wait even when the interleaving that happened was benign.
//
// Model (one clock component per stream, one for the host, and one per "lane" of graph replays):
// - a launch on stream s joins the host clock into s, ticks s and is stamped with s's clock;
// - an event captures its stream's clock at record; a stream wait joins it (never recorded: no-op);
// - host syncs join a stream's, an event's or a device's streams' clocks into the host clock; the
//   host's own accesses are ordered after everything the host has waited for, and everything issued
//   later is ordered after them;
// - a graph is checked on its own at capture end (nodes ordered only by edges); at replay its nodes
//   run after the replay stream's clock and among themselves by edges, and the stream then includes
//   them all;
// - a collective joins its participants' clocks and is recorded as one access per participant.
// Not synchronized: observer calls arrive one at a time, in host issue order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/runtime/runtime.h"

namespace dsv4::rt {

struct Hazard {
  enum Kind { raw, war, waw };
  // What made an access; `seq` means: the launch_seq (launch), the node index (graph_node), the
  // host access's ordinal (host), the collective's ordinal (collective).
  enum Source { launch, graph_node, host, collective };

  Kind kind = raw;
  std::string buffer;
  uint64_t begin_bytes = 0;  // the overlap of the two accesses, [begin, end)
  uint64_t end_bytes = 0;
  std::string first_op, second_op;  // first: issued earlier (capture end: the lower node index)
  uint64_t first_seq = 0, second_seq = 0;
  std::string first_stream, second_stream;  // "host" for the host
  bool in_graph = false;  // found at capture end, between two nodes of one captured graph
  Source first_source = launch, second_source = launch;
  int32_t first_graph = -1, second_graph = -1;  // GraphId of a graph_node side, else -1

  std::string describe() const;
};

const char* hazard_kind_name(Hazard::Kind kind);

struct HazardDetectorOptions {
  // Reports past this many are counted, not recorded, so a broken program does not flood memory.
  size_t hazards_max = 100;
  // Drop history entries made redundant by a later access ordered after them (a write covering
  // them, or a read covering earlier reads). Every racy access is still reported, but against the
  // newest conflicting access only; turn off to report every unordered pair (tests).
  bool prune_history = true;
};

class HazardDetector : public RuntimeObserver {
 public:
  explicit HazardDetector(HazardDetectorOptions options = {});

  void on_stream_created(StreamId stream, int device, const std::string& name) override;
  void on_buffer_created(BufferId buffer, int device, const std::string& name, uint64_t bytes) override;
  void on_launch(StreamId stream, uint64_t launch_seq, const Launch& launch, bool capturing) override;
  void on_event_record(EventId event, StreamId stream) override;
  void on_stream_wait(StreamId stream, EventId event) override;
  void on_host_sync_stream(StreamId stream) override;
  void on_host_sync_event(EventId event) override;
  void on_host_sync_device(int device) override;
  void on_host_access(const Access& access) override;
  void on_capture_begin(StreamId stream) override;
  void on_capture_end(StreamId stream, GraphId graph, const GraphTopology& topology) override;
  void on_graph_replay(GraphId graph, StreamId stream, const GraphTopology& topology) override;
  void on_collective(const std::string& op, const std::vector<StreamId>& streams,
                     const std::vector<std::vector<Access>>& accesses) override;

  const std::vector<Hazard>& hazards() const { return hazards_; }
  // Reports not recorded because hazards_max was reached (repeats of one pair included).
  uint64_t hazards_dropped() const { return hazards_dropped_; }
  // Forgets the reports (and which pairs were reported); clocks and history stay.
  void clear();

  // Live shadow-history entries over all buffers: what pruning and collection keep bounded.
  size_t history_entries() const;
  // Clock components in use: host + streams + graph-replay lanes.
  size_t clock_components() const { return component_count_; }

 private:
  using Clock = std::vector<uint64_t>;  // indexed by component; a missing component reads as 0

  // Who made an access, for reports and for "each pair once".
  struct Site {
    uint64_t uid = 0;  // launches, host accesses, collective participants: a counter; graph nodes: (graph, node)
    uint64_t seq = 0;
    uint32_t op = 0;         // interned op name
    int32_t stream = -1;     // StreamId value, -1 for the host
    int32_t graph = -1;
    Hazard::Source source = Hazard::launch;
  };
  struct Entry {
    uint64_t begin_bytes = 0;
    uint64_t end_bytes = 0;
    uint64_t epoch = 0;    // the access's own tick on `component`
    uint32_t component = 0;
    AccessKind kind = AccessKind::read;
    Site site;
  };
  struct BufferState {
    std::string name;
    bool created = false;
    std::vector<Entry> entries;  // sorted by begin_bytes
    uint64_t entry_bytes_max = 0;  // bounds how far left of a query an overlapping entry can begin
    size_t sweep_at_entries = 64;
  };
  struct StreamState {
    std::string name;
    bool created = false;
    int device = 0;
    uint32_t component = 0;
    Clock clock;
    uint64_t host_version_seen = 0;
    int32_t capture_root = -1;  // stream that began the capture this stream takes part in
  };
  struct EventState {
    bool recorded = false;
    bool captured = false;  // recorded inside a capture: a graph-internal dependency
    int32_t capture_root = -1;
    Clock clock;
  };
  struct PairKey {
    uint64_t uid_low, uid_high;
    int32_t buffer;
    bool operator==(const PairKey&) const = default;
  };
  struct PairKeyHash {
    size_t operator()(const PairKey& k) const;
  };

  static uint64_t at(const Clock& clock, uint32_t component) {
    return component < clock.size() ? clock[component] : 0;
  }
  static void join(Clock& into, const Clock& from);

  StreamState& stream_state(StreamId stream);
  BufferState& buffer_state(BufferId buffer);
  EventState& event_state(EventId event);
  uint32_t intern(const std::string& op);
  uint32_t new_component() { return component_count_++; }
  void join_host(StreamState& stream);
  // Every later access joins the host clock, so an entry the host has waited for can never race
  // again: dropping it is exact, not an approximation.
  bool collectable(const Entry& entry) const { return entry.epoch <= at(host_clock_, entry.component); }

  void check_and_record(const Access& access, const Clock& clock, uint32_t component, uint64_t epoch,
                        const Site& site);
  void sweep(BufferState& buffer);
  void report(const Site& first, AccessKind first_kind, const Site& second, AccessKind second_kind,
              int32_t buffer, uint64_t begin_bytes, uint64_t end_bytes, bool in_graph);
  std::string stream_name(int32_t stream) const;

  std::vector<int> topological_order(const GraphTopology& topology) const;
  void check_captured_graph(GraphId graph, const GraphTopology& topology);
  uint32_t pick_lane(const Clock& clock, const std::vector<int>& predecessors,
                     const std::vector<uint32_t>& lane_of_node);
  static uint64_t graph_node_uid(GraphId graph, size_t node);

  HazardDetectorOptions options_;
  std::vector<StreamState> streams_;  // by StreamId value
  std::vector<BufferState> buffers_;  // by BufferId value
  std::vector<EventState> events_;    // by EventId value
  Clock host_clock_;                  // component 0 is the host's own
  uint64_t host_version_ = 1;         // bumps whenever host_clock_ changes
  uint32_t component_count_ = 1;
  std::unordered_map<int32_t, Clock> replay_end_clock_;  // per graph: where its last replay ended
  // Graph-replay lanes: a chain of replayed nodes shares a component; a lane is reused by a node
  // only when the lane's last node happens-before it, which keeps each component totally ordered.
  std::vector<uint32_t> lane_component_;
  std::vector<uint64_t> lane_epoch_;
  std::vector<std::string> op_names_;
  std::unordered_map<std::string, uint32_t> op_ids_;
  uint64_t next_uid_ = 1;
  uint64_t host_accesses_ = 0;
  uint64_t collectives_ = 0;
  std::vector<Hazard> hazards_;
  uint64_t hazards_dropped_ = 0;
  std::unordered_set<PairKey, PairKeyHash> reported_;
  std::vector<Entry> scratch_window_;  // reused per access: no allocation in the steady state
  std::vector<Entry> scratch_right_;
};

}  // namespace dsv4::rt
