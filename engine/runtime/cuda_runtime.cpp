// The `cuda` backend (cuda_runtime.h). The base class has validated every call and told the
// observers; this file maps the hooks onto CUDA streams, events and graphs and NCCL, and keeps just
// enough per-stream history (one completion event per launch) for the watchdog to name the launch
// that did not finish when a synchronization runs past its deadline.
#include "engine/runtime/cuda_runtime.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <unistd.h>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/core/error.h"

namespace dsv4::rt {

namespace {

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so the runtime stays usable
    throw std::runtime_error(what + ": " + cudaGetErrorString(e));
  }
}

void check_nccl(ncclResult_t r, const std::string& what) {
  if (r != ncclSuccess) throw std::runtime_error(what + ": " + ncclGetErrorString(r));
}

// Makes `device` current for a scope and restores the caller's device (never throws on the way out).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

std::string seconds_text(double s) {
  std::ostringstream out;
  out << s;
  return out.str();
}

}  // namespace

// ---- state -----------------------------------------------------------------------------------------

struct CudaRuntime::Impl {
  // Work enqueued outside a capture, with the event recorded right after it: the watchdog's memory.
  struct Tracked {
    uint64_t order = 0;  // host issue order across all streams
    std::string op;      // the kernel (or collective, or graph) a HangError names
    std::string what;    // "launch #12 'op'"
    cudaEvent_t done = nullptr;
  };
  struct StreamState {
    cudaStream_t handle = nullptr;
    int device = 0;
    std::deque<Tracked> pending;  // oldest first; finished entries are pruned lazily
  };
  // The API's events have no device, but a CUDA event can be recorded only on a stream of the device
  // it was created on: one CUDA event per device, made on first use there.
  struct EventState {
    std::vector<cudaEvent_t> per_device;
    int last_device = -1;  // where it was last recorded (-1: never, its wait and query are no-ops)
    int32_t last_stream = -1;  // the stream of its last record outside a capture
    int capture = -1;          // the base's capture index when its last record was inside a capture
  };
  struct CommState {
    std::vector<ncclComm_t> comms;  // per rank
    std::vector<float*> scratch;    // per rank, for barriers
    std::vector<int> devices;       // per rank
  };

  CudaOptions options;
  std::vector<StreamState> streams;
  std::vector<EventState> events;
  std::vector<cudaGraphExec_t> graphs;  // by GraphId; nullptr where instantiation failed
  struct OpenCapture {
    StreamId origin;
    int index = -1;  // the base's capture index
  };
  std::vector<OpenCapture> open_captures;
  std::vector<CommState> comms;         // by communicator id; comms empty until first use
  std::vector<std::vector<cudaEvent_t>> spare_events;  // per device: recycled completion events
  uint64_t order = 0;
  bool hung = false;  // a HangError was raised: work may still be stuck at destruction

  cudaEvent_t event_on(EventState& e, int device) {
    if (e.per_device.size() <= static_cast<size_t>(device)) e.per_device.resize(static_cast<size_t>(device) + 1, nullptr);
    cudaEvent_t& ev = e.per_device[static_cast<size_t>(device)];
    if (ev == nullptr) {
      DeviceScope scope(device);
      check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    }
    return ev;
  }

  // Drops finished entries from the front of a stream's history; returns the first unfinished one.
  const Tracked* first_unfinished(StreamState& s) {
    while (!s.pending.empty()) {
      const cudaError_t e = cudaEventQuery(s.pending.front().done);
      if (e == cudaErrorNotReady) return &s.pending.front();
      // Any other error is sticky or a launch failure: the caller's query of the stream reports it.
      if (e != cudaSuccess) (void)cudaGetLastError();
      spare_events[static_cast<size_t>(s.device)].push_back(s.pending.front().done);
      s.pending.pop_front();
    }
    return nullptr;
  }

