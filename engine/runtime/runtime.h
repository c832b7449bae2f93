// engine/runtime: the one small API through which all device work goes (design.md, "The runtime"):
// devices, buffers, streams, events, graphs, launches and collectives. Two backends implement it —
// `sim`, a deterministic simulated GPU on the CPU, and `cuda` — and detectors sit above both: every
// call reaches the RuntimeObservers in host issue order, which is what the hazard detector's
// happens-before reasoning needs (it judges the program, not the schedule that happened to run).
#pragma once

#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/allocator.h"
#include "engine/core/cooperative.h"
#include "engine/core/tensor.h"

namespace dsv4::rt {

enum class BackendKind { sim, cuda };

// Handles are indices into the runtime's tables; -1 is "none".
struct BufferId { int32_t value = -1; bool operator==(const BufferId&) const = default; };
struct StreamId { int32_t value = -1; bool operator==(const StreamId&) const = default; };
struct EventId { int32_t value = -1; bool operator==(const EventId&) const = default; };
struct GraphId { int32_t value = -1; bool operator==(const GraphId&) const = default; };

// Bytes [begin, end) of one buffer.
struct ByteRange {
  BufferId buffer;
  uint64_t begin = 0;
  uint64_t end = 0;
  bool overlaps(const ByteRange& other) const {
    return buffer == other.buffer && begin < other.end && other.begin < end;
  }
};

enum class AccessKind : uint8_t { read, write };
struct Access {
  ByteRange range;
  AccessKind kind = AccessKind::read;
};

// ---- launches ------------------------------------------------------------------------------------

struct Launch {
  std::string op;                 // the kernel's name, as reports show it
  std::vector<Access> accesses;   // every byte range it reads or writes (the launch contract's promise)
  int blocks = 1;                 // grid size; for cooperative kernels, the number of block coroutines
  std::function<void()> host;     // sim: runs the whole kernel on the host
  std::function<BlockTask(BlockContext&)> cooperative;  // sim: one coroutine per block instead of `host`
  std::function<void(void* cuda_stream)> cuda;          // cuda: enqueues the kernel on the stream
  // The op's launch contract (engine/core/contract.h), checked by Runtime::launch before anything
  // else happens: it throws ContractError naming the op, the argument and the rule.
  std::function<void()> check_contract;
};

// A wait that can never be satisfied (a persistent kernel's blocks, a collective a rank never joins, a
// synchronization past its deadline). The process keeps running, so it can write its case file.
class HangError : public std::runtime_error {
 public:
  HangError(std::string kernel, std::vector<int> waiting_blocks, const std::string& detail)
      : std::runtime_error("hang in '" + kernel + "': " + detail),
        kernel_(std::move(kernel)),
        waiting_blocks_(std::move(waiting_blocks)) {}
  const std::string& kernel() const { return kernel_; }
  const std::vector<int>& waiting_blocks() const { return waiting_blocks_; }

 private:
  std::string kernel_;
  std::vector<int> waiting_blocks_;
};

// ---- graphs --------------------------------------------------------------------------------------

// A captured graph: its launches and the dependency edges capture derived from stream order and
// event waits (as CUDA stream capture does).
struct GraphNode {
  Launch launch;
  StreamId captured_on;
  std::vector<int> predecessors;  // indices of nodes this one depends on
};
struct GraphTopology {
  std::vector<GraphNode> nodes;
};

// ---- per-op device time -------------------------------------------------------------------------

// One op's share of the timed launches (CudaRuntime::time_ops): how many ran and their summed time.
struct OpTime {
  std::string op;
  int64_t launches = 0;
  double ms = 0.0;
};

// Sums (op, milliseconds) samples per op; the result runs from the largest total down, ties by name.
std::vector<OpTime> summarize_op_times(const std::vector<std::pair<std::string, double>>& samples);

// ---- observers -----------------------------------------------------------------------------------

// Sees every call in host issue order, on every backend. Launches issued during a capture are
// reported with `capturing` set: they do not run; the graph runs at each replay.
class RuntimeObserver {
 public:
  virtual ~RuntimeObserver() = default;
  virtual void on_stream_created(StreamId, int /*device*/, const std::string& /*name*/) {}
  virtual void on_buffer_created(BufferId, int /*device*/, const std::string& /*name*/, uint64_t /*bytes*/) {}
  virtual void on_launch(StreamId, uint64_t /*launch_seq*/, const Launch&, bool /*capturing*/) {}
  virtual void on_event_record(EventId, StreamId) {}
  virtual void on_stream_wait(StreamId, EventId) {}
  virtual void on_host_sync_stream(StreamId) {}
  virtual void on_host_sync_event(EventId) {}
  virtual void on_host_sync_device(int /*device*/) {}
  // The host reading or writing a buffer directly (upload, download, host-side metadata writes).
  virtual void on_host_access(const Access&) {}
  virtual void on_capture_begin(StreamId) {}
  virtual void on_capture_end(StreamId, GraphId, const GraphTopology&) {}
  virtual void on_graph_replay(GraphId, StreamId, const GraphTopology&) {}
  // One collective: each participant's stream and the byte ranges it reads and writes.
  virtual void on_collective(const std::string& /*op*/, const std::vector<StreamId>& /*streams*/,
                             const std::vector<std::vector<Access>>& /*accesses*/) {}
};

}  // namespace dsv4::rt

