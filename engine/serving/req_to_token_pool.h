// Request slots and their rows of full-token locations (sglang's req_to_token). Slot 0 is the
// reserved null slot: CUDA-graph IDLE padding rows use req_pool_index 0, whose row stays all 0,
// i.e. the null location (dsv4-model §6). Live requests get slots 1..max_running_requests.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace dsv4::serving {

class ReqToTokenPool {
 public:
  static constexpr int64_t kNullSlot = 0;

  ReqToTokenPool(int64_t max_running_requests, int64_t max_seq_len);

  // The most recently freed slot, or nullopt when every slot is taken.
  std::optional<int64_t> alloc();
  // Frees a live slot. Freeing slot 0 or a free slot is an assertion.
  void free(int64_t slot);

  bool is_live(int64_t slot) const;
  int64_t free_slot_count() const { return static_cast<int64_t>(free_slots_.size()); }
  int64_t max_running_requests() const { return max_running_requests_; }
  int64_t max_seq_len() const { return max_seq_len_; }

  // The row of a live slot: max_seq_len locations, meaningful up to the request's length.
  std::span<int32_t> row(int64_t slot);
  std::span<const int32_t> row(int64_t slot) const;
  // Slot 0's row: all 0, the null location, never written.
  std::span<const int32_t> null_row() const;
  // The whole table, [max_running_requests + 1, max_seq_len] row-major, for the device copy.
  std::span<const int32_t> table() const { return table_; }

 private:
  int64_t max_running_requests_ = 0;
  int64_t max_seq_len_ = 0;
  std::vector<int32_t> table_;
  std::vector<bool> live_by_slot_;
  std::vector<int64_t> free_slots_;  // a stack: back() is taken next
};

}  // namespace dsv4::serving
