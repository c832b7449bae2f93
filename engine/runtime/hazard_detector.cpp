#include "engine/runtime/hazard_detector.h"

#include <algorithm>
#include <limits>

#include "engine/core/error.h"

namespace dsv4::rt {

namespace {

constexpr uint32_t kHostComponent = 0;

std::string side_text(Hazard::Source source, const std::string& op, uint64_t seq, const std::string& stream,
                      int32_t graph, bool in_graph) {
  switch (source) {
    case Hazard::launch:
      return "'" + op + "' (launch #" + std::to_string(seq) + " on stream '" + stream + "')";
    case Hazard::graph_node:
      return "'" + op + "' (node " + std::to_string(seq) + " of graph " + std::to_string(graph) +
             (in_graph ? " captured on stream '" : " replayed on stream '") + stream + "')";
    case Hazard::host:
      return "the host (" + op + " #" + std::to_string(seq) + ")";
    case Hazard::collective:
      return "'" + op + "' (collective #" + std::to_string(seq) + " on stream '" + stream + "')";
  }
  return op;
}

bool is_write(AccessKind kind) { return kind == AccessKind::write; }

}  // namespace

const char* hazard_kind_name(Hazard::Kind kind) {
  switch (kind) {
    case Hazard::raw: return "RAW";
    case Hazard::war: return "WAR";
    case Hazard::waw: return "WAW";
  }
  return "?";
}

std::string Hazard::describe() const {
  const bool first_writes = kind != war;
  const bool second_writes = kind != raw;
  std::string out = std::string(hazard_kind_name(kind)) + " hazard on buffer '" + buffer + "' bytes [" +
                    std::to_string(begin_bytes) + ", " + std::to_string(end_bytes) + "): " +
                    (first_writes ? "write by " : "read by ") +
                    side_text(first_source, first_op, first_seq, first_stream, first_graph, in_graph) + " and " +
                    (second_writes ? "write by " : "read by ") +
                    side_text(second_source, second_op, second_seq, second_stream, second_graph, in_graph) +
                    " are not ordered by any happens-before edge";
  if (in_graph) out += " in captured graph " + std::to_string(first_graph);
  return out;
}

HazardDetector::HazardDetector(HazardDetectorOptions options) : options_(options), host_clock_(1, 0) {}

size_t HazardDetector::PairKeyHash::operator()(const PairKey& k) const {
  // Mix both uids and the buffer; pairs are few, so a plain multiplicative mix is enough.
  uint64_t h = k.uid_low * 0x9E3779B97F4A7C15ull;
  h ^= (k.uid_high + 0x632BE59BD9B4E019ull + (h << 6) + (h >> 2)) * 0xBF58476D1CE4E5B9ull;
  h ^= static_cast<uint64_t>(static_cast<uint32_t>(k.buffer)) * 0x94D049BB133111EBull;
  return static_cast<size_t>(h ^ (h >> 31));
}

void HazardDetector::join(Clock& into, const Clock& from) {
  if (into.size() < from.size()) into.resize(from.size(), 0);
  for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}

// ---- tables --------------------------------------------------------------------------------------

HazardDetector::StreamState& HazardDetector::stream_state(StreamId stream) {
  DSV4_ASSERT(stream.value >= 0, "hazard detector: a call names no stream");
  const auto index = static_cast<size_t>(stream.value);
  if (index >= streams_.size()) streams_.resize(index + 1);
  StreamState& state = streams_[index];
  if (!state.created) {
    // A stream never announced still gets a component, so the detector stays total.
    state.created = true;
    state.name = "stream" + std::to_string(stream.value);
    state.component = new_component();
  }
  return state;
}

HazardDetector::BufferState& HazardDetector::buffer_state(BufferId buffer) {
  DSV4_ASSERT(buffer.value >= 0, "hazard detector: an access names no buffer");
  const auto index = static_cast<size_t>(buffer.value);
  if (index >= buffers_.size()) buffers_.resize(index + 1);
  BufferState& state = buffers_[index];
  if (!state.created) {
    state.created = true;
    state.name = "buffer" + std::to_string(buffer.value);
  }
  return state;
}

HazardDetector::EventState& HazardDetector::event_state(EventId event) {
  DSV4_ASSERT(event.value >= 0, "hazard detector: a call names no event");
  const auto index = static_cast<size_t>(event.value);
  if (index >= events_.size()) events_.resize(index + 1);
  return events_[index];
}

uint32_t HazardDetector::intern(const std::string& op) {
  auto it = op_ids_.find(op);
  if (it != op_ids_.end()) return it->second;
  const auto id = static_cast<uint32_t>(op_names_.size());
  op_names_.push_back(op);
  op_ids_.emplace(op, id);
  return id;
}

std::string HazardDetector::stream_name(int32_t stream) const {
  if (stream < 0) return "host";
  const auto index = static_cast<size_t>(stream);
  if (index < streams_.size() && streams_[index].created) return streams_[index].name;
  return "stream" + std::to_string(stream);
}

void HazardDetector::join_host(StreamState& stream) {
  // Work issued after the host waited (or wrote) is ordered after what it waited for.
  if (stream.host_version_seen == host_version_) return;
  join(stream.clock, host_clock_);
  stream.host_version_seen = host_version_;
}

// ---- observer calls ------------------------------------------------------------------------------

void HazardDetector::on_stream_created(StreamId stream, int device, const std::string& name) {
  StreamState& state = stream_state(stream);
  state.device = device;
  state.name = name;
}

void HazardDetector::on_buffer_created(BufferId buffer, int /*device*/, const std::string& name,
                                       uint64_t /*bytes*/) {
  // A reused id keeps its history: reusing memory that another stream may still touch is exactly
  // the freed-while-in-use hazard.
  buffer_state(buffer).name = name;
}

void HazardDetector::on_launch(StreamId stream, uint64_t launch_seq, const Launch& launch, bool capturing) {
  if (capturing) return;  // not an execution: the topology arrives at capture end
  StreamState& state = stream_state(stream);
  join_host(state);
  if (state.clock.size() <= state.component) state.clock.resize(state.component + 1, 0);
  const uint64_t epoch = ++state.clock[state.component];
  Site site;
  site.uid = next_uid_++;
  site.seq = launch_seq;
  site.op = intern(launch.op);
  site.stream = stream.value;
  site.source = Hazard::launch;
  for (const Access& access : launch.accesses) check_and_record(access, state.clock, state.component, epoch, site);
}

void HazardDetector::on_event_record(EventId event, StreamId stream) {
  StreamState& state = stream_state(stream);
  EventState& ev = event_state(event);
  ev.recorded = true;
  if (state.capture_root >= 0) {
    // Inside a capture the record is a graph-internal edge; the topology carries it.
    ev.captured = true;
    ev.capture_root = state.capture_root;
    ev.clock.clear();
    return;
  }
  ev.captured = false;
  ev.capture_root = -1;
  ev.clock = state.clock;
}

void HazardDetector::on_stream_wait(StreamId stream, EventId event) {
  StreamState& state = stream_state(stream);
  const EventState& ev = event_state(event);
  if (!ev.recorded) return;  // as in CUDA: waiting on a never-recorded event is a no-op
  if (ev.captured) {
    // Waiting on a captured event pulls the stream into that capture (the fork pattern), while
    // the capture is still open.
    const auto root = static_cast<size_t>(ev.capture_root);
    const bool open = root < streams_.size() && streams_[root].capture_root == ev.capture_root;
    if (open && state.capture_root < 0) state.capture_root = ev.capture_root;
    return;
  }
  if (state.capture_root >= 0) return;  // an eager event seen from inside a capture orders no graph node
  join(state.clock, ev.clock);
}

void HazardDetector::on_host_sync_stream(StreamId stream) {
  join(host_clock_, stream_state(stream).clock);
  ++host_version_;
}

void HazardDetector::on_host_sync_event(EventId event) {
  const EventState& ev = event_state(event);
  if (!ev.recorded || ev.captured) return;
  join(host_clock_, ev.clock);
  ++host_version_;
}

void HazardDetector::on_host_sync_device(int device) {
  for (const StreamState& state : streams_) {
    if (state.created && state.device == device) join(host_clock_, state.clock);
  }
  ++host_version_;
}

void HazardDetector::on_host_access(const Access& access) {
  const uint64_t epoch = ++host_clock_[kHostComponent];
  ++host_version_;
  Site site;
  site.uid = next_uid_++;
  site.seq = host_accesses_++;
  site.op = intern(is_write(access.kind) ? "host write" : "host read");
  site.stream = -1;
  site.source = Hazard::host;
  check_and_record(access, host_clock_, kHostComponent, epoch, site);
}

void HazardDetector::on_capture_begin(StreamId stream) {
  StreamState& state = stream_state(stream);
  state.capture_root = stream.value;
}

void HazardDetector::on_capture_end(StreamId stream, GraphId graph, const GraphTopology& topology) {
  StreamState& state = stream_state(stream);
  const int32_t root = state.capture_root >= 0 ? state.capture_root : stream.value;
  for (StreamState& other : streams_) {
    if (other.capture_root == root) other.capture_root = -1;
  }
  check_captured_graph(graph, topology);
}

void HazardDetector::on_collective(const std::string& op, const std::vector<StreamId>& streams,
                                   const std::vector<std::vector<Access>>& accesses) {
  DSV4_ASSERT(streams.size() == accesses.size(), "collective: one access list per participant stream");
  if (streams.empty()) return;
  for (size_t i = 0; i < streams.size(); ++i) {
    for (size_t j = i + 1; j < streams.size(); ++j) {
      DSV4_ASSERT(!(streams[i] == streams[j]), "collective '" + op + "': a stream takes part twice");
    }
  }
  for (StreamId s : streams) {
    // A collective issued inside a capture has no node in the topology; nothing to execute here.
    if (stream_state(s).capture_root >= 0) return;
  }
  // Every participant waits for all the others: one joint clock, with each participant's tick.
  Clock joint = host_clock_;
  for (StreamId s : streams) join(joint, stream_state(s).clock);
  std::vector<uint64_t> epochs(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) {
    const uint32_t component = stream_state(streams[i]).component;
    epochs[i] = at(joint, component) + 1;
    if (joint.size() <= component) joint.resize(component + 1, 0);
    joint[component] = epochs[i];
  }
  for (StreamId s : streams) {
    StreamState& state = stream_state(s);
    state.clock = joint;
    state.host_version_seen = host_version_;
  }
  const uint64_t ordinal = collectives_++;
  const uint32_t op_id = intern(op);
  for (size_t i = 0; i < streams.size(); ++i) {
    Site site;
    site.uid = next_uid_++;
    site.seq = ordinal;
    site.op = op_id;
    site.stream = streams[i].value;
    site.source = Hazard::collective;
    const uint32_t component = stream_state(streams[i]).component;
    for (const Access& access : accesses[i]) check_and_record(access, joint, component, epochs[i], site);
  }
}

// ---- graphs --------------------------------------------------------------------------------------

uint64_t HazardDetector::graph_node_uid(GraphId graph, size_t node) {
  // The top bit keeps graph nodes apart from counter uids; one uid per (graph, node) makes a race
  // found at capture end and again at every replay one report.
  DSV4_ASSERT(graph.value >= 0, "graph replay or capture names no graph");
  DSV4_ASSERT(node < (1ull << 32), "graph has too many nodes");
  return (1ull << 63) | (static_cast<uint64_t>(graph.value) << 32) | static_cast<uint64_t>(node);
}

std::vector<int> HazardDetector::topological_order(const GraphTopology& topology) const {
  const size_t n = topology.nodes.size();
  // Capture appends a node after its predecessors, so index order is usually topological already.
  bool in_index_order = true;
  for (size_t i = 0; i < n && in_index_order; ++i) {
    for (int p : topology.nodes[i].predecessors) {
      DSV4_ASSERT(p >= 0, "graph node has a negative predecessor index");
      if (static_cast<size_t>(p) >= i) in_index_order = false;
    }
  }
  if (in_index_order) {
    std::vector<int> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = static_cast<int>(i);
    return order;
  }
  std::vector<int> pending(n, 0);
  std::vector<std::vector<int>> successors(n);
  for (size_t i = 0; i < n; ++i) {
    for (int p : topology.nodes[i].predecessors) {
      DSV4_ASSERT(p >= 0, "graph node has a negative predecessor index");
      DSV4_ASSERT(static_cast<size_t>(p) < n, "graph node's predecessor is out of range");
      DSV4_ASSERT(static_cast<size_t>(p) != i, "graph node depends on itself");
      successors[static_cast<size_t>(p)].push_back(static_cast<int>(i));
      ++pending[i];
    }
  }
  std::vector<int> order;
  order.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (pending[i] == 0) order.push_back(static_cast<int>(i));
  }
  for (size_t head = 0; head < order.size(); ++head) {
    for (int s : successors[static_cast<size_t>(order[head])]) {
      if (--pending[static_cast<size_t>(s)] == 0) order.push_back(s);
    }
  }
  DSV4_ASSERT(order.size() == n, "graph topology has a cycle");
  return order;
}

