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
#include <functional>
#include <memory>
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
  // What a stream holds back while a collective it issued waits for other ranks (see "Deferred work").
  struct Deferred {
    enum class Kind { work, record, wait, collective } kind = Kind::work;
    std::function<void()> run;  // work and record: enqueues it
    int32_t event = -1;         // record: this version of the event's records; wait: waits for it
    uint64_t version = 0;
    int comm = -1, rank = -1;   // collective: the rank's next part on the communicator
  };
  struct StreamState {
    cudaStream_t handle = nullptr;
    int device = 0;
    std::deque<Tracked> pending;  // oldest first; finished entries are pruned lazily
    std::deque<Deferred> deferred;  // issued but not yet enqueued on CUDA, oldest first
  };
  // The API's events have no device, but a CUDA event can be recorded only on a stream of the device
  // it was created on: one CUDA event per device, made on first use there.
  struct EventState {
    std::vector<cudaEvent_t> per_device;
    int last_device = -1;  // where it was last recorded (-1: never, its wait and query are no-ops)
    int32_t last_stream = -1;  // the stream of its last record outside a capture
    int capture = -1;          // the base's capture index when its last record was inside a capture
    uint64_t issued = 0;       // records issued outside captures (versions 1..issued)
    uint64_t enqueued = 0;     // versions 1..enqueued are on CUDA (records enqueue in version order)
  };
  struct Group {
    std::vector<CollectivePart> parts;
  };
  struct CommState {
    std::vector<ncclComm_t> comms;  // per rank
    std::vector<float*> scratch;    // per rank, for barriers
    std::vector<int> devices;       // per rank
    // One process, every rank: per rank, the matched collectives whose parts are still held back
    // in their streams, oldest first.
    std::vector<std::deque<std::shared_ptr<Group>>> matched;
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
  // time_ops: the timed launches not yet read, and recycled timing events per device.
  struct Timed {
    std::string op;
    int device = 0;
    cudaEvent_t start = nullptr, stop = nullptr;
  };
  bool timing = false;
  std::vector<Timed> timed;
  std::vector<std::vector<cudaEvent_t>> spare_timing;

  // A recycled event from `spare` or a new one with `flags`, recorded now on `s` (the current device
  // is s.device); where the record fails it goes back to `spare` and the error names `purpose` and
  // `what`.
  static cudaEvent_t recorded_event(std::vector<cudaEvent_t>& spare, unsigned flags, const StreamState& s,
                                    const char* purpose, const std::string& what) {
    cudaEvent_t ev = nullptr;
    if (!spare.empty()) {
      ev = spare.back();
      spare.pop_back();
    } else {
      check(cudaEventCreateWithFlags(&ev, flags), std::string("cudaEventCreateWithFlags (") + purpose + what + ")");
    }
    const cudaError_t e = cudaEventRecord(ev, s.handle);
    if (e != cudaSuccess) {
      spare.push_back(ev);
      check(e, std::string("cudaEventRecord (") + purpose + what + ")");
    }
    return ev;
  }
  // A timing event recorded now on `s`.
  cudaEvent_t timing_event(const StreamState& s) {
    return recorded_event(spare_timing[static_cast<size_t>(s.device)], cudaEventDefault, s, "op timing", "");
  }
  uint64_t order = 0;
  bool hung = false;  // a HangError was raised: work may still be stuck at destruction
  size_t deferred_items = 0;

  void defer(int32_t stream, Deferred d) {
    streams[static_cast<size_t>(stream)].deferred.push_back(std::move(d));
    ++deferred_items;
  }
  bool blocked(int32_t stream) const { return !streams[static_cast<size_t>(stream)].deferred.empty(); }
  CommState& comm_state(int comm, size_t ranks) {
    if (comms.size() <= static_cast<size_t>(comm)) comms.resize(static_cast<size_t>(comm) + 1);
    CommState& c = comms[static_cast<size_t>(comm)];
    if (c.matched.size() < ranks) c.matched.resize(ranks);
    return c;
  }

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
    cudaEvent_t done =
        recorded_event(spare_events[static_cast<size_t>(s.device)], cudaEventDisableTiming, s, "completion of ", what);
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
  impl_->spare_timing.resize(static_cast<size_t>(options.devices));
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
  for (auto& t : m.timed) {
    (void)cudaEventDestroy(t.start);
    (void)cudaEventDestroy(t.stop);
  }
  for (auto& spare : m.spare_timing) {
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

// ---- deferred work ------------------------------------------------------------------------------
//
// One process drives every rank of a communicator from one thread, so a collective is enqueued (as
// one NCCL group) only once all its ranks have issued their parts. Until then a rank's stream holds
// back what is issued on it after its part, as the GPU would hold it behind the collective: the
// work, records and waits go into the stream's deferred queue and are enqueued, in order, as soon as
// what blocks them is on CUDA. A wait for an event whose record is held back is held back too, and an
// event's records reach CUDA in the order they were issued. A synchronization flushes what it can;
// what stays blocked can never run (the thread that would issue the missing part is the one waiting)
// and is a HangError at once, naming the collective and the ranks it waits for.

void CudaRuntime::flush_deferred() {
  Impl& m = *impl_;
  if (m.deferred_items == 0) return;
  using Kind = Impl::Deferred::Kind;
  for (bool progress = true; progress;) {
    progress = false;
    for (size_t i = 0; i < m.streams.size(); ++i) {
      auto& q = m.streams[i].deferred;
      while (!q.empty()) {
        Impl::Deferred& d = q.front();
        if (d.kind == Kind::work || d.kind == Kind::record) {
          if (d.kind == Kind::record && m.events[static_cast<size_t>(d.event)].enqueued + 1 != d.version) break;
          const std::function<void()> run = std::move(d.run);
          const int32_t event = d.event;
          const uint64_t version = d.version;
          const bool record = d.kind == Kind::record;
          q.pop_front();
          --m.deferred_items;
          run();
          if (record) m.events[static_cast<size_t>(event)].enqueued = version;
        } else if (d.kind == Kind::wait) {
          if (m.events[static_cast<size_t>(d.event)].enqueued < d.version) break;
          const int32_t event = d.event;
          q.pop_front();
          --m.deferred_items;
          wait_now(StreamId{static_cast<int32_t>(i)}, EventId{event}, false);
        } else {
          const int comm = d.comm;
          const auto& matched = m.comms[static_cast<size_t>(comm)].matched;
          if (matched[static_cast<size_t>(d.rank)].empty()) break;
          const std::shared_ptr<Impl::Group> group = matched[static_cast<size_t>(d.rank)].front();
          // Every part of the group must stand at the front of its own stream.
          bool ready = true;
          for (const CollectivePart& p : group->parts) {
            const auto& pq = m.streams[static_cast<size_t>(communicators_[static_cast<size_t>(comm)].streams[static_cast<size_t>(p.rank)].value)].deferred;
            ready = ready && !pq.empty() && pq.front().kind == Kind::collective && pq.front().comm == comm &&
                    pq.front().rank == p.rank && matched[static_cast<size_t>(p.rank)].front() == group;
          }
          if (!ready) break;
          for (const CollectivePart& p : group->parts) {
            auto& pq = m.streams[static_cast<size_t>(communicators_[static_cast<size_t>(comm)].streams[static_cast<size_t>(p.rank)].value)].deferred;
            pq.pop_front();
            --m.deferred_items;
            m.comms[static_cast<size_t>(comm)].matched[static_cast<size_t>(p.rank)].pop_front();
          }
          enqueue_collective(comm, group->parts);
        }
        progress = true;
      }
    }
  }
}

void CudaRuntime::discard_deferred_work() {
  for (auto& s : impl_->streams) s.deferred.clear();
  for (auto& c : impl_->comms) {
    for (auto& q : c.matched) q.clear();
  }
  impl_->deferred_items = 0;
}

// Why a stream's deferred queue cannot move (after a flush): its front item and what that waits for.
std::string CudaRuntime::why_blocked(int32_t stream, int depth) const {
  const Impl& m = *impl_;
  const auto& q = m.streams[static_cast<size_t>(stream)].deferred;
  if (q.empty()) return "nothing";
  if (depth > 4) return "...";
  const Impl::Deferred& d = q.front();
  using Kind = Impl::Deferred::Kind;
  auto holder = [&](int32_t event, uint64_t version) -> int32_t {
    for (size_t i = 0; i < m.streams.size(); ++i) {
      for (const auto& x : m.streams[i].deferred) {
        if (x.kind == Kind::record && x.event == event && x.version == version) return static_cast<int32_t>(i);
      }
    }
    return -1;
  };
  auto behind = [&](int32_t other) {
    if (other < 0) return std::string("a record this backend no longer holds");
    return "stream '" + streams_[static_cast<size_t>(other)].name + "', blocked in " + why_blocked(other, depth + 1);
  };
  const std::string& event_name = d.event >= 0 ? events_[static_cast<size_t>(d.event)].name : std::string();
  switch (d.kind) {
    case Kind::work:
      return "work that is ready (a flush would enqueue it)";
    case Kind::record:
      return "a record of event '" + event_name + "' behind its earlier record on " +
             behind(holder(d.event, m.events[static_cast<size_t>(d.event)].enqueued + 1));
    case Kind::wait:
      return "a wait for event '" + event_name + "', whose record is held on " + behind(holder(d.event, d.version));
    case Kind::collective:
      break;
  }
  if (const auto part = unmatched_part(d.comm, d.rank)) return part->text;
  const auto& matched = m.comms[static_cast<size_t>(d.comm)].matched;
  const auto& record = communicators_[static_cast<size_t>(d.comm)];
  const auto& group = matched[static_cast<size_t>(d.rank)].front();
  for (const CollectivePart& p : group->parts) {
    const int32_t other = record.streams[static_cast<size_t>(p.rank)].value;
    const auto& pq = m.streams[static_cast<size_t>(other)].deferred;
    if (other != stream && (pq.empty() || pq.front().kind != Kind::collective || pq.front().comm != d.comm)) {
      return group->parts.front().op + " of '" + record.name + "' (rank " + std::to_string(d.rank) +
             "), matched, waits for rank " + std::to_string(p.rank) + "'s " + behind(other);
    }
  }
  return group->parts.front().op + " of '" + record.name + "' (rank " + std::to_string(d.rank) + ")";
}

void CudaRuntime::hang_if_blocked(int32_t stream, const std::string& waited_for) {
  flush_deferred();
  if (!impl_->blocked(stream)) return;
  const Impl::Deferred& d = impl_->streams[static_cast<size_t>(stream)].deferred.front();
  std::string op = "wait";
  if (d.kind == Impl::Deferred::Kind::collective) {
    const auto& g = impl_->comms[static_cast<size_t>(d.comm)].matched[static_cast<size_t>(d.rank)];
    if (const auto part = unmatched_part(d.comm, d.rank)) {
      op = part->op;
    } else if (!g.empty()) {
      op = g.front()->parts.front().op;
    }
  }
  throw HangError(op, {}, waited_for + " cannot finish: stream '" + streams_[static_cast<size_t>(stream)].name +
                              "' is blocked in " + why_blocked(stream, 0));
}

void CudaRuntime::refuse_capture_on_blocked(StreamId stream) const {
  throw ContractError("capture", streams_[static_cast<size_t>(stream.value)].name,
                      "the stream joins a capture while it holds back work behind " + why_blocked(stream.value, 0));
}

void CudaRuntime::do_collective_issued(int comm, const CollectivePart& part) {
  const CommunicatorRecord& record = communicators_[static_cast<size_t>(comm)];
  impl_->comm_state(comm, record.streams.size());
  Impl::Deferred d;
  d.kind = Impl::Deferred::Kind::collective;
  d.comm = comm;
  d.rank = part.rank;
  impl_->defer(record.streams[static_cast<size_t>(part.rank)].value, std::move(d));
}

void CudaRuntime::do_collective_dropped(int comm, const std::vector<CollectivePart>& parts) {
  // The part's place is the rank's first collective item on this communicator not yet matched.
  Impl& m = *impl_;
  const CommunicatorRecord& record = communicators_[static_cast<size_t>(comm)];
  for (const CollectivePart& p : parts) {
    auto& q = m.streams[static_cast<size_t>(record.streams[static_cast<size_t>(p.rank)].value)].deferred;
    size_t skip = m.comm_state(comm, record.streams.size()).matched[static_cast<size_t>(p.rank)].size();
    for (auto it = q.begin(); it != q.end(); ++it) {
      if (it->kind != Impl::Deferred::Kind::collective || it->comm != comm || it->rank != p.rank) continue;
      if (skip-- > 0) continue;
      q.erase(it);
      --m.deferred_items;
      break;
    }
  }
  flush_deferred();
}

void CudaRuntime::do_check_launch(const Launch& launch) {
  if (!launch.cuda) throw ContractError(launch.op, "launch", "has no CUDA implementation");
}

void CudaRuntime::do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) {
  if (impl_->blocked(stream.value)) {
    if (capturing) refuse_capture_on_blocked(stream);
    Impl::Deferred d;
    d.run = [this, stream, seq, launch] { launch_now(stream, seq, launch, false); };
    impl_->defer(stream.value, std::move(d));
    return;
  }
  launch_now(stream, seq, launch, capturing);
}

void CudaRuntime::launch_now(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) {
  Impl::StreamState& s = impl_->streams[static_cast<size_t>(stream.value)];
  DeviceScope scope(s.device);
  // Do not blame this launch for an error left by earlier work.
  check(cudaPeekAtLastError(), "CUDA error pending before launch of '" + launch.op + "'");

  const bool timed = impl_->timing && !capturing;
  cudaEvent_t start = timed ? impl_->timing_event(s) : nullptr;
  const auto recycle_start = [&] {
    if (start != nullptr) impl_->spare_timing[static_cast<size_t>(s.device)].push_back(start);
  };
  try {
    launch.cuda(s.handle);
  } catch (...) {
    recycle_start();
    throw;
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    recycle_start();
    throw std::runtime_error(launch.op + ": kernel launch failed on stream '" + streams_[static_cast<size_t>(stream.value)].name +
                             "': " + cudaGetErrorString(e));
  }
  if (timed) impl_->timed.push_back(Impl::Timed{launch.op, s.device, start, impl_->timing_event(s)});
  // Inside a capture nothing runs now, and an event record would become a graph node.
  if (!capturing) {
    impl_->track(stream.value, launch.op, "launch #" + std::to_string(seq) + " '" + launch.op + "'");
  }
}

void CudaRuntime::time_ops(bool on) { impl_->timing = on; }

std::vector<OpTime> CudaRuntime::op_times() {
  Impl& m = *impl_;
  for (const Impl::Timed& t : m.timed) {
    DeviceScope scope(t.device);
    const cudaError_t e = cudaEventQuery(t.stop);
    if (e == cudaErrorNotReady) {
      throw std::logic_error("op_times: launch of '" + t.op + "' has not finished (synchronize first)");
    }
    check(e, "cudaEventQuery (op timing of '" + t.op + "')");
  }
  std::vector<std::pair<std::string, double>> samples;
  samples.reserve(m.timed.size());
  std::vector<Impl::Timed> timed = std::move(m.timed);
  m.timed.clear();
  cudaError_t first_error = cudaSuccess;
  for (Impl::Timed& t : timed) {
    float ms = 0.0f;
    const cudaError_t e = cudaEventElapsedTime(&ms, t.start, t.stop);
    if (e == cudaSuccess) {
      samples.emplace_back(std::move(t.op), static_cast<double>(ms));
    } else if (first_error == cudaSuccess) {
      first_error = e;
    }
    auto& spare = m.spare_timing[static_cast<size_t>(t.device)];
    spare.push_back(t.start);
    spare.push_back(t.stop);
  }
  check(first_error, "cudaEventElapsedTime (op timing)");
  return summarize_op_times(samples);
}

void CudaRuntime::do_record(EventId event, StreamId stream, bool capturing) {
  Impl::EventState& ev = impl_->events[static_cast<size_t>(event.value)];
  if (!capturing) {
    const uint64_t version = ++ev.issued;
    if (impl_->blocked(stream.value) || ev.enqueued + 1 != version) {
      Impl::Deferred d;
      d.kind = Impl::Deferred::Kind::record;
      d.event = event.value;
      d.version = version;
      d.run = [this, event, stream] { record_now(event, stream, false); };
      impl_->defer(stream.value, std::move(d));
      return;
    }
    record_now(event, stream, false);
    ev.enqueued = version;
    flush_deferred();  // a held-back wait for this record can go now
    return;
  }
  record_now(event, stream, capturing);
}

void CudaRuntime::record_now(EventId event, StreamId stream, bool capturing) {
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
  const Impl::EventState& ev = impl_->events[static_cast<size_t>(event.value)];
  const bool held = ev.enqueued < ev.issued;  // the latest record is held back behind a collective
  if (capturing) {
    if (impl_->blocked(stream.value)) refuse_capture_on_blocked(stream);
    if (held) {
      throw ContractError("wait", streams_[static_cast<size_t>(stream.value)].name,
                          "a capturing stream waits for event '" + events_[static_cast<size_t>(event.value)].name +
                              "', whose record is held back behind a collective that has not matched");
    }
  } else if (held || impl_->blocked(stream.value)) {
    Impl::Deferred d;
    d.kind = Impl::Deferred::Kind::wait;
    d.event = event.value;
    d.version = ev.issued;
    impl_->defer(stream.value, std::move(d));
    return;
  }
  wait_now(stream, event, capturing);
}

void CudaRuntime::wait_now(StreamId stream, EventId event, bool capturing) {
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
  flush_deferred();
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  if (e.enqueued < e.issued) return false;  // its latest record is still held back
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
  flush_deferred();
  Impl::EventState& e = impl_->events[static_cast<size_t>(event.value)];
  if (e.enqueued < e.issued) {
    for (size_t i = 0; i < impl_->streams.size(); ++i) {
      for (const auto& d : impl_->streams[i].deferred) {
        if (d.kind == Impl::Deferred::Kind::record && d.event == event.value) {
          hang_if_blocked(static_cast<int32_t>(i), "event '" + events_[static_cast<size_t>(event.value)].name + "'");
        }
      }
    }
  }
  if (e.last_device < 0) return;
  if (poll_until(impl_->options.sync_deadline_s, [&] { return do_query(event); })) return;
  std::vector<std::string> names;
  for (const auto& s : streams_) names.push_back(s.name);
  std::vector<int32_t> preferred;
  if (e.last_stream >= 0) preferred.push_back(e.last_stream);
  throw impl_->hang(names, preferred, "event '" + events_[static_cast<size_t>(event.value)].name + "'");
}

void CudaRuntime::do_synchronize_stream(StreamId stream) {
  hang_if_blocked(stream.value, "stream '" + streams_[static_cast<size_t>(stream.value)].name + "'");
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
  for (int32_t i : mine) hang_if_blocked(i, "device " + std::to_string(device));
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
  flush_deferred();
  if (impl_->blocked(stream.value)) refuse_capture_on_blocked(stream);
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
  if (impl_->blocked(stream.value)) {
    Impl::Deferred d;
    d.run = [this, graph, stream] { replay_now(graph, stream); };
    impl_->defer(stream.value, std::move(d));
    return;
  }
  replay_now(graph, stream);
}

void CudaRuntime::replay_now(GraphId graph, StreamId stream) {
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
  const CommunicatorRecord& record = communicators_[static_cast<size_t>(comm)];
  if (record.local_rank >= 0) {
    // Spanning: the other ranks are other processes; NCCL matches there. Held back only behind
    // this stream's own deferred work.
    const int32_t stream = record.streams.front().value;
    if (impl_->blocked(stream)) {
      Impl::Deferred d;
      d.run = [this, comm, parts] { enqueue_collective(comm, parts); };
      impl_->defer(stream, std::move(d));
      return;
    }
    enqueue_collective(comm, parts);
    return;
  }
  // Every part was put in its stream's queue when it was issued; the group goes to CUDA once each
  // part stands at the front of its stream.
  auto group = std::make_shared<Impl::Group>();
  group->parts = parts;
  Impl::CommState& c = impl_->comm_state(comm, record.streams.size());
  for (const CollectivePart& p : parts) c.matched[static_cast<size_t>(p.rank)].push_back(group);
  flush_deferred();
}

void CudaRuntime::enqueue_collective(int comm, const std::vector<CollectivePart>& parts) {
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
