// The sliding-window (SWA) KV namespace: every layer caches only the last window_size tokens of a
// request, in pages of swa_page_size tokens. Each request keeps the pages that hold a position its
// next query can see (positions >= next_pos - window_size + 1); whole pages behind the window go
// back to the pool as the window slides. full_to_swa maps a full-token location to its SWA
// location (sglang's full_to_swa_index_mapping). SWA page 0 is reserved like the full page 0, and
// the null location maps to the null location (0 -> 0), so IDLE padding rows write SWA slot 0 and
// compress-state row 0, which no request owns.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/serving/page_pool.h"

namespace dsv4::serving {

class SwaTokenAllocator {
 public:
  static constexpr int64_t kNullLoc = 0;
  static constexpr int64_t kNoLoc = -1;

  // swa_page_count counts the reserved page 0; full_capacity_tokens is the full-token namespace's
  // size (TokenAllocator::capacity_tokens()). Throws InputError for options that
  // validate_runtime_options refuses (swa_page_size 0 among them), before any division.
  SwaTokenAllocator(const ModelConfig& model, const RuntimeOptions& options, int64_t swa_page_count,
                    int64_t full_capacity_tokens);

  // The first position the query at `next_pos` attends: max(0, next_pos - window_size + 1).
  int64_t window_begin(int64_t next_pos) const;
  // Pages a request must take to grow to new_seq_len, and pages the slide gives back first.
  int64_t pages_needed(int64_t req_slot, int64_t new_seq_len) const;
  int64_t pages_released_by_slide(int64_t req_slot) const;
  bool can_extend(int64_t req_slot, int64_t new_seq_len) const;
  // Grows a request to new_seq_len: first gives back the pages wholly before the window of the
  // first new query (position seq_len), then takes pages for positions [seq_len, new_seq_len).
  // full_locs is the request's req_to_token row, already holding the full locations of
  // [0, new_seq_len). All or nothing, like TokenAllocator::extend.
  [[nodiscard]] PageAllocation extend(int64_t req_slot, int64_t new_seq_len, std::span<const int32_t> full_locs);
  // Shrinks a request to new_seq_len (>= the first position it still holds a page for, <= its
  // length): the positions of rejected draft tokens are unmapped and pages wholly past the new
  // length go back to the pool.
  void truncate(int64_t req_slot, int64_t new_seq_len);
  // Returns every page of a request and unmaps its full locations.
  void release(int64_t req_slot);

  // Total: any int64 gives a SWA location of a live position, 0 for the null location, or -1.
  int64_t full_to_swa(int64_t full_loc) const;
  // Whether position `pos` (< seq_len) of a request still has a SWA page, and its location.
  bool is_held(int64_t req_slot, int64_t pos) const;
  int64_t loc(int64_t req_slot, int64_t pos) const;
  // The first position whose page the request still holds (== seq_len when it holds none).
  int64_t first_held_pos(int64_t req_slot) const;

  int64_t seq_len(int64_t req_slot) const;
  int64_t swa_page_size() const { return swa_page_size_; }
  int64_t window_size() const { return window_size_; }
  int64_t page_count() const { return pages_.page_count(); }
  int64_t free_page_count() const { return pages_.free_page_count(); }
  int64_t capacity_tokens() const { return page_count() * swa_page_size_; }
  int64_t owner_of_page(int64_t page) const { return pages_.owner(page); }

 private:
  struct Request {
    int64_t seq_len = 0;
    int64_t first_held_page_index = 0;  // pages[i] for i < this have been given back (-1)
    std::vector<int64_t> pages;         // pages[i] holds positions [i * swa_page_size, (i + 1) * ...)
  };
  const Request& request(int64_t req_slot) const;
  void give_back_page(int64_t page, int64_t req_slot);

  int64_t swa_page_size_ = 0;
  int64_t window_size_ = 0;
  int64_t full_page_size_ = 0;
  PagePool pages_;
  std::vector<Request> requests_;           // by request slot; slot 0 stays empty
  std::vector<int32_t> swa_by_full_loc_;    // -1 when unmapped; [0] = 0
  std::vector<int32_t> full_by_swa_loc_;    // the inverse, to unmap a page when it is given back
};

}  // namespace dsv4::serving