void HazardDetector::check_captured_graph(GraphId graph, const GraphTopology& topology) {
  const size_t n = topology.nodes.size();
  if (n == 0) return;
  const std::vector<int> order = topological_order(topology);
  // Ancestor bitsets: the graph is ordered only by its edges, transitively.
  const size_t words = (n + 63) / 64;
  std::vector<uint64_t> ancestors(n * words, 0);
  for (int node : order) {
    uint64_t* mine = &ancestors[static_cast<size_t>(node) * words];
    for (int p : topology.nodes[static_cast<size_t>(node)].predecessors) {
      const uint64_t* theirs = &ancestors[static_cast<size_t>(p) * words];
      for (size_t w = 0; w < words; ++w) mine[w] |= theirs[w];
      mine[static_cast<size_t>(p) / 64] |= 1ull << (static_cast<size_t>(p) % 64);
    }
  }
  auto ordered = [&](size_t a, size_t b) {
    return (ancestors[b * words + a / 64] >> (a % 64) & 1) || (ancestors[a * words + b / 64] >> (b % 64) & 1);
  };
  struct NodeAccess {
    int32_t buffer;
    size_t node;
    const Access* access;
  };
  std::vector<NodeAccess> all;
  for (size_t i = 0; i < n; ++i) {
    for (const Access& a : topology.nodes[i].launch.accesses) {
      if (a.range.begin < a.range.end) all.push_back({a.range.buffer.value, i, &a});
    }
  }
  // Group by buffer, keep capture order inside a group so "first" is the lower node index.
  std::stable_sort(all.begin(), all.end(), [](const NodeAccess& x, const NodeAccess& y) { return x.buffer < y.buffer; });
  for (size_t lo = 0; lo < all.size();) {
    size_t hi = lo;
    while (hi < all.size() && all[hi].buffer == all[lo].buffer) ++hi;
    for (size_t i = lo; i < hi; ++i) {
      for (size_t j = i + 1; j < hi; ++j) {
        const NodeAccess& x = all[i];
        const NodeAccess& y = all[j];
        if (x.node == y.node) continue;
        if (!is_write(x.access->kind) && !is_write(y.access->kind)) continue;
        if (!x.access->range.overlaps(y.access->range)) continue;
        if (ordered(x.node, y.node)) continue;
        auto site_of = [&](size_t node) {
          Site site;
          site.uid = graph_node_uid(graph, node);
          site.seq = node;
          site.op = intern(topology.nodes[node].launch.op);
          site.stream = topology.nodes[node].captured_on.value;
          site.graph = graph.value;
          site.source = Hazard::graph_node;
          return site;
        };
        report(site_of(x.node), x.access->kind, site_of(y.node), y.access->kind, x.buffer,
               std::max(x.access->range.begin, y.access->range.begin), std::min(x.access->range.end, y.access->range.end),
               true);
      }
    }
    lo = hi;
  }
}

