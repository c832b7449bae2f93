// The `sim` backend: a deterministic simulated GPU on the CPU. Each stream is a FIFO queue of ops; an
// op may run when it is at the head of its stream and what it waits for has happened; which ready
// op runs next is a scheduling decision taken by a seeded strategy. Work runs only when the host
// synchronizes (or queries), as a GPU runs behind the host. The decisions of a run are recorded and
// can be replayed exactly. Several simulated devices share one scheduler and stand for PP/CP ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/runtime/runtime.h"

namespace dsv4::rt {

struct Schedule {
  enum class Kind {
    in_order,  // the ready op issued first runs first (host issue order)
    random,    // uniformly among the ready ops, from `seed`
    pct,       // probabilistic concurrency testing: random stream priorities, depth - 1 change points
    delay,     // in-order, but `delay_stream` is held back while `delay_ops` other ops can run first
    replay,    // the recorded `choices`, one per decision
  };
  Kind kind = Kind::in_order;
  uint64_t seed = 0;
  int pct_depth = 2;
  int32_t delay_stream = -1;
  int delay_ops = 0;
  std::vector<int32_t> choices;

  // "in-order", "random:SEED", "pct:SEED:DEPTH", "delay:STREAM:OPS"; InputError(flag, "schedule", ...).
  static Schedule parse(const std::string& text, const std::string& flag = "--schedule");
  std::string str() const;
};

struct SimOptions {
  Schedule schedule;
  // Ops queued before the scheduler runs on its own, as a GPU's queue would fill up.
  uint64_t max_queued_ops = 1u << 16;
};

class SimRuntime final : public Runtime {
 public:
  SimRuntime(RuntimeOptions options, SimOptions sim);
  ~SimRuntime() override;

  BackendKind kind() const override { return BackendKind::sim; }

  // Every decision taken so far (the stream chosen whenever more than one op was ready; inside a
  // graph replay or a cooperative kernel, the node or block chosen). Schedule::replay with these
  // choices reproduces the run exactly.
  const std::vector<int32_t>& decisions() const;
  uint64_t ops_executed() const;

  // Teardown after a failed step: every queued op is dropped unrun (as a sticky device error leaves
  // queued work), so that freeing buffers afterwards does not run launches whose inputs the failure
  // left undefined. Events whose records are dropped count as complete. Returns the ops dropped.
  uint64_t discard_queued_work();

 protected:
  MemorySpace& memory(int device) override;
  void do_create_stream(StreamId stream) override;
  void do_create_event(EventId event) override;
  void do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) override;
  void do_record(EventId event, StreamId stream, bool capturing) override;
  void do_wait(StreamId stream, EventId event, bool capturing) override;
  bool do_query(EventId event) override;
  void do_synchronize_event(EventId event) override;
  void do_synchronize_stream(StreamId stream) override;
  void do_synchronize_device(int device) override;
  void do_replay(GraphId graph, StreamId stream) override;
  void do_collective(int comm, const std::vector<CollectivePart>& parts) override;

 private:
  // Refuses a capture begun from inside a running op (the replayed graph must stay where it is).
  void do_begin_capture(StreamId stream) override;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::rt
