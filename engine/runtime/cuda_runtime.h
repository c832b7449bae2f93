// The `cuda` backend: CUDA runtime streams, events and graphs, NCCL collectives, and a watchdog:
// every synchronization has a deadline, and on expiry the verdict is a HangError naming the last
// unfinished launch, while the process stays alive to write its case file. Built with DSV4_CUDA.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/runtime/runtime.h"

namespace dsv4::rt {

struct CudaOptions {
  double sync_deadline_s = 30.0;  // every synchronize() gives up after this long with a HangError
};

class CudaRuntime final : public Runtime {
 public:
  // options.devices GPUs (0 .. devices-1) driven by this one process; a communicator over their
  // streams is an NCCL communicator (ncclCommInitAll).
  CudaRuntime(RuntimeOptions options, CudaOptions cuda);
  ~CudaRuntime() override;

  BackendKind kind() const override { return BackendKind::cuda; }
  // The cudaStream_t of a stream, for code that launches kernels directly.
  void* native(StreamId stream) const;
  // Drops the work held back behind collectives that never matched (after a failed step, so that
  // teardown does not wait for it).
  void discard_deferred_work();

  // Per-op device time without a profiler. While on, every launch enqueued outside a capture runs
  // between two timing events on its stream (graph replays are not launches: run eagerly to time
  // ops). op_times() reads the timed launches and forgets them, summed per op (summarize_op_times);
  // synchronize first: it throws std::logic_error while a timed launch is unfinished. Launches on
  // several streams overlap, so their sums can exceed the wall time.
  void time_ops(bool on);
  std::vector<OpTime> op_times();

 protected:
  MemorySpace& memory(int device) override;
  void do_check_launch(const Launch& launch) override;
  void do_create_stream(StreamId stream) override;
  void do_create_event(EventId event) override;
  void do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) override;
  void do_record(EventId event, StreamId stream, bool capturing) override;
  void do_wait(StreamId stream, EventId event, bool capturing) override;
  bool do_query(EventId event) override;
  void do_synchronize_event(EventId event) override;
  void do_synchronize_stream(StreamId stream) override;
  void do_synchronize_device(int device) override;
  void do_begin_capture(StreamId stream) override;
  void do_end_capture(GraphId graph) override;
  void do_replay(GraphId graph, StreamId stream) override;
  void do_collective(int comm, const std::vector<CollectivePart>& parts) override;
  void do_collective_issued(int comm, const CollectivePart& part) override;
  void do_collective_dropped(int comm, const std::vector<CollectivePart>& parts) override;

 private:
  void launch_now(StreamId stream, uint64_t seq, const Launch& launch, bool capturing);
  void record_now(EventId event, StreamId stream, bool capturing);
  void wait_now(StreamId stream, EventId event, bool capturing);
  void replay_now(GraphId graph, StreamId stream);
  void enqueue_collective(int comm, const std::vector<CollectivePart>& parts);
  void flush_deferred();
  std::string why_blocked(int32_t stream, int depth) const;
  void hang_if_blocked(int32_t stream, const std::string& waited_for);
  [[noreturn]] void refuse_capture_on_blocked(StreamId stream) const;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::rt
