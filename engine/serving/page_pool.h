// A fixed set of equally sized pages handed to requests, with page 0 reserved as the null page
// (location 0 is where IDLE padding rows write, dsv4-model §6). Pages are handed out last freed,
// first taken, so a finished request's pages are the next ones reused.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv4::serving {

// The answer to a request for pages: all of them or none, with the numbers for the error message.
struct PageAllocation {
  bool ok = false;
  int64_t pages_needed = 0;
  int64_t pages_free = 0;

  explicit operator bool() const { return ok; }
  // "out of <pool> pages: needs N, F free" (or "ok").
  std::string describe(const std::string& pool) const;
};

class PagePool {
 public:
  static constexpr int64_t kNullPage = 0;
  static constexpr int64_t kNoOwner = -1;

  // page_count counts the null page, so at least 2 (one usable page).
  explicit PagePool(int64_t page_count);

  int64_t page_count() const { return static_cast<int64_t>(owner_by_page_.size()); }
  int64_t free_page_count() const { return static_cast<int64_t>(free_pages_.size()); }
  int64_t usable_page_count() const { return page_count() - 1; }

  // Takes the most recently freed page for `owner` (>= 1). The caller has checked free_page_count().
  int64_t take(int64_t owner);
  // Returns a page that `owner` holds.
  void give_back(int64_t page, int64_t owner);
  // kNoOwner for a free page and for the null page.
  int64_t owner(int64_t page) const;

 private:
  std::vector<int64_t> owner_by_page_;
  std::vector<int64_t> free_pages_;  // a stack: back() is taken next
};

}  // namespace dsv4::serving