namespace dsv4::rt {

struct RuntimeOptions {
  int devices = 1;                                // sim: simulated devices; cuda: devices to use (<= present)
  AllocatorMode allocator_mode = AllocatorMode::plain;  // testing: guard bytes and poison on every buffer
  bool caching_allocator = true;                  // reuse freed buffers of the same size (off for sanitizers)
};

// The API. Public calls validate their arguments, tell the observers, then run the backend's hook.
// Buffers, streams and events live until the runtime is destroyed (or free() for buffers).
class Runtime {
 public:
  explicit Runtime(RuntimeOptions options);
  virtual ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  virtual BackendKind kind() const = 0;
  int device_count() const { return options_.devices; }
  const RuntimeOptions& options() const { return options_; }

  void add_observer(RuntimeObserver* observer);

  // ---- buffers ----
  // `poison` is the element type fresh memory is poisoned as in testing mode (NaN for floats, a
  // sentinel for integers); raw byte buffers keep the byte sentinel.
  BufferId alloc(int device, uint64_t bytes, const std::string& name, DType poison = DType::u8);
  // Returns the buffer's memory to the cache, where work still queued on it can race with the next
  // owner (exactly the reuse hazard the detector exists for); without the cache, the memory goes
  // back to the allocator after the device finished its work, as cudaFree does.
  void free(BufferId buffer);
  void* data(BufferId buffer) const;  // host pointer on sim, device pointer on cuda
  // The buffer as a contiguous tensor of `shape` from element `offset` (kernels' view of it).
  Tensor tensor(BufferId buffer, DType dtype, const Shape& shape, int64_t offset = 0) const;
  const std::string& name(BufferId buffer) const;
  uint64_t bytes(BufferId buffer) const;
  int device_of(BufferId buffer) const;
  ByteRange range(BufferId buffer, uint64_t begin, uint64_t end) const;
  ByteRange all(BufferId buffer) const { return range(buffer, 0, bytes(buffer)); }
  // Host <-> buffer copies, synchronous for the host (they wait for nothing: synchronize first).
  void upload(BufferId buffer, uint64_t offset, const void* src, uint64_t size);
  void download(BufferId buffer, uint64_t offset, void* dst, uint64_t size);
  // Guard damage of every live buffer (testing allocator mode).
  std::vector<GuardDamage> check_guards() const;

  // ---- streams, events, launches ----
  StreamId create_stream(int device, const std::string& name);
  EventId create_event(const std::string& name);
  const std::string& name(StreamId stream) const;
  int device_of(StreamId stream) const;
  void launch(StreamId stream, Launch launch);
  // A device-side copy, as a launch named "copy" that reads src and writes dst.
  void copy(StreamId stream, ByteRange dst, ByteRange src);
  void record(EventId event, StreamId stream);
  void wait(StreamId stream, EventId event);
  bool query(EventId event);
  void synchronize(EventId event);
  void synchronize(StreamId stream);
  void synchronize_device(int device);

  // ---- graphs ----
  // Work issued to `stream` (and to streams that wait on events recorded during the capture) is
  // recorded, not run, until end_capture.
  void begin_capture(StreamId stream);
  GraphId end_capture(StreamId stream);
  void replay(GraphId graph, StreamId stream);
  const GraphTopology& topology(GraphId graph) const;
  bool capturing(StreamId stream) const;

  // ---- collectives ----
  // A communicator over ranks 0..n-1 with one stream each. Every rank issues its part of each
  // collective (in the same order on all ranks); the collective runs once all have.
  int create_communicator(std::vector<StreamId> rank_streams, const std::string& name);
  // One rank of a communicator that spans processes (one process per GPU): this process holds rank
  // `rank` of `world`, on `stream`. The ranks meet through `rendezvous_file`, a path that must not
  // exist yet: rank 0 writes the communicator's id there, the others wait for it. Collectives are
  // then issued with this rank only. cuda backend only (sim runs all ranks in one process).
  int join_communicator(StreamId stream, int rank, int world, const std::string& rendezvous_file,
                        const std::string& name);
  void all_gather(int comm, int rank, ByteRange send, ByteRange recv);  // recv holds n * |send|, rank order
  void all_reduce_sum_f32(int comm, int rank, ByteRange send, ByteRange recv);
  void send(int comm, int rank, int peer, ByteRange data);
  void recv(int comm, int rank, int peer, ByteRange data);
  void barrier(int comm, int rank);

