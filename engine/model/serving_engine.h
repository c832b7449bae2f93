// The serving engine on one rank: the pools (request slots, full-token pages, SWA pages), the
// continuous-batching scheduler and the model runner, driven one step at a time as sglang's event
// loop does: schedule a batch, run it, commit the sampled tokens.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "engine/model/model_runner.h"
#include "engine/serving/scheduler.h"

namespace dsv4::engine {

// Pool sizes that hold max_running_requests requests of max_seq_len tokens at once.
struct PoolSizes {
  int64_t full_pages = 0;  // page 0 included
  int64_t swa_pages = 0;   // page 0 included
};
PoolSizes default_pool_sizes(const ModelConfig& config, const RuntimeOptions& options);

class ServingEngine {
 public:
  // InputError (naming the field) for options the engine or the pools refuse. With a PP partition,
  // stage r runs on device r (the runtime needs that many devices).
  ServingEngine(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
                const CheckpointSource& weights, EngineOptions engine_options, std::vector<int32_t> stop_ids = {});
  ~ServingEngine();

  void add_request(int64_t id, std::vector<int32_t> prompt_ids, int64_t max_new_tokens, int64_t arrival_step);
  bool abort(int64_t id) { return scheduler_->abort(id); }
  bool has_unfinished() const { return scheduler_->has_unfinished(); }
  const serving::Request& request(int64_t id) const { return scheduler_->request(id); }

  // Tests: replaces the MTP block's drafts for a request's next verify step. Called once per draft
  // with the request id, the position the draft would take, and the MTP block's own draft (-1 for
  // a row that drafts nothing); returns the draft to use. The chain drafts from the MTP block's own.
  using DraftOverride = std::function<int32_t(int64_t request_id, int64_t position, int32_t mtp_draft)>;
  void set_draft_override(DraftOverride fn) { draft_override_ = std::move(fn); }

  // One scheduler step: the batch is built, run and committed. `samples` is set on the rows whose
  // sampled token the scheduler keeps (decode rows and the chunk that ends a prompt).
  StepRecord step();
  int64_t steps() const { return step_; }

  // Stage 0's runner (the whole model without pipeline parallelism).
  ModelRunner& runner() { return *runners_.front(); }
  ModelRunner& runner(int64_t stage) { return *runners_.at(static_cast<size_t>(stage)); }
  int64_t stages() const { return static_cast<int64_t>(runners_.size()); }
  const std::vector<int64_t>& pp_partition() const { return partition_; }
  // Counters summed over the stages.
  int64_t graphs_captured() const;
  int64_t graph_replays() const;
  int64_t metadata_upgrades() const;

 private:
  StepRecord forward_pipeline(const serving::ForwardBatch& batch);
  StepRecord forward_context_parallel(const serving::ForwardBatch& batch);

  rt::Runtime& rt_;
  const ModelConfig& config_;
  RuntimeOptions options_;
  std::vector<int64_t> partition_;
  std::vector<std::unique_ptr<DeviceWeights>> weights_;
  std::unique_ptr<serving::ReqToTokenPool> slots_;
  std::unique_ptr<serving::TokenAllocator> full_;
  std::unique_ptr<serving::SwaTokenAllocator> swa_;
  std::unique_ptr<serving::Scheduler> scheduler_;
  std::vector<std::unique_ptr<ModelRunner>> runners_;
  int pp_comm_ = -1;
  int64_t cp_ = 1;  // the stages' communicator (send/recv of the residual)
  int64_t step_ = 0;
  DraftOverride draft_override_;
};

}  // namespace dsv4::engine