  void track(int32_t stream, std::string op, std::string what) {
    StreamState& s = streams[static_cast<size_t>(stream)];
    (void)first_unfinished(s);  // keeps the history as short as the work actually in flight
    auto& spare = spare_events[static_cast<size_t>(s.device)];
    cudaEvent_t done = nullptr;
    if (!spare.empty()) {
      done = spare.back();
      spare.pop_back();
    } else {
      check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    }
    const cudaError_t e = cudaEventRecord(done, s.handle);
    if (e != cudaSuccess) {
      (void)cudaEventDestroy(done);
      check(e, "cudaEventRecord (completion of " + what + ")");
    }
    s.pending.push_back(Tracked{++order, std::move(op), std::move(what), done});
  }

  // The HangError for a synchronization past its deadline. `preferred`: the streams whose unfinished
  // launch is the answer when one has any (the stream or event synchronized); otherwise the oldest
  // unfinished launch anywhere, since the work waited for may be blocked behind another stream.
  HangError hang(const std::vector<std::string>& stream_names, const std::vector<int32_t>& preferred,
                 const std::string& waited_for) {
    hung = true;
    const std::string within = " did not finish within " + seconds_text(options.sync_deadline_s) + " s";
    auto oldest_in = [&](auto&& include) {
      int32_t best_stream = -1;
      const Tracked* best = nullptr;
      for (size_t i = 0; i < streams.size(); ++i) {
        if (!include(static_cast<int32_t>(i))) continue;
        const Tracked* t = first_unfinished(streams[i]);
        if (t != nullptr && (best == nullptr || t->order < best->order)) {
          best = t;
          best_stream = static_cast<int32_t>(i);
        }
      }
      return std::make_pair(best_stream, best);
    };
    auto found = oldest_in([&](int32_t i) { return std::find(preferred.begin(), preferred.end(), i) != preferred.end(); });
    std::string via;
    if (found.second == nullptr) {
      found = oldest_in([](int32_t) { return true; });
      via = waited_for + " waits on ";
    }
    if (found.second == nullptr) {
      return HangError("<unknown>", {}, waited_for + within + "; no launch issued through the runtime is unfinished");
    }
    return HangError(found.second->op, {},
                     via + "stream '" + stream_names[static_cast<size_t>(found.first)] + "': " + found.second->what + within);
  }
};

// ---- construction --------------------------------------------------------------------------------

CudaRuntime::CudaRuntime(RuntimeOptions options, CudaOptions cuda) : Runtime(options), impl_(std::make_unique<Impl>()) {
  const int present = cuda_device_count();
  if (options.devices > present) {
    throw std::runtime_error("CudaRuntime: " + std::to_string(options.devices) + " device(s) requested but " +
                             std::to_string(present) + " CUDA device(s) present");
  }
  if (!(cuda.sync_deadline_s > 0.0)) throw std::runtime_error("CudaRuntime: sync_deadline_s must be positive");
  impl_->options = cuda;
  impl_->spare_events.resize(static_cast<size_t>(options.devices));
}

CudaRuntime::~CudaRuntime() {
  // Nothing here may throw; errors from a broken context are ignored on the way out.
  Impl& m = *impl_;
  for (cudaGraphExec_t g : m.graphs) {
    if (g != nullptr) (void)cudaGraphExecDestroy(g);
  }
  for (auto& e : m.events) {
    for (cudaEvent_t ev : e.per_device) {
      if (ev != nullptr) (void)cudaEventDestroy(ev);
    }
  }
  for (auto& s : m.streams) {
    for (auto& t : s.pending) (void)cudaEventDestroy(t.done);
  }
  for (auto& spare : m.spare_events) {
    for (cudaEvent_t ev : spare) (void)cudaEventDestroy(ev);
  }
  for (auto& c : m.comms) {
    // After a hang a rank may never finish: abort instead of waiting for it.
    for (ncclComm_t comm : c.comms) (void)(m.hung ? ncclCommAbort(comm) : ncclCommDestroy(comm));
    for (size_t r = 0; r < c.scratch.size(); ++r) {
      if (cudaSetDevice(c.devices[r]) == cudaSuccess) (void)cudaFree(c.scratch[r]);
    }
  }
  for (auto& s : m.streams) {
    if (s.handle != nullptr) (void)cudaStreamDestroy(s.handle);
  }
  (void)cudaGetLastError();
}