 protected:
  struct BufferRecord {
    std::shared_ptr<Storage> storage;
    std::string name;
    int device = 0;
    uint64_t bytes = 0;
    bool live = true;
  };
  struct StreamRecord {
    std::string name;
    int device = 0;
    int capture = -1;             // index into captures_ while capturing
    std::vector<int> frontier;    // the nodes the stream's next captured launch depends on
  };
  struct EventRecord {
    std::string name;
    int capture = -1;             // recorded inside a capture: the nodes it stands for
    std::vector<int> frontier;
    bool recorded = false;
  };
  struct CollectivePart {
    std::string op;
    int rank = 0;
    int peer = -1;
    ByteRange send, recv;
  };
  struct CommunicatorRecord {
    std::string name;
    std::vector<StreamId> streams;   // one per rank; a spanning communicator has only the local one
    int local_rank = -1;             // spanning processes: this process's rank
    int world = 0;                   // spanning processes: the number of ranks
    std::string rendezvous_file;
    std::vector<std::vector<CollectivePart>> pending;  // per rank, issued but not yet matched
  };

  // Backend hooks. The base has validated the arguments and told the observers.
  virtual MemorySpace& memory(int device) = 0;
  // A launch the backend cannot run (no implementation for it): throw ContractError. Called before
  // the launch is numbered or reported.
  virtual void do_check_launch(const Launch& launch) { (void)launch; }
  virtual void do_create_stream(StreamId stream) = 0;
  virtual void do_create_event(EventId event) = 0;
  // `capturing`: the stream is capturing; the base has added the launch to the graph being built
  // (sim runs nothing now; cuda enqueues it so that CUDA's own capture records it).
  virtual void do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) = 0;
  virtual void do_record(EventId event, StreamId stream, bool capturing) = 0;
  virtual void do_wait(StreamId stream, EventId event, bool capturing) = 0;
  virtual void do_begin_capture(StreamId stream) { (void)stream; }
  virtual bool do_query(EventId event) = 0;
  virtual void do_synchronize_event(EventId event) = 0;
  virtual void do_synchronize_stream(StreamId stream) = 0;
  virtual void do_synchronize_device(int device) = 0;
  virtual void do_replay(GraphId graph, StreamId stream) = 0;
  // A matched collective: parts[r] is rank r's part (for send/recv: the two matched parts).
  virtual void do_collective(int comm, const std::vector<CollectivePart>& parts) = 0;
  // A part of a communicator of this process, as it is issued (before it can match), so that the
  // backend knows where in its stream the collective will stand; and parts the base took off its
  // queues but refused (their match broke a rule), which will never reach do_collective.
  virtual void do_collective_issued(int comm, const CollectivePart& part) { (void)comm, (void)part; }
  virtual void do_collective_dropped(int comm, const std::vector<CollectivePart>& parts) { (void)comm, (void)parts; }
  // Called at end_capture so the backend can build its executable graph.
  virtual void do_end_capture(GraphId graph) { (void)graph; }

  void notify(const std::function<void(RuntimeObserver&)>& fn);
  void check_stream(StreamId stream) const;
  void check_event(EventId event) const;
  void check_range(const ByteRange& range, const char* what) const;
  void issue_collective(int comm, CollectivePart part);
  void match_collectives(int comm);
  // The oldest part rank `rank` issued on communicator `comm` (of this process) that has not matched
  // yet, and the ranks it waits for ("all_gather of 'cp' (rank 1) waits for rank 0, which never
  // issued its part"); empty when the rank has none.
  struct Unmatched {
    std::string op;
    std::string text;
  };
  std::optional<Unmatched> unmatched_part(int comm, int rank) const;

  RuntimeOptions options_;
  std::vector<RuntimeObserver*> observers_;
  std::vector<std::unique_ptr<Allocator>> allocators_;  // one per device
  std::vector<BufferRecord> buffers_;
  std::vector<StreamRecord> streams_;
  std::vector<EventRecord> events_;
  std::vector<GraphTopology> graphs_;
  std::vector<EventId> graph_replay_events_;  // per graph: recorded after its latest replay
  std::vector<CommunicatorRecord> communicators_;
  // Captures in progress: the graph being built and the streams that joined it.
  struct CaptureRecord {
    StreamId origin;
    GraphTopology graph;
    std::vector<StreamId> joined;
  };
  std::vector<CaptureRecord> captures_;
  // The cache of freed storages by (device, bytes), when caching_allocator is on.
  std::vector<std::tuple<int, uint64_t, std::shared_ptr<Storage>>> free_cache_;
  uint64_t launch_seq_ = 0;
};

}  // namespace dsv4::rt
