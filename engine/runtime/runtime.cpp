#include "engine/runtime/runtime.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "engine/core/error.h"

namespace dsv4::rt {

namespace {

std::vector<int> merged(std::vector<int> a, const std::vector<int>& b) {
  for (int v : b) {
    if (std::find(a.begin(), a.end(), v) == a.end()) a.push_back(v);
  }
  std::sort(a.begin(), a.end());
  return a;
}

}  // namespace

Runtime::Runtime(RuntimeOptions options) : options_(options) {
  DSV4_ASSERT(options_.devices >= 1, "a runtime needs at least one device");
}

Runtime::~Runtime() = default;

std::vector<OpTime> summarize_op_times(const std::vector<std::pair<std::string, double>>& samples) {
  std::map<std::string, OpTime> by_op;
  for (const auto& [op, ms] : samples) {
    OpTime& t = by_op[op];
    t.op = op;
    ++t.launches;
    t.ms += ms;
  }
  std::vector<OpTime> out;
  out.reserve(by_op.size());
  for (auto& [op, t] : by_op) out.push_back(std::move(t));
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

void Runtime::add_observer(RuntimeObserver* observer) {
  DSV4_ASSERT(observer != nullptr, "null observer");
  observers_.push_back(observer);
}

void Runtime::notify(const std::function<void(RuntimeObserver&)>& fn) {
  for (RuntimeObserver* o : observers_) fn(*o);
}

void Runtime::check_stream(StreamId stream) const {
  if (stream.value < 0 || stream.value >= static_cast<int32_t>(streams_.size())) {
    throw ContractError("runtime", "stream", "no stream with id " + std::to_string(stream.value));
  }
}

void Runtime::check_event(EventId event) const {
  if (event.value < 0 || event.value >= static_cast<int32_t>(events_.size())) {
    throw ContractError("runtime", "event", "no event with id " + std::to_string(event.value));
  }
}

void Runtime::check_range(const ByteRange& range, const char* what) const {
  if (range.buffer.value < 0 || range.buffer.value >= static_cast<int32_t>(buffers_.size())) {
    throw ContractError("runtime", what, "no buffer with id " + std::to_string(range.buffer.value));
  }
  const BufferRecord& b = buffers_[static_cast<size_t>(range.buffer.value)];
  if (!b.live) throw ContractError("runtime", what, "buffer '" + b.name + "' was freed");
  if (range.begin > range.end || range.end > b.bytes) {
    throw ContractError("runtime", what,
                        "bytes [" + std::to_string(range.begin) + ", " + std::to_string(range.end) + ") outside '" +
                            b.name + "' of " + std::to_string(b.bytes) + " bytes");
  }
}

// ---- buffers ----

BufferId Runtime::alloc(int device, uint64_t bytes, const std::string& name, DType poison) {
  if (device < 0 || device >= options_.devices) {
    throw ContractError("alloc", name, "device " + std::to_string(device) + " does not exist");
  }
  if (allocators_.empty()) {
    for (int d = 0; d < options_.devices; ++d) {
      allocators_.push_back(std::make_unique<Allocator>(memory(d), options_.allocator_mode));
    }
  }
  // The cache hands back the same buffer id for the same memory, so the hazard detector sees the
  // new owner's accesses against the old owner's still-queued ones.
  if (options_.caching_allocator) {
    for (size_t i = 0; i < buffers_.size(); ++i) {
      BufferRecord& b = buffers_[i];
      if (!b.live && b.storage && b.device == device && b.bytes == bytes) {
        b.live = true;
        b.name = name;
        if (options_.allocator_mode == AllocatorMode::testing && bytes > 0) {
          // Poisoned again for its new owner: a stale reader still queued on the old owner's work
          // then reads NaN or the sentinel instead of plausible values.
          const std::vector<uint8_t> pattern = poison_pattern(poison);
          std::vector<uint8_t> image(bytes);
          for (size_t k = 0; k < image.size(); ++k) image[k] = pattern[k % pattern.size()];
          b.storage->space().copy_from_host(b.storage->data(), image.data(), image.size());
        }
        const BufferId id{static_cast<int32_t>(i)};
        notify([&](RuntimeObserver& o) { o.on_buffer_created(id, device, name, bytes); });
        return id;
      }
    }
  }
  BufferRecord record;
  record.storage = allocators_[static_cast<size_t>(device)]->allocate(bytes, poison, name);
  record.name = name;
  record.device = device;
  record.bytes = bytes;
  buffers_.push_back(std::move(record));
  const BufferId id{static_cast<int32_t>(buffers_.size() - 1)};
  notify([&](RuntimeObserver& o) { o.on_buffer_created(id, device, name, bytes); });
  return id;
}

void Runtime::free(BufferId buffer) {
  check_range(ByteRange{buffer, 0, 0}, "buffer");
  BufferRecord& b = buffers_[static_cast<size_t>(buffer.value)];
  b.live = false;
  if (!options_.caching_allocator) {
    // Like cudaFree, returning memory without a cache waits for all work on the device first.
    synchronize_device(b.device);
    b.storage.reset();  // back to the allocator (guards checked there)
  }
}

void* Runtime::data(BufferId buffer) const {
  check_range(ByteRange{buffer, 0, 0}, "buffer");
  return buffers_[static_cast<size_t>(buffer.value)].storage->data();
}

Tensor Runtime::tensor(BufferId buffer, DType dtype, const Shape& shape, int64_t offset) const {
  check_range(ByteRange{buffer, 0, 0}, "buffer");
  return Tensor::over(buffers_[static_cast<size_t>(buffer.value)].storage, dtype, shape, offset);
}

const std::string& Runtime::name(BufferId buffer) const {
  DSV4_ASSERT(buffer.value >= 0 && buffer.value < static_cast<int32_t>(buffers_.size()), "bad buffer id");
  return buffers_[static_cast<size_t>(buffer.value)].name;
}

uint64_t Runtime::bytes(BufferId buffer) const {
  check_range(ByteRange{buffer, 0, 0}, "buffer");
  return buffers_[static_cast<size_t>(buffer.value)].bytes;
}

int Runtime::device_of(BufferId buffer) const {
  check_range(ByteRange{buffer, 0, 0}, "buffer");
  return buffers_[static_cast<size_t>(buffer.value)].device;
}

ByteRange Runtime::range(BufferId buffer, uint64_t begin, uint64_t end) const {
  const ByteRange r{buffer, begin, end};
  check_range(r, "range");
  return r;
}

void Runtime::upload(BufferId buffer, uint64_t offset, const void* src, uint64_t size) {
  const ByteRange r{buffer, offset, offset + size};
  check_range(r, "upload");
  notify([&](RuntimeObserver& o) { o.on_host_access(Access{r, AccessKind::write}); });
  const BufferRecord& b = buffers_[static_cast<size_t>(buffer.value)];
  b.storage->space().copy_from_host(static_cast<uint8_t*>(b.storage->data()) + offset, src, size);
}

void Runtime::download(BufferId buffer, uint64_t offset, void* dst, uint64_t size) {
  const ByteRange r{buffer, offset, offset + size};
  check_range(r, "download");
  notify([&](RuntimeObserver& o) { o.on_host_access(Access{r, AccessKind::read}); });
  const BufferRecord& b = buffers_[static_cast<size_t>(buffer.value)];
  b.storage->space().copy_to_host(dst, static_cast<const uint8_t*>(b.storage->data()) + offset, size);
}

std::vector<GuardDamage> Runtime::check_guards() const {
  std::vector<GuardDamage> out;
  for (const auto& a : allocators_) {
    auto d = a->check_guards();
    out.insert(out.end(), d.begin(), d.end());
  }
  return out;
}

// ---- streams, events, launches ----

StreamId Runtime::create_stream(int device, const std::string& name) {
  if (device < 0 || device >= options_.devices) {
    throw ContractError("create_stream", name, "device " + std::to_string(device) + " does not exist");
  }
  streams_.push_back(StreamRecord{name, device, -1, {}});
  const StreamId id{static_cast<int32_t>(streams_.size() - 1)};
  do_create_stream(id);
  notify([&](RuntimeObserver& o) { o.on_stream_created(id, device, name); });
  return id;
}

EventId Runtime::create_event(const std::string& name) {
  events_.push_back(EventRecord{name, -1, {}, false});
  const EventId id{static_cast<int32_t>(events_.size() - 1)};
  do_create_event(id);
  return id;
}

const std::string& Runtime::name(StreamId stream) const {
  check_stream(stream);
  return streams_[static_cast<size_t>(stream.value)].name;
}

int Runtime::device_of(StreamId stream) const {
  check_stream(stream);
  return streams_[static_cast<size_t>(stream.value)].device;
}

bool Runtime::capturing(StreamId stream) const {
  check_stream(stream);
  return streams_[static_cast<size_t>(stream.value)].capture >= 0;
}

void Runtime::launch(StreamId stream, Launch launch) {
  check_stream(stream);
  if (launch.check_contract) launch.check_contract();
  for (const Access& a : launch.accesses) check_range(a.range, launch.op.c_str());
  if (!launch.host && !launch.cooperative && !launch.cuda) {
    throw ContractError(launch.op, "launch", "has no implementation for any backend");
  }
  do_check_launch(launch);  // refused launches are never reported as issued
  const uint64_t seq = ++launch_seq_;
  StreamRecord& s = streams_[static_cast<size_t>(stream.value)];
  const bool capturing = s.capture >= 0;
  notify([&](RuntimeObserver& o) { o.on_launch(stream, seq, launch, capturing); });
  if (capturing) {
    GraphTopology& g = captures_[static_cast<size_t>(s.capture)].graph;
    g.nodes.push_back(GraphNode{launch, stream, s.frontier});
    s.frontier = {static_cast<int>(g.nodes.size() - 1)};
  }
  do_launch(stream, seq, launch, capturing);
}

void Runtime::copy(StreamId stream, ByteRange dst, ByteRange src) {
  check_range(dst, "copy dst");
  check_range(src, "copy src");
  if (dst.end - dst.begin != src.end - src.begin) throw ContractError("copy", "dst", "size differs from src");
  Launch l;
  l.op = "copy";
  l.accesses = {Access{src, AccessKind::read}, Access{dst, AccessKind::write}};
  const BufferRecord& d = buffers_[static_cast<size_t>(dst.buffer.value)];
  const BufferRecord& s = buffers_[static_cast<size_t>(src.buffer.value)];
  uint8_t* to = static_cast<uint8_t*>(d.storage->data()) + dst.begin;
  const uint8_t* from = static_cast<const uint8_t*>(s.storage->data()) + src.begin;
  const uint64_t size = dst.end - dst.begin;
  MemorySpace* space = &d.storage->space();
  l.host = [space, to, from, size] { space->copy_within(to, from, size); };
  l.cuda = [space, to, from, size](void* cuda_stream) { space->copy_within_async(to, from, size, cuda_stream); };
  launch(stream, std::move(l));
}

void Runtime::record(EventId event, StreamId stream) {
  check_event(event);
  check_stream(stream);
  StreamRecord& s = streams_[static_cast<size_t>(stream.value)];
  EventRecord& e = events_[static_cast<size_t>(event.value)];
  e.capture = s.capture;
  e.frontier = s.frontier;
  e.recorded = true;
  notify([&](RuntimeObserver& o) { o.on_event_record(event, stream); });
  do_record(event, stream, s.capture >= 0);
}

void Runtime::wait(StreamId stream, EventId event) {
  check_event(event);
  check_stream(stream);
  StreamRecord& s = streams_[static_cast<size_t>(stream.value)];
  const EventRecord& e = events_[static_cast<size_t>(event.value)];
  if (e.capture >= 0) {
    // Waiting on an event recorded inside a capture pulls this stream into that capture.
    if (s.capture >= 0 && s.capture != e.capture) {
      throw ContractError("wait", name(stream), "stream is part of another capture");
    }
    if (s.capture < 0) {
      s.capture = e.capture;
      s.frontier.clear();
      captures_[static_cast<size_t>(e.capture)].joined.push_back(stream);
    }
    s.frontier = merged(s.frontier, e.frontier);
  } else if (s.capture >= 0 && e.recorded) {
    throw ContractError("wait", s.name, "a capturing stream cannot wait on event '" + e.name +
                                            "' recorded outside the capture (the graph would lose the edge)");
  }
  notify([&](RuntimeObserver& o) { o.on_stream_wait(stream, event); });
  do_wait(stream, event, s.capture >= 0);
}

bool Runtime::query(EventId event) {
  check_event(event);
  if (events_[static_cast<size_t>(event.value)].capture >= 0) {
    throw ContractError("query", events_[static_cast<size_t>(event.value)].name, "event belongs to a capture");
  }
  return do_query(event);
}

void Runtime::synchronize(EventId event) {
  check_event(event);
  if (events_[static_cast<size_t>(event.value)].capture >= 0) {
    throw ContractError("synchronize", events_[static_cast<size_t>(event.value)].name, "event belongs to a capture");
  }
  do_synchronize_event(event);
  notify([&](RuntimeObserver& o) { o.on_host_sync_event(event); });
}

void Runtime::synchronize(StreamId stream) {
  check_stream(stream);
  if (capturing(stream)) throw ContractError("synchronize", name(stream), "not allowed while the stream captures");
  do_synchronize_stream(stream);
  notify([&](RuntimeObserver& o) { o.on_host_sync_stream(stream); });
}

void Runtime::synchronize_device(int device) {
  if (device < 0 || device >= options_.devices) {
    throw ContractError("synchronize_device", "device", std::to_string(device) + " does not exist");
  }
  for (size_t i = 0; i < streams_.size(); ++i) {
    if (streams_[i].device == device && streams_[i].capture >= 0) {
      throw ContractError("synchronize_device", streams_[i].name, "not allowed while a stream captures");
    }
  }
  do_synchronize_device(device);
  notify([&](RuntimeObserver& o) { o.on_host_sync_device(device); });
}

// ---- graphs ----

void Runtime::begin_capture(StreamId stream) {
  check_stream(stream);
  StreamRecord& s = streams_[static_cast<size_t>(stream.value)];
  if (s.capture >= 0) throw ContractError("begin_capture", s.name, "stream is already capturing");
  captures_.push_back(CaptureRecord{stream, {}, {}});
  s.capture = static_cast<int>(captures_.size() - 1);
  s.frontier.clear();
  notify([&](RuntimeObserver& o) { o.on_capture_begin(stream); });
  do_begin_capture(stream);
}

GraphId Runtime::end_capture(StreamId stream) {
  check_stream(stream);
  StreamRecord& s = streams_[static_cast<size_t>(stream.value)];
  if (s.capture < 0 || captures_[static_cast<size_t>(s.capture)].origin.value != stream.value) {
    throw ContractError("end_capture", s.name, "stream did not begin a capture");
  }
  const int index = s.capture;
  CaptureRecord& c = captures_[static_cast<size_t>(index)];
  // As CUDA requires, every stream forked into the capture must have been joined back: its last
  // captured work must be an ancestor of the origin's.
  std::vector<bool> ancestor(c.graph.nodes.size(), false);
  std::vector<int> todo = s.frontier;
  while (!todo.empty()) {
    const int n = todo.back();
    todo.pop_back();
    if (ancestor[static_cast<size_t>(n)]) continue;
    ancestor[static_cast<size_t>(n)] = true;
    for (int p : c.graph.nodes[static_cast<size_t>(n)].predecessors) todo.push_back(p);
  }
  for (StreamId joined : c.joined) {
    for (int n : streams_[static_cast<size_t>(joined.value)].frontier) {
      if (!ancestor[static_cast<size_t>(n)]) {
        throw ContractError("end_capture", streams_[static_cast<size_t>(joined.value)].name,
                            "forked into the capture of '" + s.name + "' and never joined back into it");
      }
    }
  }
  for (size_t i = 0; i < streams_.size(); ++i) {
    if (streams_[i].capture == index) {
      streams_[i].capture = -1;
      streams_[i].frontier.clear();
    }
  }
  for (auto& e : events_) {
    if (e.capture == index) {
      e.capture = -1;
      e.frontier.clear();
      e.recorded = false;  // an event recorded only inside the capture is not recorded outside it
    }
  }
  graphs_.push_back(std::move(c.graph));
  const GraphId id{static_cast<int32_t>(graphs_.size() - 1)};
  do_end_capture(id);
  notify([&](RuntimeObserver& o) { o.on_capture_end(stream, id, graphs_[static_cast<size_t>(id.value)]); });
  return id;
}

const GraphTopology& Runtime::topology(GraphId graph) const {
  DSV4_ASSERT(graph.value >= 0 && graph.value < static_cast<int32_t>(graphs_.size()), "bad graph id");
  return graphs_[static_cast<size_t>(graph.value)];
}

void Runtime::replay(GraphId graph, StreamId stream) {
  check_stream(stream);
  if (graph.value < 0 || graph.value >= static_cast<int32_t>(graphs_.size())) {
    throw ContractError("replay", "graph", "no graph with id " + std::to_string(graph.value));
  }
  if (capturing(stream)) throw ContractError("replay", name(stream), "cannot replay into a capturing stream");
  // As cudaGraphLaunch does, a replay is ordered after the previous replays of the same graph, on
  // whatever stream they ran: an internal event, recorded after each replay, is waited on first.
  if (graph_replay_events_.size() < graphs_.size()) graph_replay_events_.resize(graphs_.size(), EventId{});
  EventId& previous = graph_replay_events_[static_cast<size_t>(graph.value)];
  if (previous.value >= 0) do_wait(stream, previous, false);
  notify([&](RuntimeObserver& o) { o.on_graph_replay(graph, stream, graphs_[static_cast<size_t>(graph.value)]); });
  do_replay(graph, stream);
  if (previous.value < 0) {
    events_.push_back(EventRecord{"replay of graph " + std::to_string(graph.value), -1, {}, false});
    previous = EventId{static_cast<int32_t>(events_.size() - 1)};
    do_create_event(previous);
  }
  events_[static_cast<size_t>(previous.value)].recorded = true;
  do_record(previous, stream, false);
}

// ---- collectives ----

int Runtime::create_communicator(std::vector<StreamId> rank_streams, const std::string& name) {
  if (rank_streams.empty()) throw ContractError("create_communicator", name, "needs at least one rank");
  for (size_t i = 0; i < rank_streams.size(); ++i) {
    check_stream(rank_streams[i]);
    for (size_t j = 0; j < i; ++j) {
      if (rank_streams[j] == rank_streams[i]) {
        throw ContractError("create_communicator", name, "ranks " + std::to_string(j) + " and " + std::to_string(i) +
                                                             " share stream '" + streams_[static_cast<size_t>(rank_streams[i].value)].name + "'");
      }
    }
  }
  CommunicatorRecord c;
  c.name = name;
  c.pending.resize(rank_streams.size());
  c.streams = std::move(rank_streams);
  communicators_.push_back(std::move(c));
  return static_cast<int>(communicators_.size() - 1);
}

int Runtime::join_communicator(StreamId stream, int rank, int world, const std::string& rendezvous_file,
                               const std::string& name) {
  check_stream(stream);
  if (kind() == BackendKind::sim) {
    throw ContractError("join_communicator", name, "the sim backend runs every rank in one process: use create_communicator");
  }
  if (world < 1) throw ContractError("join_communicator", "world", "must be >= 1, got " + std::to_string(world));
  if (rank < 0 || rank >= world) {
    throw ContractError("join_communicator", "rank", std::to_string(rank) + " outside [0, " + std::to_string(world) + ")");
  }
  if (rendezvous_file.empty()) throw ContractError("join_communicator", "rendezvous_file", "must name a path");
  CommunicatorRecord c;
  c.name = name;
  c.streams = {stream};
  c.pending.resize(1);
  c.local_rank = rank;
  c.world = world;
  c.rendezvous_file = rendezvous_file;
  communicators_.push_back(std::move(c));
  return static_cast<int>(communicators_.size() - 1);
}

void Runtime::issue_collective(int comm, CollectivePart part) {
  if (comm < 0 || comm >= static_cast<int>(communicators_.size())) {
    throw ContractError(part.op, "communicator", "no communicator with id " + std::to_string(comm));
  }
  CommunicatorRecord& c = communicators_[static_cast<size_t>(comm)];
  const bool spanning = c.local_rank >= 0;
  const int n = spanning ? c.world : static_cast<int>(c.streams.size());
  if (part.rank < 0 || part.rank >= n) throw ContractError(part.op, "rank", std::to_string(part.rank) + " not in the communicator");
  if (spanning && part.rank != c.local_rank) {
    throw ContractError(part.op, "rank", "this process holds rank " + std::to_string(c.local_rank) + " of '" + c.name +
                                             "', not rank " + std::to_string(part.rank));
  }
  const StreamId own = c.streams[spanning ? 0 : static_cast<size_t>(part.rank)];
  if ((part.op == "send" || part.op == "recv") && (part.peer < 0 || part.peer >= n || part.peer == part.rank)) {
    throw ContractError(part.op, "peer", std::to_string(part.peer) + " is not another rank of the communicator");
  }
  if (capturing(own)) {
    throw ContractError(part.op, "stream", "collectives are not captured into graphs here");
  }
  // The size of an all_gather/all_reduce part is checked against the rank's own buffers before it
  // is queued, so a refused part never blocks the communicator.
  const uint64_t send_bytes = part.send.end - part.send.begin;
  const uint64_t recv_bytes = part.recv.end - part.recv.begin;
  if (part.op == "all_gather" && recv_bytes != send_bytes * static_cast<uint64_t>(n)) {
    throw ContractError(part.op, "recv", "holds " + std::to_string(recv_bytes) + " bytes, needs " +
                                             std::to_string(n) + " x " + std::to_string(send_bytes));
  }
  if (spanning) {
    // The other ranks live in other processes; NCCL matches the parts there.
    std::vector<Access> accesses;
    if (part.send.buffer.value >= 0) accesses.push_back(Access{part.send, AccessKind::read});
    if (part.recv.buffer.value >= 0) accesses.push_back(Access{part.recv, AccessKind::write});
    notify([&](RuntimeObserver& o) { o.on_collective(part.op, {own}, {accesses}); });
    do_collective(comm, {part});
    return;
  }
  do_collective_issued(comm, part);
  c.pending[static_cast<size_t>(part.rank)].push_back(part);
  match_collectives(comm);
}

std::optional<Runtime::Unmatched> Runtime::unmatched_part(int comm, int rank) const {
  const CommunicatorRecord& c = communicators_[static_cast<size_t>(comm)];
  if (c.local_rank >= 0 || c.pending[static_cast<size_t>(rank)].empty()) return std::nullopt;
  const CollectivePart& part = c.pending[static_cast<size_t>(rank)].front();
  std::vector<int> missing;
  std::string what;
  if (part.op == "send" || part.op == "recv") {
    missing.push_back(part.peer);
    what = std::string(", which never issued the matching ") + (part.op == "send" ? "recv" : "send");
  } else {
    for (size_t q = 0; q < c.pending.size(); ++q) {
      if (c.pending[q].empty()) missing.push_back(static_cast<int>(q));
    }
    what = missing.size() == 1 ? ", which never issued its part" : ", which never issued their parts";
  }
  const std::string head = part.op + " of '" + c.name + "' (rank " + std::to_string(part.rank) + ")";
  if (missing.empty()) return Unmatched{part.op, head + " never matched although every rank issued a part"};
  std::string ranks;
  for (int q : missing) ranks += (ranks.empty() ? "" : ", ") + std::to_string(q);
  return Unmatched{part.op, head + " waits for rank" + (missing.size() == 1 ? " " : "s ") + ranks + what};
}

void Runtime::match_collectives(int comm) {
  CommunicatorRecord& c = communicators_[static_cast<size_t>(comm)];
  const int n = static_cast<int>(c.streams.size());
  auto accesses_of = [](const CollectivePart& p) {
    std::vector<Access> a;
    a.reserve(2);  // also keeps GCC 13's -Wstringop-overflow from a false positive in push_back
    if (p.send.buffer.value >= 0) a.push_back(Access{p.send, AccessKind::read});
    if (p.recv.buffer.value >= 0) a.push_back(Access{p.recv, AccessKind::write});
    return a;
  };
  // One match can expose another (a rank's next part reaches the front), so repeat until nothing
  // matches; each round removes at least one part, which bounds the loop.
  size_t pending_parts = 0;
  for (const auto& q : c.pending) pending_parts += q.size();
  for (size_t round = 0; round <= pending_parts; ++round) {
    bool matched_any = false;
    // Point to point: a rank's front send/recv and its peer's front opposite part.
    for (int r = 0; r < n && !matched_any; ++r) {
      auto& mine = c.pending[static_cast<size_t>(r)];
      if (mine.empty() || (mine.front().op != "send" && mine.front().op != "recv")) continue;
      auto& theirs = c.pending[static_cast<size_t>(mine.front().peer)];
      if (theirs.empty()) continue;
      const CollectivePart a = mine.front();
      const CollectivePart b = theirs.front();
      const bool matched = ((a.op == "send" && b.op == "recv") || (a.op == "recv" && b.op == "send")) &&
                           a.peer == b.rank && b.peer == a.rank;
      if (!matched) continue;
      mine.erase(mine.begin());
      theirs.erase(theirs.begin());
      const CollectivePart& sender = a.op == "send" ? a : b;
      const CollectivePart& receiver = a.op == "send" ? b : a;
      if (sender.send.end - sender.send.begin != receiver.recv.end - receiver.recv.begin) {
        do_collective_dropped(comm, {a, b});
        throw ContractError("send/recv", "data", "rank " + std::to_string(sender.rank) + " sends " +
                                                     std::to_string(sender.send.end - sender.send.begin) + " bytes, rank " +
                                                     std::to_string(receiver.rank) + " receives " +
                                                     std::to_string(receiver.recv.end - receiver.recv.begin));
      }
      const std::vector<StreamId> streams = {c.streams[static_cast<size_t>(sender.rank)],
                                             c.streams[static_cast<size_t>(receiver.rank)]};
      notify([&](RuntimeObserver& o) { o.on_collective("send/recv", streams, {accesses_of(sender), accesses_of(receiver)}); });
      do_collective(comm, {sender, receiver});
      matched_any = true;
    }
    if (matched_any) continue;
    // Group collectives: run once every rank has one at the front, in order.
    bool all_present = true;
    for (const auto& q : c.pending) {
      if (q.empty() || q.front().op == "send" || q.front().op == "recv") all_present = false;
    }
    if (!all_present) return;
    std::vector<CollectivePart> parts;
    for (auto& q : c.pending) {
      parts.push_back(q.front());
      q.erase(q.begin());
    }
    // Taken off the queues first: a mismatched group is refused without wedging the communicator.
    for (const auto& p : parts) {
      if (p.op != parts[0].op) {
        do_collective_dropped(comm, parts);
        throw ContractError(parts[0].op, "rank " + std::to_string(p.rank), "issued " + p.op + " where rank 0 issued " + parts[0].op);
      }
      const uint64_t bytes = p.send.end - p.send.begin;
      const uint64_t first = parts[0].send.end - parts[0].send.begin;
      if (bytes != first) {
        do_collective_dropped(comm, parts);
        throw ContractError(p.op, "rank " + std::to_string(p.rank), "sends " + std::to_string(bytes) +
                                                                       " bytes, rank 0 sends " + std::to_string(first));
      }
    }
    std::vector<std::vector<Access>> accesses;
    for (const auto& p : parts) accesses.push_back(accesses_of(p));
    notify([&](RuntimeObserver& o) { o.on_collective(parts[0].op, c.streams, accesses); });
    do_collective(comm, parts);
  }
}

void Runtime::all_gather(int comm, int rank, ByteRange send, ByteRange recv) {
  check_range(send, "all_gather send");
  check_range(recv, "all_gather recv");
  issue_collective(comm, CollectivePart{"all_gather", rank, -1, send, recv});
}

void Runtime::all_reduce_sum_f32(int comm, int rank, ByteRange send, ByteRange recv) {
  check_range(send, "all_reduce send");
  check_range(recv, "all_reduce recv");
  if (send.end - send.begin != recv.end - recv.begin || (send.end - send.begin) % 4 != 0) {
    throw ContractError("all_reduce", "recv", "send and recv must be the same whole number of f32");
  }
  issue_collective(comm, CollectivePart{"all_reduce", rank, -1, send, recv});
}

void Runtime::send(int comm, int rank, int peer, ByteRange data) {
  check_range(data, "send");
  issue_collective(comm, CollectivePart{"send", rank, peer, data, ByteRange{}});
}

void Runtime::recv(int comm, int rank, int peer, ByteRange data) {
  check_range(data, "recv");
  issue_collective(comm, CollectivePart{"recv", rank, peer, ByteRange{}, data});
}

void Runtime::barrier(int comm, int rank) { issue_collective(comm, CollectivePart{"barrier", rank, -1, {}, {}}); }

}  // namespace dsv4::rt