MemorySpace& CudaRuntime::memory(int device) {
  MemorySpace* space = cuda_memory(device);
  DSV4_ASSERT(space != nullptr, "no CUDA memory for device " + std::to_string(device));
  return *space;
}

void* CudaRuntime::native(StreamId stream) const {
  check_stream(stream);
  return impl_->streams[static_cast<size_t>(stream.value)].handle;
}

// ---- streams, events, launches -----------------------------------------------------------------

void CudaRuntime::do_create_stream(StreamId stream) {
  const int device = streams_[static_cast<size_t>(stream.value)].device;
  Impl::StreamState s;
  s.device = device;
  DeviceScope scope(device);
  // Non-blocking: no implicit ordering with the legacy default stream, only the program's own edges.
  check(cudaStreamCreateWithFlags(&s.handle, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  DSV4_ASSERT(impl_->streams.size() == static_cast<size_t>(stream.value), "stream ids out of step");
  impl_->streams.push_back(std::move(s));
}

void CudaRuntime::do_create_event(EventId event) {
  DSV4_ASSERT(impl_->events.size() == static_cast<size_t>(event.value), "event ids out of step");
  impl_->events.emplace_back();
  // Device 0 eagerly (the common case, and it surfaces a broken context here); others on first use.
  (void)impl_->event_on(impl_->events.back(), 0);
}

// One process drives every rank of a communicator from one thread, so a collective is enqueued (as one
// NCCL group) only once all its ranks have issued their parts. Until then the rank's stream has no
// place for later work: it would run before the collective, which on the GPU it must follow.
void CudaRuntime::refuse_behind_unmatched(StreamId stream, const std::string& what) const {
  if (const auto part = unmatched_part(stream)) {
    throw ContractError(what, streams_[static_cast<size_t>(stream.value)].name,
                        "is issued behind " + part->text +
                            "; this backend enqueues a collective once all its ranks have issued their parts, so a rank "
                            "issues nothing more on its stream before then");
  }
}

// A synchronization of a stream with an unmatched part can never end: its peers' parts would have to
// be issued by this thread, which is waiting. A hang, reported at once rather than at the deadline.
void CudaRuntime::hang_if_unmatched(StreamId stream, const std::string& waited_for) const {
  if (const auto part = unmatched_part(stream)) {
    throw HangError(part->op, {}, waited_for + " cannot finish: stream '" + streams_[static_cast<size_t>(stream.value)].name +
                                      "' is blocked in " + part->text);
  }
}

void CudaRuntime::do_check_launch(const Launch& launch) {
  if (!launch.cuda) throw ContractError(launch.op, "launch", "has no CUDA implementation");
}

void CudaRuntime::do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) {
  refuse_behind_unmatched(stream, launch.op);
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  DeviceScope scope(s.device);
  // Do not blame this launch for an error left by earlier work.
  check(cudaPeekAtLastError(), "CUDA error pending before launch of '" + launch.op + "'");

  launch.cuda(s.handle);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(launch.op + ": kernel launch failed on stream '" + streams_[static_cast<size_t>(stream.value)].name +
                             "': " + cudaGetErrorString(e));
  }
  // Inside a capture nothing runs now, and an event record would become a graph node.
  if (!capturing) {
    impl_->track(stream.value, launch.op, "launch #" + std::to_string(seq) + " '" + launch.op + "'");
  }
}

void CudaRuntime::do_record(EventId event, StreamId stream, bool capturing) {
  refuse_behind_unmatched(stream, "record of event '" + events_[static_cast<size_t>(event.value)].name + "'");
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  DeviceScope scope(s.device);
  // Legal during capture: CUDA turns it into the graph's fork/join edges.
  check(cudaEventRecord(impl_->event_on(e, s.device), s.handle), "cudaEventRecord on stream '" + streams_[static_cast<size_t>(stream.value)].name + "'");
  e.last_device = s.device;
  e.last_stream = capturing ? -1 : stream.value;
  e.capture = capturing ? streams_[static_cast<size_t>(stream.value)].capture : -1;
}

