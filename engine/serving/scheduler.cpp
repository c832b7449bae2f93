#include "engine/serving/scheduler.h"

#include <algorithm>
#include <string>
#include <utility>

#include "engine/core/error.h"

namespace dsv4::serving {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

Scheduler::Scheduler(const ModelConfig& model, const RuntimeOptions& options, ReqToTokenPool& slots,
                     TokenAllocator& full, SwaTokenAllocator& swa, std::vector<int32_t> stop_ids)
    : window_size_(model.window_size),
      chunked_prefill_tokens_(options.chunked_prefill_tokens),
      batch_buckets_(options.batch_buckets),
      stop_ids_(std::move(stop_ids)),
      slots_(slots),
      full_(full),
      swa_(swa) {
  if (chunked_prefill_tokens_ < 1) {
    throw ContractError("Scheduler", "options.chunked_prefill_tokens", "must be >= 1");
  }
  if (options.max_running_requests > slots.max_running_requests()) {
    throw ContractError("Scheduler", "options.max_running_requests", "exceeds the request slot pool");
  }
  (void)batch_bucket(batch_buckets_, options.max_running_requests);  // every DECODE batch has a bucket
  DSV4_ASSERT(window_size_ >= 1, "validated window_size");
  DSV4_ASSERT(swa.window_size() == window_size_, "the SWA allocator serves this model");
  std::sort(stop_ids_.begin(), stop_ids_.end());
}

const Request& Scheduler::request(int64_t request_id) const {
  const auto it = requests_.find(request_id);
  if (it == requests_.end()) {
    throw ContractError("Scheduler", "request_id", "unknown request " + std::to_string(request_id));
  }
  return it->second;
}

Request& Scheduler::mutable_request(int64_t request_id) {
  return const_cast<Request&>(std::as_const(*this).request(request_id));
}

bool Scheduler::has_unfinished() const { return !queue_.empty(); }

int64_t Scheduler::running_count() const {
  int64_t count = 0;
  for (const int64_t id : queue_) count += request(id).holds_slot() ? 1 : 0;
  return count;
}

int64_t Scheduler::full_pages_for(const Request& r) const {
  return ceil_div(r.max_cached_len(), full_.page_size());
}

// The most SWA pages a request holds after any extend by at most one chunk (see the header).
int64_t Scheduler::swa_pages_for(const Request& r) const {
  const int64_t sps = swa_.swa_page_size();
  const int64_t whole = ceil_div(r.max_cached_len(), sps);
  const int64_t windowed = ceil_div(window_size_ + std::max(chunked_prefill_tokens_, 1 + draft_tokens_), sps) + 1;
  return std::min(whole, windowed);
}

void Scheduler::set_draft_tokens(int64_t k) {
  if (k < 0 || k > 4) throw ContractError("Scheduler::set_draft_tokens", "k", "must be in [0, 4], got " + std::to_string(k));
  DSV4_ASSERT(requests_.empty(), "the draft count is set before the first request");
  draft_tokens_ = k;
}

void Scheduler::add_request(int64_t id, std::vector<int32_t> prompt_ids, int64_t max_new_tokens,
                            int64_t arrival_step) {
  if (requests_.count(id) != 0) throw ContractError("Scheduler::add_request", "id", "duplicate request id");
  if (prompt_ids.empty()) throw ContractError("Scheduler::add_request", "prompt_ids", "must not be empty");
  if (max_new_tokens < 1) throw ContractError("Scheduler::add_request", "max_new_tokens", "must be >= 1");
  if (arrival_step < 0) throw ContractError("Scheduler::add_request", "arrival_step", "must be >= 0");
  Request r;
  r.id = id;
  r.prompt_ids = std::move(prompt_ids);
  r.max_new_tokens = max_new_tokens;
  r.arrival_step = arrival_step;
  r.draft_tokens = draft_tokens_;
  if (r.max_cached_len() > std::min(full_.max_seq_len(), slots_.max_seq_len())) {
    throw ContractError("Scheduler::add_request", "max_new_tokens",
                        "prompt + max_new_tokens - 1 = " + std::to_string(r.max_cached_len()) + " exceeds max_seq_len");
  }
  if (full_pages_for(r) > full_.page_count() - 1 || swa_pages_for(r) > swa_.page_count() - 1) {
    throw ContractError("Scheduler::add_request", "prompt_ids", "the pools cannot hold this request even alone");
  }
  requests_.emplace(id, std::move(r));
  // Insert keeping (arrival_step, id) order.
  const auto later = std::find_if(queue_.begin(), queue_.end(), [&](int64_t other) {
    const Request& o = request(other);
    return std::pair(o.arrival_step, o.id) > std::pair(arrival_step, id);
  });
  queue_.insert(later, id);
}

bool Scheduler::can_admit(const Request& r) const {
  DSV4_ASSERT(r.state == RequestState::waiting, "only a waiting request is admitted");
  if (slots_.free_slot_count() == 0) return false;
  if (reserved_full_pages_ + full_pages_for(r) > full_.page_count() - 1) return false;
  if (reserved_swa_pages_ + swa_pages_for(r) > swa_.page_count() - 1) return false;
  return true;
}

void Scheduler::admit(Request& r) {
  const auto slot = slots_.alloc();
  DSV4_ASSERT(slot.has_value(), "can_admit saw a free slot");
  DSV4_ASSERT(full_.seq_len(*slot) == 0, "a free slot holds no full pages");
  DSV4_ASSERT(swa_.seq_len(*slot) == 0, "a free slot holds no SWA pages");
  r.slot = *slot;
  r.state = RequestState::prefilling;
  reserved_full_pages_ += full_pages_for(r);
  reserved_swa_pages_ += swa_pages_for(r);
}

bool Scheduler::try_grow(Request& r, int64_t new_cached_len) {
  DSV4_ASSERT(r.holds_slot(), "only a running request grows");
  DSV4_ASSERT(new_cached_len > r.cached_len, "a request grows by at least one token");
  DSV4_ASSERT(new_cached_len <= r.max_cached_len(), "a request never grows past its longest");
  // Both allocators are asked before either changes, so a refusal leaves both untouched.
  if (!full_.can_extend(r.slot, new_cached_len)) return false;
  if (!swa_.can_extend(r.slot, new_cached_len)) return false;
  const PageAllocation full_pages = full_.extend(r.slot, new_cached_len);
  DSV4_ASSERT(full_pages.ok, "can_extend promised the full pages");
  full_.write_locs(r.slot, r.cached_len, new_cached_len, slots_.row(r.slot));
  const PageAllocation swa_pages = swa_.extend(r.slot, new_cached_len, slots_.row(r.slot));
  DSV4_ASSERT(swa_pages.ok, "can_extend promised the SWA pages");
  return true;
}

void Scheduler::build_extend(ForwardBatch& batch) {
  int64_t budget = chunked_prefill_tokens_;
  const std::vector<int64_t> order = queue_;  // admission changes no order, but keep a stable copy
  for (const int64_t id : order) {
    if (budget == 0) break;
    Request& r = mutable_request(id);
    DSV4_ASSERT(!r.is_done(), "the queue holds unfinished requests only");
    if (r.state == RequestState::decoding) continue;
    if (r.state == RequestState::waiting) {
      if (r.arrival_step > batch.step) break;  // the queue is in arrival order
      if (!can_admit(r)) break;                // first come, first served: no overtaking
      admit(r);
    }
    DSV4_ASSERT(r.state == RequestState::prefilling, "a prefilling request");
    DSV4_ASSERT(r.prefilled_len == r.cached_len, "a prefilling request caches exactly its prefill");
    const int64_t chunk = std::min(r.prompt_len() - r.prefilled_len, budget);
    DSV4_ASSERT(chunk >= 1, "a prefilling request has prompt left");
    const int64_t before = r.cached_len;
    if (!try_grow(r, before + chunk)) continue;  // waits for memory (never, under the reservation)
    std::vector<int64_t> locs(static_cast<size_t>(chunk));
    for (int64_t i = 0; i < chunk; ++i) locs[static_cast<size_t>(i)] = full_.loc(r.slot, before + i);
    const std::span<const int32_t> ids(r.prompt_ids.data() + before, static_cast<size_t>(chunk));
    append_row(batch, ForwardRow{r.id, r.slot, before, before + chunk}, locs, ids);
    r.cached_len = before + chunk;
    r.prefilled_len = before + chunk;
    budget -= chunk;
    DSV4_ASSERT(budget >= 0, "the chunk budget holds");
  }
}

void Scheduler::build_decode(ForwardBatch& batch) {
  for (const int64_t id : queue_) {
    Request& r = mutable_request(id);
    if (r.state != RequestState::decoding) continue;
    DSV4_ASSERT(!r.generated_ids.empty(), "a decoding request has sampled its first token");
    DSV4_ASSERT(r.cached_len == r.prompt_len() + static_cast<int64_t>(r.generated_ids.size()) - 1,
                "a decoding request caches all but its newest token");
    const int64_t before = r.cached_len;
    if (!try_grow(r, before + 1)) continue;
    const int64_t locs[1] = {full_.loc(r.slot, before)};
    const int32_t ids[1] = {r.generated_ids.back()};
    append_row(batch, ForwardRow{r.id, r.slot, before, before + 1}, locs, ids);
    r.cached_len = before + 1;
  }
}

void Scheduler::build_verify(ForwardBatch& batch) {
  const int64_t n = 1 + draft_tokens_;
  for (const int64_t id : queue_) {
    Request& r = mutable_request(id);
    if (r.state != RequestState::decoding) continue;
    DSV4_ASSERT(static_cast<int64_t>(r.draft_ids.size()) == draft_tokens_, "a decoding request holds its drafts");
    const int64_t before = r.cached_len;
    if (!try_grow(r, before + n)) continue;
    std::vector<int64_t> locs;
    std::vector<int32_t> ids = {r.generated_ids.back()};
    for (int64_t i = 0; i < n; ++i) locs.push_back(full_.loc(r.slot, before + i));
    ids.insert(ids.end(), r.draft_ids.begin(), r.draft_ids.end());
    append_row(batch, ForwardRow{r.id, r.slot, before, before + n}, locs, ids);
    r.cached_len = before + n;
  }
}

ForwardBatch Scheduler::schedule(int64_t step) {
  DSV4_ASSERT(!batch_in_flight_, "commit the previous batch first");
  if (step < last_step_) throw ContractError("Scheduler::schedule", "step", "steps never go back");
  last_step_ = step;
  ForwardBatch batch;
  batch.step = step;
  batch.mode = ForwardMode::extend;
  build_extend(batch);
  if (batch.rows.empty() && draft_tokens_ > 0) {
    batch.mode = ForwardMode::target_verify;
    batch.tokens_per_row = 1 + draft_tokens_;
    build_verify(batch);
  } else if (batch.rows.empty()) {
    batch.mode = ForwardMode::decode;
    build_decode(batch);
  }
  if (batch.rows.empty()) batch.tokens_per_row = 1;
  if (batch.rows.empty()) batch.mode = ForwardMode::idle;
  if (batch.mode != ForwardMode::extend) pad_to_bucket(batch, batch_buckets_);
  DSV4_ASSERT(batch.mode != ForwardMode::extend || batch.token_count() <= chunked_prefill_tokens_,
              "EXTEND fits the chunk budget");
  check_forward_batch(batch);
  batch_in_flight_ = true;
  return batch;
}

void Scheduler::commit(const ForwardBatch& batch, std::span<const int32_t> sampled_ids) {
  DSV4_ASSERT(draft_tokens_ == 0 || batch.real_row_count() == 0, "speculative decoding commits tokens and drafts");
  if (static_cast<int64_t>(sampled_ids.size()) != batch.real_row_count()) {
    throw ContractError("Scheduler::commit", "sampled_ids", "one sampled id per real row");
  }
  std::vector<std::vector<int32_t>> tokens;
  for (const int32_t id : sampled_ids) tokens.push_back({id});
  commit(batch, tokens, std::vector<std::vector<int32_t>>(tokens.size()));
}

void Scheduler::commit(const ForwardBatch& batch, std::span<const std::vector<int32_t>> tokens,
                       std::span<const std::vector<int32_t>> drafts) {
  DSV4_ASSERT(batch_in_flight_, "commit follows schedule");
  if (static_cast<int64_t>(tokens.size()) != batch.real_row_count() || drafts.size() != tokens.size()) {
    throw ContractError("Scheduler::commit", "tokens", "one entry of tokens and of drafts per real row");
  }
  batch_in_flight_ = false;
  for (int64_t i = 0; i < batch.real_row_count(); ++i) {
    const ForwardRow& row = batch.rows[static_cast<size_t>(i)];
    Request& r = mutable_request(row.request_id);
    if (r.state == RequestState::aborted) continue;
    DSV4_ASSERT(r.holds_slot(), "a committed row's request is running");
    DSV4_ASSERT(r.slot == row.req_slot, "the row's slot is the request's");
    DSV4_ASSERT(r.cached_len == row.seq_len_after, "the request grew by this row");
    if (r.state == RequestState::prefilling) {
      if (r.prefilled_len < r.prompt_len()) continue;  // a chunk inside the prompt samples nothing
      r.state = RequestState::decoding;
    }
    const std::vector<int32_t>& new_tokens = tokens[static_cast<size_t>(i)];
    if (new_tokens.empty() || static_cast<int64_t>(new_tokens.size()) > row.extend_len()) {
      throw ContractError("Scheduler::commit", "tokens", "a row commits 1 to " + std::to_string(row.extend_len()) + " tokens");
    }
    if (batch.mode == ForwardMode::target_verify) {
      // The positions of rejected drafts leave the cache: the newest token is never cached.
      const int64_t kept = row.seq_len_before + static_cast<int64_t>(new_tokens.size());
      if (kept < r.cached_len) {
        full_.truncate(r.slot, kept);
        swa_.truncate(r.slot, kept);
        r.cached_len = kept;
      }
    }
    bool done = false;
    for (const int32_t token : new_tokens) {
      r.generated_ids.push_back(token);
      const bool stopped = std::binary_search(stop_ids_.begin(), stop_ids_.end(), token);
      if (stopped || static_cast<int64_t>(r.generated_ids.size()) == r.max_new_tokens) {
        done = true;
        break;
      }
    }
    if (done) {
      release(r, RequestState::finished);
      continue;
    }
    if (draft_tokens_ > 0) {
      if (static_cast<int64_t>(drafts[static_cast<size_t>(i)].size()) != draft_tokens_) {
        throw ContractError("Scheduler::commit", "drafts", "a row of a speculative run needs " + std::to_string(draft_tokens_) + " drafts");
      }
      r.draft_ids = drafts[static_cast<size_t>(i)];
    }
  }
}

int64_t Scheduler::tokens_to_commit(int64_t request_id, std::span<const int32_t> tokens) const {
  const Request& r = request(request_id);
  int64_t generated = static_cast<int64_t>(r.generated_ids.size()), kept = 0;
  for (const int32_t token : tokens) {
    ++kept;
    if (std::binary_search(stop_ids_.begin(), stop_ids_.end(), token) || ++generated == r.max_new_tokens) break;
  }
  return kept;
}

bool Scheduler::abort(int64_t request_id) {
  Request& r = mutable_request(request_id);
  if (r.is_done()) return false;
  release(r, RequestState::aborted);
  return true;
}

void Scheduler::release(Request& r, RequestState final_state) {
  DSV4_ASSERT(!r.is_done(), "a request is released once");
  if (r.holds_slot()) {
    full_.release(r.slot);
    swa_.release(r.slot);
    slots_.free(r.slot);
    reserved_full_pages_ -= full_pages_for(r);
    reserved_swa_pages_ -= swa_pages_for(r);
    DSV4_ASSERT(reserved_full_pages_ >= 0 && reserved_swa_pages_ >= 0, "reservations balance");
    r.slot = Request::kNoSlot;
  }
  r.state = final_state;
  const auto it = std::find(queue_.begin(), queue_.end(), r.id);
  DSV4_ASSERT(it != queue_.end(), "an unfinished request is queued");
  queue_.erase(it);
}

}  // namespace dsv4::serving
