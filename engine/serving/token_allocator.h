// The paged full-token namespace (sglang's out_cache_loc / req_to_token locations): each request
// holds whole pages of page_size tokens, and position p of a request lives at
// page_of(req, p / page_size) * page_size + p % page_size. Page 0 is reserved, so location 0 is
// the null slot. The compressed pools (c4, c128, indexer keys) index by full_loc / ratio, so they
// follow these pages and need no allocator of their own.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/serving/page_pool.h"

namespace dsv4::serving {

class TokenAllocator {
 public:
  static constexpr int64_t kNullLoc = 0;

  // page_count counts the reserved page 0. Requests are the slots 1..options.max_running_requests
  // of the ReqToTokenPool; each grows to at most max_seq_len tokens. Throws InputError for
  // options that validate_runtime_options refuses.
  TokenAllocator(const ModelConfig& model, const RuntimeOptions& options, int64_t page_count,
                 int64_t max_seq_len);

  // Pages a request must take to grow to new_seq_len tokens (0 if it has them already).
  int64_t pages_needed(int64_t req_slot, int64_t new_seq_len) const;
  bool can_extend(int64_t req_slot, int64_t new_seq_len) const;
  // Grows a request (token by token or by a chunk) to new_seq_len. All or nothing: when the pool
  // is short of pages nothing changes and the result says how many were needed.
  [[nodiscard]] PageAllocation extend(int64_t req_slot, int64_t new_seq_len);
  // Shrinks a request to new_seq_len (<= its length): speculative decoding gives back the positions
  // of rejected draft tokens. Pages wholly past the new length go back to the pool.
  void truncate(int64_t req_slot, int64_t new_seq_len);
  // Returns every page of a request (finished or aborted); its length becomes 0.
  void release(int64_t req_slot);

  // The location of position `pos` (< seq_len) of a request.
  int64_t loc(int64_t req_slot, int64_t pos) const;
  // Writes the locations of positions [pos_begin, pos_end) into a req_to_token row.
  void write_locs(int64_t req_slot, int64_t pos_begin, int64_t pos_end, std::span<int32_t> row) const;

  int64_t seq_len(int64_t req_slot) const;
  std::span<const int64_t> pages(int64_t req_slot) const;
  int64_t page_size() const { return page_size_; }
  int64_t page_count() const { return pages_.page_count(); }
  int64_t free_page_count() const { return pages_.free_page_count(); }
  int64_t capacity_tokens() const { return page_count() * page_size_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t owner_of_page(int64_t page) const { return pages_.owner(page); }

 private:
  struct Request {
    int64_t seq_len = 0;
    std::vector<int64_t> pages;  // pages[i] holds positions [i * page_size, (i + 1) * page_size)
  };
  const Request& request(int64_t req_slot) const;

  int64_t page_size_ = 0;
  int64_t max_seq_len_ = 0;
  PagePool pages_;
  std::vector<Request> requests_;  // by request slot; slot 0 (the null slot) stays empty
};

}  // namespace dsv4::serving
