#include "engine/serving/swa_token_allocator.h"

#include <algorithm>
#include <limits>
#include <string>

#include "engine/core/error.h"

namespace dsv4::serving {

namespace {

constexpr int64_t kGivenBack = -1;  // a page slot behind the window

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validates before the page pool (a member) is built and before anything divides by the page size.
int64_t validated_swa_page_size(const ModelConfig& model, const RuntimeOptions& options) {
  validate_runtime_options(options, model);
  return options.swa_page_size;
}

}  // namespace

SwaTokenAllocator::SwaTokenAllocator(const ModelConfig& model, const RuntimeOptions& options,
                                     int64_t swa_page_count, int64_t full_capacity_tokens)
    : swa_page_size_(validated_swa_page_size(model, options)),
      window_size_(model.window_size),
      full_page_size_(options.page_size),
      pages_(swa_page_count) {
  DSV4_ASSERT(swa_page_size_ >= 1, "validated swa_page_size");
  DSV4_ASSERT(window_size_ >= 1, "validated window_size");
  DSV4_ASSERT(full_capacity_tokens >= 2 * full_page_size_, "the full namespace has the null page and one more");
  DSV4_ASSERT(full_capacity_tokens % full_page_size_ == 0, "the full namespace is whole pages");
  DSV4_ASSERT(full_capacity_tokens <= std::numeric_limits<int32_t>::max(), "full locations are int32");
  DSV4_ASSERT(swa_page_count <= std::numeric_limits<int32_t>::max() / swa_page_size_,
              "SWA locations are int32");
  requests_.resize(static_cast<size_t>(options.max_running_requests + 1));
  swa_by_full_loc_.assign(static_cast<size_t>(full_capacity_tokens), static_cast<int32_t>(kNoLoc));
  full_by_swa_loc_.assign(static_cast<size_t>(capacity_tokens()), static_cast<int32_t>(kNoLoc));
  swa_by_full_loc_[kNullLoc] = static_cast<int32_t>(kNullLoc);
  full_by_swa_loc_[kNullLoc] = static_cast<int32_t>(kNullLoc);
}

const SwaTokenAllocator::Request& SwaTokenAllocator::request(int64_t req_slot) const {
  DSV4_ASSERT(req_slot >= 1, "request slots start at 1 (0 is the null slot)");
  DSV4_ASSERT(req_slot < static_cast<int64_t>(requests_.size()), "request slot past max_running_requests");
  return requests_[static_cast<size_t>(req_slot)];
}

int64_t SwaTokenAllocator::window_begin(int64_t next_pos) const {
  DSV4_ASSERT(next_pos >= 0, "negative position");
  return std::max<int64_t>(0, next_pos - window_size_ + 1);
}

int64_t SwaTokenAllocator::pages_needed(int64_t req_slot, int64_t new_seq_len) const {
  const Request& r = request(req_slot);
  DSV4_ASSERT(new_seq_len >= r.seq_len, "a request never shrinks (release it instead)");
  const int64_t have = static_cast<int64_t>(r.pages.size());
  const int64_t want = ceil_div(new_seq_len, swa_page_size_);
  DSV4_ASSERT(want >= have, "a request has page slots past its length");
  return want - have;
}

int64_t SwaTokenAllocator::pages_released_by_slide(int64_t req_slot) const {
  const Request& r = request(req_slot);
  const int64_t keep_page_index = window_begin(r.seq_len) / swa_page_size_;
  DSV4_ASSERT(keep_page_index <= static_cast<int64_t>(r.pages.size()), "the window starts past the request");
  return std::max<int64_t>(0, keep_page_index - r.first_held_page_index);
}

bool SwaTokenAllocator::can_extend(int64_t req_slot, int64_t new_seq_len) const {
  return pages_needed(req_slot, new_seq_len) <= pages_.free_page_count() + pages_released_by_slide(req_slot);
}

PageAllocation SwaTokenAllocator::extend(int64_t req_slot, int64_t new_seq_len, std::span<const int32_t> full_locs) {
  PageAllocation out;
  out.pages_needed = pages_needed(req_slot, new_seq_len);
  out.pages_free = pages_.free_page_count() + pages_released_by_slide(req_slot);
  if (out.pages_needed > out.pages_free) return out;
  DSV4_ASSERT(static_cast<int64_t>(full_locs.size()) >= new_seq_len, "full_locs shorter than the request");

  Request& r = requests_[static_cast<size_t>(req_slot)];
  const int64_t keep_page_index = window_begin(r.seq_len) / swa_page_size_;
  for (int64_t i = r.first_held_page_index; i < keep_page_index; ++i) {
    give_back_page(r.pages[static_cast<size_t>(i)], req_slot);
    r.pages[static_cast<size_t>(i)] = kGivenBack;
  }
  r.first_held_page_index = std::max(r.first_held_page_index, keep_page_index);

  for (int64_t i = 0; i < out.pages_needed; ++i) r.pages.push_back(pages_.take(req_slot));
  const int64_t old_seq_len = r.seq_len;
  r.seq_len = new_seq_len;
  const int64_t full_capacity_tokens = static_cast<int64_t>(swa_by_full_loc_.size());
  for (int64_t pos = old_seq_len; pos < new_seq_len; ++pos) {
    const int64_t full_loc = full_locs[static_cast<size_t>(pos)];
    DSV4_ASSERT(full_loc >= full_page_size_, "position " + std::to_string(pos) + " has a full location in the null page");
    DSV4_ASSERT(full_loc < full_capacity_tokens, "full location past the full namespace");
    DSV4_ASSERT(swa_by_full_loc_[static_cast<size_t>(full_loc)] == kNoLoc,
                "full location " + std::to_string(full_loc) + " is already mapped to a SWA location");
    const int64_t swa_loc = loc(req_slot, pos);
    DSV4_ASSERT(full_by_swa_loc_[static_cast<size_t>(swa_loc)] == kNoLoc, "SWA location already mapped");
    swa_by_full_loc_[static_cast<size_t>(full_loc)] = static_cast<int32_t>(swa_loc);
    full_by_swa_loc_[static_cast<size_t>(swa_loc)] = static_cast<int32_t>(full_loc);
  }
  DSV4_ASSERT(static_cast<int64_t>(r.pages.size()) == ceil_div(new_seq_len, swa_page_size_),
              "page slots cover exactly the request's length");
  out.ok = true;
  return out;
}

void SwaTokenAllocator::truncate(int64_t req_slot, int64_t new_seq_len) {
  (void)request(req_slot);  // range checks
  Request& r = requests_[static_cast<size_t>(req_slot)];
  DSV4_ASSERT(new_seq_len <= r.seq_len, "truncate shrinks a request");
  DSV4_ASSERT(new_seq_len >= r.first_held_page_index * swa_page_size_, "truncate keeps the pages given back behind the window");
  for (int64_t pos = new_seq_len; pos < r.seq_len; ++pos) {
    const int64_t swa_loc = loc(req_slot, pos);
    const int64_t full_loc = full_by_swa_loc_[static_cast<size_t>(swa_loc)];
    DSV4_ASSERT(full_loc != kNoLoc, "a held position is mapped");
    swa_by_full_loc_[static_cast<size_t>(full_loc)] = static_cast<int32_t>(kNoLoc);
    full_by_swa_loc_[static_cast<size_t>(swa_loc)] = static_cast<int32_t>(kNoLoc);
  }
  const auto keep = static_cast<size_t>(ceil_div(new_seq_len, swa_page_size_));
  for (size_t i = std::max(keep, static_cast<size_t>(r.first_held_page_index)); i < r.pages.size(); ++i) {
    give_back_page(r.pages[i], req_slot);
  }
  r.pages.resize(std::max(keep, static_cast<size_t>(r.first_held_page_index)));
  r.seq_len = new_seq_len;
}

void SwaTokenAllocator::release(int64_t req_slot) {
  (void)request(req_slot);  // range checks
  Request& r = requests_[static_cast<size_t>(req_slot)];
  for (size_t i = static_cast<size_t>(r.first_held_page_index); i < r.pages.size(); ++i) {
    give_back_page(r.pages[i], req_slot);
  }
  r.pages.clear();
  r.first_held_page_index = 0;
  r.seq_len = 0;
}

void SwaTokenAllocator::give_back_page(int64_t page, int64_t req_slot) {
  DSV4_ASSERT(page != PagePool::kNullPage, "a request never holds the null page");
  DSV4_ASSERT(page != kGivenBack, "a page slot inside the window was given back already");
  for (int64_t swa_loc = page * swa_page_size_; swa_loc < (page + 1) * swa_page_size_; ++swa_loc) {
    const int64_t full_loc = full_by_swa_loc_[static_cast<size_t>(swa_loc)];
    if (full_loc == kNoLoc) continue;  // the tail of a page the request has not reached
    DSV4_ASSERT(swa_by_full_loc_[static_cast<size_t>(full_loc)] == swa_loc, "full_to_swa and its inverse disagree");
    swa_by_full_loc_[static_cast<size_t>(full_loc)] = static_cast<int32_t>(kNoLoc);
    full_by_swa_loc_[static_cast<size_t>(swa_loc)] = static_cast<int32_t>(kNoLoc);
  }
  pages_.give_back(page, req_slot);
}

int64_t SwaTokenAllocator::full_to_swa(int64_t full_loc) const {
  if (full_loc < 0) return kNoLoc;
  if (full_loc >= static_cast<int64_t>(swa_by_full_loc_.size())) return kNoLoc;
  const int64_t swa_loc = swa_by_full_loc_[static_cast<size_t>(full_loc)];
  DSV4_ASSERT(swa_loc >= kNoLoc, "mapping holds a negative location other than -1");
  DSV4_ASSERT(swa_loc < capacity_tokens(), "mapping holds a location past the SWA pool");
  return swa_loc;
}

bool SwaTokenAllocator::is_held(int64_t req_slot, int64_t pos) const {
  const Request& r = request(req_slot);
  if (pos < 0 || pos >= r.seq_len) return false;
  return pos / swa_page_size_ >= r.first_held_page_index;
}

int64_t SwaTokenAllocator::loc(int64_t req_slot, int64_t pos) const {
  DSV4_ASSERT(is_held(req_slot, pos), "position " + std::to_string(pos) + " has no SWA page");
  const Request& r = request(req_slot);
  const int64_t page = r.pages[static_cast<size_t>(pos / swa_page_size_)];
  DSV4_ASSERT(page > PagePool::kNullPage, "a held page slot holds a real page");
  return page * swa_page_size_ + pos % swa_page_size_;
}

int64_t SwaTokenAllocator::first_held_pos(int64_t req_slot) const {
  const Request& r = request(req_slot);
  const int64_t pos = r.first_held_page_index * swa_page_size_;
  DSV4_ASSERT(pos <= r.seq_len, "the first held page starts past the request");
  return pos;
}

int64_t SwaTokenAllocator::seq_len(int64_t req_slot) const { return request(req_slot).seq_len; }

}  // namespace dsv4::serving