void CudaRuntime::do_wait(StreamId stream, EventId event, bool capturing) {
  refuse_behind_unmatched(stream, "wait for event '" + events_[static_cast<size_t>(event.value)].name + "'");
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  if (e.last_device < 0) return;  // never recorded: nothing to wait for (as in CUDA)
  // A capturing stream waiting on work recorded outside the capture: the base's graph gets no edge,
  // and CUDA would invalidate the capture (cudaErrorStreamCaptureIsolation). Skip it, as the base.
  if (capturing && e.capture < 0) return;
  DeviceScope scope(s.device);
  check(cudaStreamWaitEvent(s.handle, e.per_device[static_cast<size_t>(e.last_device)], 0),
        "cudaStreamWaitEvent on stream '" + streams_[static_cast<size_t>(stream.value)].name + "'");
}

bool CudaRuntime::do_query(EventId event) {
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  if (e.last_device < 0) return true;
  const cudaError_t r = cudaEventQuery(e.per_device[static_cast<size_t>(e.last_device)]);
  if (r == cudaErrorNotReady) return false;
  check(r, "cudaEventQuery of '" + events_[static_cast<size_t>(event.value)].name + "'");
  return true;
}

// ---- the watchdog ----------------------------------------------------------------------------------

namespace {

// Polls `done` (true when finished; it throws on a CUDA error) until it holds or the deadline
// passes. Short sleeps that grow to 1 ms: a hang is found within about a millisecond of the
// deadline, and a long wait costs the host almost nothing.
template <class Done>
bool poll_until(double deadline_s, Done&& done) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(deadline_s));
  auto nap = std::chrono::microseconds(5);
  for (int spins = 0;; ++spins) {
    if (done()) return true;
    if (clock::now() >= deadline) return false;
    if (spins < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }
}

}  // namespace

namespace {

bool stream_done(cudaStream_t s, const std::string& name) {
  const cudaError_t e = cudaStreamQuery(s);
  if (e == cudaErrorNotReady) return false;
  check(e, "cudaStreamQuery of '" + name + "'");
  return true;
}

}  // namespace

void CudaRuntime::do_synchronize_event(EventId event) {
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  if (e.last_device < 0) return;
  if (poll_until(impl_->options.sync_deadline_s, [&] { return do_query(event); })) return;
  std::vector<std::string> names;
  for (const auto& s : streams_) names.push_back(s.name);
  std::vector<int32_t> preferred;
  if (e.last_stream >= 0) preferred.push_back(e.last_stream);
  throw impl_->hang(names, preferred, "event '" + events_[static_cast<size_t>(event.value)].name + "'");
}

void CudaRuntime::do_synchronize_stream(StreamId stream) {
  hang_if_unmatched(stream, "stream '" + streams_[static_cast<size_t>(stream.value)].name + "'");
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  const std::string& name = streams_[static_cast<size_t>(stream.value)].name;
  if (poll_until(impl_->options.sync_deadline_s, [&] { return stream_done(s.handle, name); })) return;
  std::vector<std::string> names;
  for (const auto& r : streams_) names.push_back(r.name);
  throw impl_->hang(names, {stream.value}, "stream '" + name + "'");
}

void CudaRuntime::do_synchronize_device(int device) {
  std::vector<int32_t> mine;
  for (size_t i = 0; i < impl_->streams.size(); ++i) {
    if (impl_->streams[i].device == device) mine.push_back(static_cast<int32_t>(i));
  }
  for (int32_t i : mine) hang_if_unmatched(StreamId{i}, "device " + std::to_string(device));
  // Every stream of the device, without cudaDeviceSynchronize (which would block past the deadline).
  const bool done = poll_until(impl_->options.sync_deadline_s, [&] {
    for (int32_t i : mine) {
      if (!stream_done(impl_->streams[static_cast<size_t>(i)].handle, streams_[static_cast<size_t>(i)].name)) return false;
    }
    return true;
  });
  if (done) return;
  std::vector<std::string> names;
  for (const auto& r : streams_) names.push_back(r.name);
  throw impl_->hang(names, mine, "device " + std::to_string(device));
}

