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
  if (engine_options.draft_tokens < 0 || engine_options.draft_tokens > 4) {
    throw InputError("engine options", "draft_tokens", "must be in [0, 4], got " + std::to_string(engine_options.draft_tokens));
  }
  if (engine_options.draft_tokens > 0) scheduler_->set_draft_tokens(engine_options.draft_tokens);
  cp_ = engine_options.cp;
  if (cp_ < 1) throw InputError("--cp", "", "must be >= 1, got " + std::to_string(cp_));
  if (cp_ > 1 && engine_options.pp_partition.size() > 1) {
    throw InputError("--cp", "", "prefill context parallelism runs without pipeline parallelism here (--pp 1)");
  }
  if (cp_ > 1 && engine_options.mtp) {
    throw InputError("--mtp", "", "the MTP block runs without prefill context parallelism here (--cp 1)");
  }
  if (cp_ > 1) {
    if (rt_.device_count() < engine_options.device + cp_) {
      throw InputError("--cp", "", std::to_string(cp_) + " ranks need " + std::to_string(cp_) +
                                       " devices, the runtime has " + std::to_string(rt_.device_count()));
    }
    std::vector<rt::StreamId> mains;
    for (int64_t r = 0; r < cp_; ++r) {
      EngineOptions eo = engine_options;
      eo.device = engine_options.device + static_cast<int>(r);
      weights_.push_back(std::make_unique<DeviceWeights>(rt_, eo.device, config_, weights, nullptr, eo.w8a8_int8));
      runners_.push_back(std::make_unique<ModelRunner>(rt_, config_, options_, *weights_.back(), eo, *slots_, *full_,
                                                       *swa_));
      mains.push_back(runners_.back()->main_stream());
    }
    const int comm = rt_.create_communicator(mains, "cp");
    for (int64_t r = 0; r < cp_; ++r) runners_[static_cast<size_t>(r)]->set_context_parallel(comm, static_cast<int>(r), static_cast<int>(cp_));
    partition_ = {config_.n_layers};
    return;
  }
  partition_ = engine_options.pp_partition.empty() ? std::vector<int64_t>{config_.n_layers} : engine_options.pp_partition;
  validate_pp_partition(partition_, config_.n_layers, "--pp-partition");
  const auto stages = static_cast<int64_t>(partition_.size());
  if (stages > 1 && rt_.device_count() < engine_options.device + stages) {
    throw InputError("--pp", "", std::to_string(stages) + " stages need " + std::to_string(stages) +
                                     " devices, the runtime has " + std::to_string(rt_.device_count()));
  }
  int64_t begin = 0;
  std::vector<rt::StreamId> mains;
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t end = begin + partition_[static_cast<size_t>(s)];
    EngineOptions eo = engine_options;
    eo.device = engine_options.device + static_cast<int>(s);
    weights_.push_back(std::make_unique<DeviceWeights>(
        rt_, eo.device, config_, weights,
        [&](const std::string& name) { return stage_holds_weight(config_, begin, end, name); }, eo.w8a8_int8));
    runners_.push_back(std::make_unique<ModelRunner>(rt_, config_, options_, *weights_.back(), eo, *slots_, *full_,
                                                     *swa_, begin, end));
    mains.push_back(runners_.back()->main_stream());
    begin = end;
  }
  if (stages > 1) pp_comm_ = rt_.create_communicator(mains, "pp");
}

int64_t ServingEngine::graphs_captured() const {
  int64_t n = 0;
  for (const auto& r : runners_) n += r->graphs_captured();
  return n;
}

int64_t ServingEngine::graph_replays() const {
  int64_t n = 0;
  for (const auto& r : runners_) n += r->graph_replays();
  return n;
}

int64_t ServingEngine::metadata_upgrades() const {
  int64_t n = 0;
  for (const auto& r : runners_) n += r->metadata_upgrades();
  return n;
}

ServingEngine::~ServingEngine() {
  runners_.clear();  // before the weights they read
}

// Prefill CP: every rank issues its share (the all-gathers match across ranks in issue order), then
// the per-token probes of the ranks are put back in global token order.
StepRecord ServingEngine::forward_context_parallel(const serving::ForwardBatch& batch) {
  StepRecord rec;
  rec.step = batch.step;
  rec.mode = batch.mode;
  if (batch.real_row_count() == 0) return rec;
  const int64_t T = batch.token_count();
  std::vector<StepRecord> parts(runners_.size());
  try {
    for (size_t r = 0; r < runners_.size(); ++r) runners_[r]->begin_cp(batch, &parts[r]);
    for (auto& rank : runners_) rank->launch(batch);
    for (auto& rank : runners_) rt_.synchronize(rank->main_stream());
    for (auto& rank : runners_) rank->finish_probes();
  } catch (...) {
    for (auto& rank : runners_) rank->end();
    throw;
  }
  for (auto& rank : runners_) rank->end();
  rec.rows = runners_.front()->sample(batch);
  const int64_t n = cp_, local = (T + n - 1) / n;
  for (const auto& [key, m0] : parts.front().values) {
    ref::Mat global(T, m0.cols);
    bool complete = true;
    for (const StepRecord& p : parts) {
      auto it = p.values.find(key);
      complete = complete && it != p.values.end() && it->second.rows == local && it->second.cols == m0.cols;
    }
    if (!complete) continue;
    for (int64_t t = 0; t < T; ++t) {
      const ref::Mat& src = parts[static_cast<size_t>(t % n)].values.at(key);
      std::copy(src.row(t / n), src.row(t / n) + m0.cols, global.row(t));
    }
    rec.values[key] = std::move(global);
  }
  trim_probes(rec, batch.real_token_count());
  return rec;
}

