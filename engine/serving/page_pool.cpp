#include "engine/serving/page_pool.h"

#include "engine/core/error.h"

namespace dsv4::serving {

std::string PageAllocation::describe(const std::string& pool) const {
  if (ok) return "ok";
  return "out of " + pool + " pages: needs " + std::to_string(pages_needed) + ", " +
         std::to_string(pages_free) + " free";
}

PagePool::PagePool(int64_t page_count) {
  DSV4_ASSERT(page_count >= 2, "a page pool needs the null page and at least one usable page");
  owner_by_page_.assign(static_cast<size_t>(page_count), kNoOwner);
  free_pages_.reserve(static_cast<size_t>(page_count - 1));
  // Pushed high to low so that page 1 is taken first.
  for (int64_t page = page_count - 1; page >= 1; --page) free_pages_.push_back(page);
  DSV4_ASSERT(free_page_count() == usable_page_count(), "every usable page starts free");
}

int64_t PagePool::take(int64_t owner) {
  DSV4_ASSERT(owner >= 1, "owners are request slots, >= 1");
  DSV4_ASSERT(!free_pages_.empty(), "take() on an empty page pool; check free_page_count() first");
  const int64_t page = free_pages_.back();
  free_pages_.pop_back();
  DSV4_ASSERT(page != kNullPage, "the null page is never handed out");
  DSV4_ASSERT(page < page_count(), "free list holds a page past the pool");
  DSV4_ASSERT(owner_by_page_[static_cast<size_t>(page)] == kNoOwner,
              "free list holds page " + std::to_string(page) + " that has an owner");
  owner_by_page_[static_cast<size_t>(page)] = owner;
  return page;
}

void PagePool::give_back(int64_t page, int64_t owner) {
  DSV4_ASSERT(page != kNullPage, "the null page is never given back");
  DSV4_ASSERT(page > 0, "page index is negative");
  DSV4_ASSERT(page < page_count(), "page index past the pool");
  DSV4_ASSERT(owner_by_page_[static_cast<size_t>(page)] == owner,
              "page " + std::to_string(page) + " given back by " + std::to_string(owner) +
                  " but owned by " + std::to_string(owner_by_page_[static_cast<size_t>(page)]));
  DSV4_ASSERT(free_page_count() < usable_page_count(), "more pages given back than taken");
  owner_by_page_[static_cast<size_t>(page)] = kNoOwner;
  free_pages_.push_back(page);
}

int64_t PagePool::owner(int64_t page) const {
  DSV4_ASSERT(page >= 0, "page index is negative");
  DSV4_ASSERT(page < page_count(), "page index past the pool");
  return owner_by_page_[static_cast<size_t>(page)];
}

}  // namespace dsv4::serving