uint32_t HazardDetector::pick_lane(const Clock& clock, const std::vector<int>& predecessors,
                                   const std::vector<uint32_t>& lane_of_node) {
  auto usable = [&](uint32_t lane) { return lane_epoch_[lane] <= at(clock, lane_component_[lane]); };
  // A predecessor's lane first: chains along edges keep the number of lanes near the graph's width.
  for (int p : predecessors) {
    const uint32_t lane = lane_of_node[static_cast<size_t>(p)];
    if (usable(lane)) return lane;
  }
  for (uint32_t lane = 0; lane < lane_component_.size(); ++lane) {
    if (usable(lane)) return lane;
  }
  lane_component_.push_back(new_component());
  lane_epoch_.push_back(0);
  return static_cast<uint32_t>(lane_component_.size() - 1);
}

void HazardDetector::on_graph_replay(GraphId graph, StreamId stream, const GraphTopology& topology) {
  StreamState& state = stream_state(stream);
  if (state.capture_root >= 0) return;  // replayed into another capture: a child graph, not run now
  join_host(state);
  const size_t n = topology.nodes.size();
  if (n == 0) return;
  const std::vector<int> order = topological_order(topology);
  std::vector<Clock> clocks(n);
  std::vector<uint32_t> lane_of_node(n, 0);
  // As cudaGraphLaunch does, a replay is ordered after the previous replays of the same graph.
  Clock base = state.clock;
  if (auto it = replay_end_clock_.find(graph.value); it != replay_end_clock_.end()) join(base, it->second);
  for (int node_index : order) {
    const auto node = static_cast<size_t>(node_index);
    const GraphNode& graph_node = topology.nodes[node];
    Clock clock = base;  // every node runs after the replay stream's work so far
    for (int p : graph_node.predecessors) join(clock, clocks[static_cast<size_t>(p)]);
    const uint32_t lane = pick_lane(clock, graph_node.predecessors, lane_of_node);
    lane_of_node[node] = lane;
    const uint32_t component = lane_component_[lane];
    if (clock.size() <= component) clock.resize(component + 1, 0);
    const uint64_t epoch = ++lane_epoch_[lane];
    clock[component] = epoch;
    Site site;
    site.uid = graph_node_uid(graph, node);
    site.seq = node;
    site.op = intern(graph_node.launch.op);
    site.stream = stream.value;
    site.graph = graph.value;
    site.source = Hazard::graph_node;
    for (const Access& access : graph_node.launch.accesses) check_and_record(access, clock, component, epoch, site);
    clocks[node] = std::move(clock);
  }
  // The replay completes on its stream: later work there is ordered after every node.
  for (const Clock& clock : clocks) join(state.clock, clock);
  replay_end_clock_[graph.value] = state.clock;
}