// The stages one after the other, as each PP rank runs its part: receive the residual from the
// previous rank, run the layers (eagerly or as the stage's graph), send the residual on. The
// collectives stay outside the graphs, as sglang's PP does.
StepRecord ServingEngine::forward_pipeline(const serving::ForwardBatch& batch) {
  StepRecord rec;
  rec.step = batch.step;
  rec.mode = batch.mode;
  if (batch.mode == serving::ForwardMode::idle || batch.real_row_count() == 0) return rec;
  const int64_t T = batch.token_count();
  const int last = static_cast<int>(runners_.size()) - 1;
  try {
    for (int r = 0; r <= last; ++r) {
      ModelRunner& stage = *runners_[static_cast<size_t>(r)];
      stage.begin(batch, &rec);
      if (r > 0) {
        const DeviceTensor in = stage.stage_input(T);
        rt_.recv(pp_comm_, r, r - 1, rt_.range(in.buffer, 0, static_cast<uint64_t>(in.t.numel() * 2)));
      }
      stage.launch(batch);
      if (r < last) {
        const DeviceTensor out = stage.stage_output(T);
        rt_.send(pp_comm_, r, r + 1, rt_.range(out.buffer, 0, static_cast<uint64_t>(out.t.numel() * 2)));
      }
    }
    for (auto& stage : runners_) rt_.synchronize(stage->main_stream());
    for (auto& stage : runners_) stage->finish_probes();
  } catch (...) {
    for (auto& stage : runners_) stage->end();
    throw;
  }
  for (auto& stage : runners_) stage->end();
  rec.rows = runners_.back()->sample(batch);
  trim_probes(rec, batch.real_token_count());
  return rec;
}

void ServingEngine::add_request(int64_t id, std::vector<int32_t> prompt_ids, int64_t max_new_tokens,
                                int64_t arrival_step) {
  scheduler_->add_request(id, std::move(prompt_ids), max_new_tokens, arrival_step);
}

StepRecord ServingEngine::step() {
  const serving::ForwardBatch batch = scheduler_->schedule(step_++);
  // MTP: the token after each row's last one when the prompt already holds it.
  std::vector<int32_t> next;
  for (int64_t r = 0; r < batch.real_row_count(); ++r) {
    const serving::ForwardRow& row = batch.rows[static_cast<size_t>(r)];
    const serving::Request& q = scheduler_->request(row.request_id);
    next.push_back(row.seq_len_after < q.prompt_len() ? q.prompt_ids[static_cast<size_t>(row.seq_len_after)] : -1);
  }
  for (auto& runner : runners_) runner->set_row_next_ids(next);
  StepRecord rec;
  if (cp_ > 1 && batch.mode == serving::ForwardMode::extend) {
    rec = forward_context_parallel(batch);
  } else if (runners_.size() == 1 || cp_ > 1) {
    rec = runners_.front()->forward(batch);  // CP: decode on rank 0, whose caches are whole
  } else {
    rec = forward_pipeline(batch);
  }
  for (StepRow& row : rec.rows) {
    const serving::Request& r = scheduler_->request(row.request_id);
    row.samples = row.start_pos + row.num_tokens >= r.prompt_len();
  }
  // Speculative decoding, now that the acceptance is known: every stage puts back what the
  // rejected drafts wrote into its compressed state, and the last stage drafts for the next verify
  // (DRAFT_EXTEND, the EAGLE chain).
  if (batch.mode == serving::ForwardMode::target_verify) {
    // A row keeps its accepted tokens, fewer when its request finishes on one of them.
    std::vector<int64_t> kept;
    for (const StepRow& row : rec.rows) kept.push_back(scheduler_->tokens_to_commit(row.request_id, row.new_tokens));
    for (auto& runner : runners_) runner->scrub_rejected(batch, kept);
  }
  if (runners_.back()->needs_draft_forward(batch)) runners_.back()->draft(batch, rec);
  const int64_t k = scheduler_->draft_tokens();
  std::vector<std::vector<int32_t>> tokens, drafts;
  for (StepRow& row : rec.rows) {
    tokens.push_back(row.new_tokens.empty() ? std::vector<int32_t>{row.sampled_id} : row.new_tokens);
    std::vector<int32_t> d;
    for (int64_t i = 0; i < k; ++i) {
      int32_t draft = i < static_cast<int64_t>(row.draft_ids.size()) ? row.draft_ids[static_cast<size_t>(i)] : -1;
      // Draft i stands at the position i + 1 after the row's newest committed token.
      if (draft_override_) draft = draft_override_(row.request_id, row.start_pos + row.checked_tokens() + 1 + i, draft);
      d.push_back(draft);
    }
    drafts.push_back(std::move(d));
  }
  scheduler_->commit(batch, tokens, drafts);
  return rec;
}

}  // namespace dsv4::engine
