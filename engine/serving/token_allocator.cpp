#include "engine/serving/token_allocator.h"

#include <limits>
#include <string>

#include "engine/core/error.h"

namespace dsv4::serving {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validates before the page pool (a member) sees page_size.
int64_t validated_page_size(const ModelConfig& model, const RuntimeOptions& options) {
  validate_runtime_options(options, model);
  return options.page_size;
}

}  // namespace

TokenAllocator::TokenAllocator(const ModelConfig& model, const RuntimeOptions& options, int64_t page_count,
                               int64_t max_seq_len)
    : page_size_(validated_page_size(model, options)), max_seq_len_(max_seq_len), pages_(page_count) {
  DSV4_ASSERT(page_size_ >= 1, "validated page_size");
  DSV4_ASSERT(max_seq_len >= 1, "max_seq_len must be >= 1");
  // Locations are int32 in req_to_token (and on the device).
  DSV4_ASSERT(page_count <= std::numeric_limits<int32_t>::max() / page_size_,
              "full-token capacity does not fit int32 locations");
  requests_.resize(static_cast<size_t>(options.max_running_requests + 1));
}

const TokenAllocator::Request& TokenAllocator::request(int64_t req_slot) const {
  DSV4_ASSERT(req_slot >= 1, "request slots start at 1 (0 is the null slot)");
  DSV4_ASSERT(req_slot < static_cast<int64_t>(requests_.size()), "request slot past max_running_requests");
  return requests_[static_cast<size_t>(req_slot)];
}

int64_t TokenAllocator::pages_needed(int64_t req_slot, int64_t new_seq_len) const {
  const Request& r = request(req_slot);
  DSV4_ASSERT(new_seq_len >= r.seq_len, "a request never shrinks (release it instead)");
  DSV4_ASSERT(new_seq_len <= max_seq_len_, "request grows past max_seq_len");
  const int64_t have = static_cast<int64_t>(r.pages.size());
  const int64_t want = ceil_div(new_seq_len, page_size_);
  DSV4_ASSERT(want >= have, "a request holds more pages than its length needs");
  return want - have;
}

bool TokenAllocator::can_extend(int64_t req_slot, int64_t new_seq_len) const {
  return pages_needed(req_slot, new_seq_len) <= pages_.free_page_count();
}

PageAllocation TokenAllocator::extend(int64_t req_slot, int64_t new_seq_len) {
  PageAllocation out;
  out.pages_needed = pages_needed(req_slot, new_seq_len);
  out.pages_free = pages_.free_page_count();
  if (out.pages_needed > out.pages_free) return out;

  Request& r = requests_[static_cast<size_t>(req_slot)];
  for (int64_t i = 0; i < out.pages_needed; ++i) r.pages.push_back(pages_.take(req_slot));
  r.seq_len = new_seq_len;
  DSV4_ASSERT(static_cast<int64_t>(r.pages.size()) == ceil_div(new_seq_len, page_size_),
              "a request holds exactly the pages its length needs");
  out.ok = true;
  return out;
}

void TokenAllocator::truncate(int64_t req_slot, int64_t new_seq_len) {
  (void)request(req_slot);  // range checks
  Request& r = requests_[static_cast<size_t>(req_slot)];
  DSV4_ASSERT(new_seq_len >= 0 && new_seq_len <= r.seq_len, "truncate shrinks a request");
  const auto keep = static_cast<size_t>(ceil_div(new_seq_len, page_size_));
  for (size_t i = keep; i < r.pages.size(); ++i) pages_.give_back(r.pages[i], req_slot);
  r.pages.resize(keep);
  r.seq_len = new_seq_len;
}

void TokenAllocator::release(int64_t req_slot) {
  (void)request(req_slot);  // range checks
  Request& r = requests_[static_cast<size_t>(req_slot)];
  for (const int64_t page : r.pages) pages_.give_back(page, req_slot);
  r.pages.clear();
  r.seq_len = 0;
}

int64_t TokenAllocator::loc(int64_t req_slot, int64_t pos) const {
  const Request& r = request(req_slot);
  DSV4_ASSERT(pos >= 0, "negative position");
  DSV4_ASSERT(pos < r.seq_len, "position " + std::to_string(pos) + " past the request's length " +
                                   std::to_string(r.seq_len));
  const int64_t page = r.pages[static_cast<size_t>(pos / page_size_)];
  DSV4_ASSERT(page != PagePool::kNullPage, "a request never holds the null page");
  return page * page_size_ + pos % page_size_;
}

void TokenAllocator::write_locs(int64_t req_slot, int64_t pos_begin, int64_t pos_end,
                                std::span<int32_t> row) const {
  DSV4_ASSERT(pos_begin >= 0, "negative position");
  DSV4_ASSERT(pos_begin <= pos_end, "empty range is begin == end, never begin > end");
  DSV4_ASSERT(pos_end <= static_cast<int64_t>(row.size()), "row shorter than the range");
  for (int64_t pos = pos_begin; pos < pos_end; ++pos) {
    row[static_cast<size_t>(pos)] = static_cast<int32_t>(loc(req_slot, pos));
  }
}

int64_t TokenAllocator::seq_len(int64_t req_slot) const { return request(req_slot).seq_len; }

std::span<const int64_t> TokenAllocator::pages(int64_t req_slot) const { return request(req_slot).pages; }

}  // namespace dsv4::serving
