// Continuous batching (sglang's Scheduler, reduced to its index logic). Each step builds one
// ForwardBatch:
//   EXTEND  prefill chunks, when any admitted request still has prompt left or a waiting request
//           can be admitted: at most chunked_prefill_tokens tokens in all, and a chunk ends
//           wherever the budget runs out (inside a ratio-4 or ratio-128 block too);
//   DECODE  otherwise, one token for every decoding request, padded to its CUDA-graph bucket;
//   IDLE    when nothing runs.
// Admission is first come, first served by (arrival_step, id). A request is admitted when a slot is
// free and the pools can hold it at its longest (prompt + max_new_tokens - 1 full-token pages, and
// its SWA peak: the window plus one chunk), counted against what every admitted request may still
// take; otherwise it waits. This reservation means an admitted request never stalls for memory, so
// chunked prefill cannot deadlock. Both allocators are still asked (can_extend) before either grows.
// A request finishes when it has max_new_tokens or samples a stop id; finishing and abort() give
// back its slot and pages. Every container is ordered: the same inputs give the same batches.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/req_to_token_pool.h"
#include "engine/serving/request.h"
#include "engine/serving/swa_token_allocator.h"
#include "engine/serving/token_allocator.h"

namespace dsv4::serving {

class Scheduler {
 public:
  // The pools are the caller's and outlive the scheduler. ContractError when the options cannot
  // serve the pools: max_running_requests past the pool's or past the largest batch bucket, or a
  // chunk budget < 1.
  Scheduler(const ModelConfig& model, const RuntimeOptions& options, ReqToTokenPool& slots,
            TokenAllocator& full, SwaTokenAllocator& swa, std::vector<int32_t> stop_ids = {});

  // ContractError for a duplicate id, an empty prompt, max_new_tokens < 1, a request longer than
  // max_seq_len, or one the pools could not hold even alone.
  void add_request(int64_t id, std::vector<int32_t> prompt_ids, int64_t max_new_tokens, int64_t arrival_step);
  // The next batch; its memory is taken. Steps never go back, and each batch is committed before
  // the next is scheduled.
  ForwardBatch schedule(int64_t step);
  // The model's result: one sampled id per real row (ignored for a prefill chunk that does not end
  // the prompt). Rows of requests aborted in between are skipped.
  void commit(const ForwardBatch& batch, std::span<const int32_t> sampled_ids);
  // Speculative decoding (set_draft_tokens(k), k >= 1): DECODE becomes TARGET_VERIFY, each decoding
  // request feeding its newest token and its k drafts. Per real row, `tokens` are the new tokens
  // (a verify row: the target's tokens up to and including the first that differs from a draft, so
  // 1 to k + 1; a prefill row that ends the prompt: its sampled token) and `drafts` the k drafts for
  // the next verify. The cache keeps the accepted positions only: the rejected drafts' positions are
  // given back to both allocators.
  void commit(const ForwardBatch& batch, std::span<const std::vector<int32_t>> tokens,
              std::span<const std::vector<int32_t>> drafts);
  // How many of `tokens` (a row's new tokens, in order) a commit keeps for the request: all of them,
  // or up to and including the first stop id or the token that reaches max_new_tokens.
  int64_t tokens_to_commit(int64_t request_id, std::span<const int32_t> tokens) const;
  // Before the first add_request. ContractError for k outside [0, 4].
  void set_draft_tokens(int64_t k);
  int64_t draft_tokens() const { return draft_tokens_; }
  // Aborts a waiting or running request and gives back its slot and pages. False when it is
  // finished or aborted already; ContractError for an unknown id.
  bool abort(int64_t request_id);

  const Request& request(int64_t request_id) const;
  bool has_unfinished() const;
  int64_t running_count() const;  // requests holding a slot
  int64_t reserved_full_pages() const { return reserved_full_pages_; }
  int64_t reserved_swa_pages() const { return reserved_swa_pages_; }

 private:
  Request& mutable_request(int64_t request_id);
  int64_t full_pages_for(const Request& r) const;
  int64_t swa_pages_for(const Request& r) const;
  bool can_admit(const Request& r) const;
  void admit(Request& r);
  // Grows a running request's cache to new_cached_len in both allocators and its req_to_token row.
  bool try_grow(Request& r, int64_t new_cached_len);
  void release(Request& r, RequestState final_state);
  void build_extend(ForwardBatch& batch);
  void build_decode(ForwardBatch& batch);

  void build_verify(ForwardBatch& batch);

  int64_t draft_tokens_ = 0;
  int64_t window_size_ = 0;
  int64_t chunked_prefill_tokens_ = 0;
  std::vector<int64_t> batch_buckets_;
  std::vector<int32_t> stop_ids_;
  ReqToTokenPool& slots_;
  TokenAllocator& full_;
  SwaTokenAllocator& swa_;

  std::map<int64_t, Request> requests_;  // by id
  std::vector<int64_t> queue_;           // ids by (arrival_step, id): admission and row order
  int64_t reserved_full_pages_ = 0;
  int64_t reserved_swa_pages_ = 0;
  int64_t last_step_ = -1;
  bool batch_in_flight_ = false;
};

}  // namespace dsv4::serving
