#include "engine/model/serving_engine.h"

#include "engine/core/error.h"

namespace dsv4::engine {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

PoolSizes default_pool_sizes(const ModelConfig& config, const RuntimeOptions& options) {
  validate_runtime_options(options, config);
  PoolSizes s;
  const int64_t n = options.max_running_requests;
  s.full_pages = 1 + n * ceil_div(config.max_seq_len, options.page_size);
  const int64_t whole = ceil_div(config.max_seq_len, options.swa_page_size);
  const int64_t windowed = ceil_div(config.window_size + options.chunked_prefill_tokens, options.swa_page_size) + 1;
  s.swa_pages = 1 + n * std::min(whole, windowed);
  return s;
}

ServingEngine::ServingEngine(rt::Runtime& runtime, const ModelConfig& config, const RuntimeOptions& options,
                             const CheckpointSource& weights, EngineOptions engine_options, std::vector<int32_t> stop_ids)
    : rt_(runtime), config_(config), options_(options) {
  const PoolSizes sizes = default_pool_sizes(config_, options_);
  slots_ = std::make_unique<serving::ReqToTokenPool>(options_.max_running_requests, config_.max_seq_len);
  full_ = std::make_unique<serving::TokenAllocator>(config_, options_, sizes.full_pages, config_.max_seq_len);
  swa_ = std::make_unique<serving::SwaTokenAllocator>(config_, options_, sizes.swa_pages, full_->capacity_tokens());
  scheduler_ = std::make_unique<serving::Scheduler>(config_, options_, *slots_, *full_, *swa_, std::move(stop_ids));
  weights_ = std::make_unique<DeviceWeights>(rt_, engine_options.device, config_, weights);
  runner_ = std::make_unique<ModelRunner>(rt_, config_, options_, *weights_, engine_options, *slots_, *full_, *swa_);
}

ServingEngine::~ServingEngine() = default;

void ServingEngine::add_request(int64_t id, std::vector<int32_t> prompt_ids, int64_t max_new_tokens,
                                int64_t arrival_step) {
  scheduler_->add_request(id, std::move(prompt_ids), max_new_tokens, arrival_step);
}

StepRecord ServingEngine::step() {
  const serving::ForwardBatch batch = scheduler_->schedule(step_++);
  StepRecord rec = runner_->forward(batch);
  std::vector<int32_t> sampled;
  for (StepRow& row : rec.rows) {
    const serving::Request& r = scheduler_->request(row.request_id);
    row.samples = row.start_pos + row.num_tokens >= r.prompt_len();
    sampled.push_back(row.sampled_id);
  }
  scheduler_->commit(batch, sampled);
  return rec;
}

}  // namespace dsv4::engine