// ---- shadow history ------------------------------------------------------------------------------

void HazardDetector::check_and_record(const Access& access, const Clock& clock, uint32_t component,
                                      uint64_t epoch, const Site& site) {
  const uint64_t begin = access.range.begin;
  const uint64_t end = access.range.end;
  DSV4_ASSERT(begin <= end, "access range ends before it begins");
  if (begin == end) return;
  BufferState& buffer = buffer_state(access.range.buffer);
  std::vector<Entry>& entries = buffer.entries;
  const bool writes = is_write(access.kind);

  // Entries are sorted by begin and none is longer than entry_bytes_max, so an overlapping entry
  // begins after begin - entry_bytes_max.
  const uint64_t scan_from = begin + 1 > buffer.entry_bytes_max ? begin + 1 - buffer.entry_bytes_max : 0;
  auto first = std::lower_bound(entries.begin(), entries.end(), scan_from,
                                [](const Entry& e, uint64_t at_bytes) { return e.begin_bytes < at_bytes; });
  const auto window_begin = static_cast<size_t>(first - entries.begin());
  // The window [window_begin, window_end) holds every entry that can overlap; it is rebuilt in
  // scratch and written back, so the common overwrite of one entry moves nothing else.
  scratch_window_.clear();
  scratch_right_.clear();
  size_t window_end = window_begin;
  for (; window_end < entries.size() && entries[window_end].begin_bytes < end; ++window_end) {
    const Entry& e = entries[window_end];
    if (collectable(e)) continue;  // ordered before everything issued from now on
    if (e.end_bytes <= begin) {
      scratch_window_.push_back(e);
      continue;
    }
    const bool ordered = e.epoch <= at(clock, e.component);
    if (!ordered && (writes || is_write(e.kind))) {
      report(e.site, e.kind, site, access.kind, access.range.buffer.value, std::max(begin, e.begin_bytes),
             std::min(end, e.end_bytes), false);
    }
    // The new access stands in for the covered bytes of an earlier one ordered before it: any
    // later access racing with the old one races with the new one too.
    if (ordered && options_.prune_history && (writes || !is_write(e.kind))) {
      if (e.begin_bytes < begin) {
        scratch_window_.push_back(e);
        scratch_window_.back().end_bytes = begin;
      }
      if (e.end_bytes > end) {
        scratch_right_.push_back(e);
        scratch_right_.back().begin_bytes = end;
      }
      continue;
    }
    scratch_window_.push_back(e);
  }
  // Right remainders begin at `end`, at or after every begin in the window: they go last.
  scratch_window_.insert(scratch_window_.end(), scratch_right_.begin(), scratch_right_.end());

  Entry mine;
  mine.begin_bytes = begin;
  mine.end_bytes = end;
  mine.epoch = epoch;
  mine.component = component;
  mine.kind = access.kind;
  mine.site = site;
  // A host access is ordered before everything issued later, so it never needs remembering.
  if (!collectable(mine)) {
    auto at_pos = std::upper_bound(scratch_window_.begin(), scratch_window_.end(), begin,
                                   [](uint64_t at_bytes, const Entry& e) { return at_bytes < e.begin_bytes; });
    scratch_window_.insert(at_pos, mine);
  }
  const size_t old_size = window_end - window_begin;
  const size_t new_size = scratch_window_.size();
  const size_t common = std::min(old_size, new_size);
  const auto common_diff = static_cast<std::ptrdiff_t>(common);
  std::copy(scratch_window_.begin(), scratch_window_.begin() + common_diff,
            entries.begin() + static_cast<std::ptrdiff_t>(window_begin));
  if (new_size > old_size) {
    entries.insert(entries.begin() + static_cast<std::ptrdiff_t>(window_end), scratch_window_.begin() + common_diff,
                   scratch_window_.end());
  } else {
    entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(window_begin + new_size),
                  entries.begin() + static_cast<std::ptrdiff_t>(window_end));
  }
  buffer.entry_bytes_max = std::max(buffer.entry_bytes_max, end - begin);
  if (entries.size() >= buffer.sweep_at_entries) sweep(buffer);
}