// ---- graphs ----------------------------------------------------------------------------------------

void CudaRuntime::do_begin_capture(StreamId stream) {
  refuse_behind_unmatched(stream, "begin_capture");
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  DeviceScope scope(s.device);
  // Relaxed: host uploads and allocations elsewhere in the process stay legal while capturing.
  check(cudaStreamBeginCapture(s.handle, cudaStreamCaptureModeRelaxed),
        "cudaStreamBeginCapture on '" + streams_[static_cast<size_t>(stream.value)].name + "'");
  impl_->open_captures.push_back(Impl::OpenCapture{stream, streams_[static_cast<size_t>(stream.value)].capture});
}

void CudaRuntime::do_end_capture(GraphId graph) {
  // The base has already cleared its capture marks: the capture that ended is the open one whose
  // origin stream no longer captures.
  auto& open = impl_->open_captures;
  auto it = std::find_if(open.begin(), open.end(),
                         [&](const Impl::OpenCapture& c) { return streams_[static_cast<size_t>(c.origin.value)].capture < 0; });
  DSV4_ASSERT(it != open.end(), "end_capture without a capture this backend began");
  const StreamId origin = it->origin;
  const int index = it->index;
  open.erase(it);
  // As in the base, an event recorded only inside the capture is not recorded outside it.
  for (auto& e : impl_->events) {
    if (e.capture == index) {
      e.capture = -1;
      e.last_device = -1;
      e.last_stream = -1;
    }
  }

  if (impl_->graphs.size() <= static_cast<size_t>(graph.value)) impl_->graphs.resize(static_cast<size_t>(graph.value) + 1, nullptr);
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(origin.value)];
  const std::string& name = streams_[static_cast<size_t>(origin.value)].name;
  DeviceScope scope(s.device);
  cudaGraph_t g = nullptr;
  check(cudaStreamEndCapture(s.handle, &g), "cudaStreamEndCapture on '" + name + "'");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
  (void)cudaGraphDestroy(g);  // the executable graph keeps what it needs
  check(e, "cudaGraphInstantiate of the graph captured on '" + name + "'");
  impl_->graphs[static_cast<size_t>(graph.value)] = exec;
}

void CudaRuntime::do_replay(GraphId graph, StreamId stream) {
  refuse_behind_unmatched(stream, "replay of graph " + std::to_string(graph.value));
  const size_t g = static_cast<size_t>(graph.value);
  if (g >= impl_->graphs.size() || impl_->graphs[g] == nullptr) {
    throw std::runtime_error("replay: graph " + std::to_string(graph.value) + " has no executable CUDA graph (its capture failed)");
  }
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  DeviceScope scope(s.device);
  check(cudaGraphLaunch(impl_->graphs[g], s.handle), "cudaGraphLaunch on '" + streams_[static_cast<size_t>(stream.value)].name + "'");
  impl_->track(stream.value, "graph " + std::to_string(graph.value), "replay of graph " + std::to_string(graph.value));
}

// ---- collectives ---------------------------------------------------------------------------------

