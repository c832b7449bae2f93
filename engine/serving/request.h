// One generation request as the scheduler sees it: the prompt, how many tokens it may generate, when
// it arrives, and where it stands. A request holds a request slot (and its token pages) from the
// step its first prefill chunk is scheduled until it finishes or is aborted. Its cached length is
// the number of positions whose KV is in the cache: the prompt is prefilled in chunks, then each
// decode step caches the last generated token (the newest generated token is never cached).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace dsv4::serving {

enum class RequestState { waiting, prefilling, decoding, finished, aborted };

std::string_view request_state_name(RequestState state);

struct Request {
  static constexpr int64_t kNoSlot = -1;

  int64_t id = 0;
  std::vector<int32_t> prompt_ids;
  int64_t max_new_tokens = 0;
  int64_t arrival_step = 0;
  int64_t draft_tokens = 0;  // speculative decoding: the drafts a verify step feeds past the newest token

  RequestState state = RequestState::waiting;
  int64_t prefilled_len = 0;  // prompt tokens scheduled so far (prefill progress)
  int64_t cached_len = 0;     // positions [0, cached_len) are in the cache
  std::vector<int32_t> generated_ids;
  std::vector<int32_t> draft_ids;  // speculative decoding: the drafts the next verify step checks
  int64_t slot = kNoSlot;

  int64_t prompt_len() const { return static_cast<int64_t>(prompt_ids.size()); }
  // The longest the cache can grow: prompt + max_new_tokens - 1 (+ draft_tokens: a verify step feeds
  // its drafts before they are accepted).
  int64_t max_cached_len() const;
  bool holds_slot() const { return state == RequestState::prefilling || state == RequestState::decoding; }
  bool is_done() const { return state == RequestState::finished || state == RequestState::aborted; }
};

}  // namespace dsv4::serving
