#include "engine/serving/request.h"

#include "engine/core/error.h"

namespace dsv4::serving {

std::string_view request_state_name(RequestState state) {
  switch (state) {
    case RequestState::waiting: return "waiting";
    case RequestState::prefilling: return "prefilling";
    case RequestState::decoding: return "decoding";
    case RequestState::finished: return "finished";
    case RequestState::aborted: return "aborted";
  }
  DSV4_ASSERT(false, "unknown request state");
  return "";
}

int64_t Request::max_cached_len() const {
  DSV4_ASSERT(prompt_len() >= 1, "a request has a prompt");
  DSV4_ASSERT(max_new_tokens >= 1, "a request generates at least one token");
  return prompt_len() + max_new_tokens - 1 + draft_tokens;
}

}  // namespace dsv4::serving