void CudaRuntime::do_collective(int comm, const std::vector<CollectivePart>& parts) {
  Impl& m = *impl_;
  const CommunicatorRecord& record = communicators_[static_cast<size_t>(comm)];
  const int n = static_cast<int>(record.streams.size());
  if (m.comms.size() <= static_cast<size_t>(comm)) m.comms.resize(static_cast<size_t>(comm) + 1);
  Impl::CommState& c = m.comms[static_cast<size_t>(comm)];

  const bool spanning = record.local_rank >= 0;
  // Parts carry global ranks; this process's tables hold only its own rank when spanning.
  auto index_of = [&](int rank) { return spanning ? 0 : rank; };

  // The base has no hook at create_communicator: the NCCL communicator is built at first use.
  if (c.comms.empty() && spanning) {
    const int device = m.streams[static_cast<size_t>(record.streams.front().value)].device;
    setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    ncclUniqueId id;
    const std::string& file = record.rendezvous_file;
    if (record.local_rank == 0) {
      check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
      // Written whole, then renamed, so a waiting rank never reads half an id.
      const std::string tmp = file + ".tmp." + std::to_string(getpid());
      {
        std::ofstream out(tmp, std::ios::binary);
        out.write(reinterpret_cast<const char*>(&id), sizeof id);
        if (!out) throw std::runtime_error("join_communicator: cannot write rendezvous file " + tmp);
      }
      std::filesystem::rename(tmp, file);
    } else {
      const bool found = poll_until(m.options.sync_deadline_s, [&] {
        std::error_code ec;
        return std::filesystem::file_size(file, ec) == sizeof id && !ec;
      });
      if (!found) {
        throw HangError("ncclCommInitRank", {}, "rank " + std::to_string(record.local_rank) + " of '" + record.name +
                                                    "' found no communicator id in " + file + " within " +
                                                    seconds_text(m.options.sync_deadline_s) + " s (is rank 0 running?)");
      }
      std::ifstream in(file, std::ios::binary);
      in.read(reinterpret_cast<char*>(&id), sizeof id);
      if (!in) throw std::runtime_error("join_communicator: cannot read rendezvous file " + file);
    }
    DeviceScope scope(device);
    ncclComm_t nccl = nullptr;
    check_nccl(ncclCommInitRank(&nccl, record.world, id, record.local_rank),
               "ncclCommInitRank for '" + record.name + "' rank " + std::to_string(record.local_rank));
    c.comms = {nccl};
    c.devices = {device};
    float* scratch = nullptr;
    check(cudaMalloc(&scratch, sizeof(float)), "cudaMalloc (barrier scratch)");
    check(cudaMemset(scratch, 0, sizeof(float)), "cudaMemset (barrier scratch)");
    c.scratch = {scratch};
  }
  if (c.comms.empty()) {
    for (StreamId s : record.streams) c.devices.push_back(m.streams[static_cast<size_t>(s.value)].device);
    for (int r = 0; r < n; ++r) {
      for (int q = 0; q < r; ++q) {
        if (c.devices[static_cast<size_t>(r)] == c.devices[static_cast<size_t>(q)]) {
          throw ContractError("create_communicator", record.name,
                              "ranks " + std::to_string(q) + " and " + std::to_string(r) + " share device " +
                                  std::to_string(c.devices[static_cast<size_t>(r)]) + " (NCCL needs one device per rank)");
        }
      }
    }
    // These machines forbid NVLink multicast; keep whatever the user set explicitly.
    setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    std::vector<ncclComm_t> comms(static_cast<size_t>(n), nullptr);
    check_nccl(ncclCommInitAll(comms.data(), n, c.devices.data()), "ncclCommInitAll for '" + record.name + "'");
    c.comms = std::move(comms);
    for (int r = 0; r < n; ++r) {
      DeviceScope scope(c.devices[static_cast<size_t>(r)]);
      float* scratch = nullptr;
      check(cudaMalloc(&scratch, sizeof(float)), "cudaMalloc (barrier scratch)");
      c.scratch.push_back(scratch);
      check(cudaMemset(scratch, 0, sizeof(float)), "cudaMemset (barrier scratch)");
    }
  }

  const std::string& op = parts.front().op;
  auto pointer = [&](const ByteRange& r) {
    return static_cast<uint8_t*>(buffers_[static_cast<size_t>(r.buffer.value)].storage->data()) + r.begin;
  };
  auto size = [](const ByteRange& r) { return static_cast<size_t>(r.end - r.begin); };
  // NCCL reads and writes the rank's own device: a buffer elsewhere would fault inside the kernel.
  auto check_device = [&](const CollectivePart& p, const ByteRange& r, const char* what) {
    if (r.buffer.value < 0) return;
    const int d = buffers_[static_cast<size_t>(r.buffer.value)].device;
    if (d != c.devices[static_cast<size_t>(index_of(p.rank))]) {
      throw ContractError(p.op, what, "buffer '" + buffers_[static_cast<size_t>(r.buffer.value)].name + "' is on device " +
                                          std::to_string(d) + ", rank " + std::to_string(p.rank) + " on device " +
                                          std::to_string(c.devices[static_cast<size_t>(index_of(p.rank))]));
    }
  };
  for (const CollectivePart& p : parts) {
    check_device(p, p.send, "send");
    check_device(p, p.recv, "recv");
  }
  // Shapes the base does not check but NCCL relies on: every rank contributes the same count.
  if (op == "all_gather" || op == "all_reduce") {
    for (const CollectivePart& p : parts) {
      if (size(p.send) != size(parts.front().send)) {
        throw ContractError(op, "send", "rank " + std::to_string(p.rank) + " sends " + std::to_string(size(p.send)) +
                                            " bytes, rank 0 " + std::to_string(size(parts.front().send)));
      }
      const size_t ranks = spanning ? static_cast<size_t>(record.world) : static_cast<size_t>(n);
      const size_t need = op == "all_gather" ? size(p.send) * ranks : size(p.send);
      if (size(p.recv) != need) {
        throw ContractError(op, "recv", "rank " + std::to_string(p.rank) + " receives into " + std::to_string(size(p.recv)) +
                                            " bytes, needs " + std::to_string(need));
      }
    }
  }

  auto stream_of = [&](int rank) {
    return m.streams[static_cast<size_t>(record.streams[static_cast<size_t>(index_of(rank))].value)].handle;
  };
  auto comm_of = [&](int rank) { return c.comms[static_cast<size_t>(index_of(rank))]; };
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  // Once the group is open it must be closed, even when a call inside it fails.
  ncclResult_t failed = ncclSuccess;
  std::string failed_call;
  auto call = [&](ncclResult_t r, const char* name) {
    if (r != ncclSuccess && failed == ncclSuccess) {
      failed = r;
      failed_call = name;
    }
  };
  for (const CollectivePart& p : parts) {
    if (op == "all_gather") {
      call(ncclAllGather(pointer(p.send), pointer(p.recv), size(p.send), ncclUint8, comm_of(p.rank), stream_of(p.rank)), "ncclAllGather");
    } else if (op == "all_reduce") {
      call(ncclAllReduce(pointer(p.send), pointer(p.recv), size(p.send) / sizeof(float), ncclFloat32, ncclSum, comm_of(p.rank),
                         stream_of(p.rank)),
           "ncclAllReduce");
    } else if (p.op == "send") {
      call(ncclSend(pointer(p.send), size(p.send), ncclUint8, p.peer, comm_of(p.rank), stream_of(p.rank)), "ncclSend");
    } else if (p.op == "recv") {
      call(ncclRecv(pointer(p.recv), size(p.recv), ncclUint8, p.peer, comm_of(p.rank), stream_of(p.rank)), "ncclRecv");
    } else if (op == "barrier") {
      float* s = c.scratch[static_cast<size_t>(index_of(p.rank))];
      call(ncclAllReduce(s, s, 1, ncclFloat32, ncclSum, comm_of(p.rank), stream_of(p.rank)), "ncclAllReduce (barrier)");
    } else {
      call(ncclInvalidUsage, "unknown collective");
    }
  }
  const ncclResult_t ended = ncclGroupEnd();
  if (failed != ncclSuccess) check_nccl(failed, failed_call + " (" + op + " in '" + record.name + "')");
  check_nccl(ended, "ncclGroupEnd for " + op + " in '" + record.name + "'");

  const std::string label = parts.size() == 2 && (op == "send" || op == "recv") ? std::string("send/recv") : op;
  for (const CollectivePart& p : parts) {
    const int32_t s = record.streams[static_cast<size_t>(index_of(p.rank))].value;
    DeviceScope scope(m.streams[static_cast<size_t>(s)].device);
    m.track(s, label, "collective '" + label + "' of '" + record.name + "' (rank " + std::to_string(p.rank) + ")");
  }
}

}  // namespace dsv4::rt