void HazardDetector::sweep(BufferState& buffer) {
  std::erase_if(buffer.entries, [&](const Entry& e) { return collectable(e); });
  // Amortized: sweep again only after the live set doubles.
  buffer.sweep_at_entries = std::max<size_t>(64, 2 * buffer.entries.size());
  uint64_t bytes_max = 0;
  for (const Entry& e : buffer.entries) bytes_max = std::max(bytes_max, e.end_bytes - e.begin_bytes);
  buffer.entry_bytes_max = bytes_max;
}

void HazardDetector::report(const Site& first, AccessKind first_kind, const Site& second, AccessKind second_kind,
                            int32_t buffer, uint64_t begin_bytes, uint64_t end_bytes, bool in_graph) {
  if (hazards_.size() >= options_.hazards_max) {
    ++hazards_dropped_;
    return;
  }
  const PairKey key{std::min(first.uid, second.uid), std::max(first.uid, second.uid), buffer};
  if (!reported_.insert(key).second) return;
  Hazard h;
  h.kind = !is_write(first_kind) ? Hazard::war : (is_write(second_kind) ? Hazard::waw : Hazard::raw);
  const auto buffer_index = static_cast<size_t>(buffer);
  h.buffer = buffer_index < buffers_.size() && buffers_[buffer_index].created ? buffers_[buffer_index].name
                                                                              : "buffer" + std::to_string(buffer);
  h.begin_bytes = begin_bytes;
  h.end_bytes = end_bytes;
  h.first_op = op_names_[first.op];
  h.second_op = op_names_[second.op];
  h.first_seq = first.seq;
  h.second_seq = second.seq;
  h.first_stream = stream_name(first.stream);
  h.second_stream = stream_name(second.stream);
  h.in_graph = in_graph;
  h.first_source = first.source;
  h.second_source = second.source;
  h.first_graph = first.graph;
  h.second_graph = second.graph;
  hazards_.push_back(std::move(h));
}

void HazardDetector::clear() {
  hazards_.clear();
  hazards_dropped_ = 0;
  reported_.clear();
}

size_t HazardDetector::history_entries() const {
  size_t total = 0;
  for (const BufferState& b : buffers_) total += b.entries.size();
  return total;
}

}  // namespace dsv4::rt
