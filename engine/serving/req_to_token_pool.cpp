#include "engine/serving/req_to_token_pool.h"

#include <string>

#include "engine/core/error.h"

namespace dsv4::serving {

ReqToTokenPool::ReqToTokenPool(int64_t max_running_requests, int64_t max_seq_len)
    : max_running_requests_(max_running_requests), max_seq_len_(max_seq_len) {
  DSV4_ASSERT(max_running_requests >= 1, "max_running_requests must be >= 1");
  DSV4_ASSERT(max_seq_len >= 1, "max_seq_len must be >= 1");
  const int64_t slot_count = max_running_requests + 1;
  DSV4_ASSERT(slot_count <= (int64_t{1} << 40) / max_seq_len, "req_to_token table too large");
  table_.assign(static_cast<size_t>(slot_count * max_seq_len), 0);
  live_by_slot_.assign(static_cast<size_t>(slot_count), false);
  free_slots_.reserve(static_cast<size_t>(max_running_requests));
  // Pushed high to low so that slot 1 is taken first.
  for (int64_t slot = max_running_requests; slot >= 1; --slot) free_slots_.push_back(slot);
}

std::optional<int64_t> ReqToTokenPool::alloc() {
  if (free_slots_.empty()) return std::nullopt;
  const int64_t slot = free_slots_.back();
  free_slots_.pop_back();
  DSV4_ASSERT(slot != kNullSlot, "the null slot is never handed out");
  DSV4_ASSERT(slot <= max_running_requests_, "free list holds a slot past the pool");
  DSV4_ASSERT(!live_by_slot_[static_cast<size_t>(slot)], "free list holds a live slot");
  live_by_slot_[static_cast<size_t>(slot)] = true;
  return slot;
}

void ReqToTokenPool::free(int64_t slot) {
  DSV4_ASSERT(slot != kNullSlot, "slot 0 is the reserved null slot and is never freed");
  DSV4_ASSERT(slot > 0, "slot is negative");
  DSV4_ASSERT(slot <= max_running_requests_, "slot past the pool");
  DSV4_ASSERT(live_by_slot_[static_cast<size_t>(slot)], "slot " + std::to_string(slot) + " freed twice");
  DSV4_ASSERT(free_slot_count() < max_running_requests_, "more slots freed than allocated");
  live_by_slot_[static_cast<size_t>(slot)] = false;
  free_slots_.push_back(slot);
}

bool ReqToTokenPool::is_live(int64_t slot) const {
  if (slot <= kNullSlot || slot > max_running_requests_) return false;
  return live_by_slot_[static_cast<size_t>(slot)];
}

std::span<int32_t> ReqToTokenPool::row(int64_t slot) {
  DSV4_ASSERT(is_live(slot), "row() of slot " + std::to_string(slot) + ", which is not live");
  return std::span<int32_t>(table_).subspan(static_cast<size_t>(slot * max_seq_len_),
                                            static_cast<size_t>(max_seq_len_));
}

std::span<const int32_t> ReqToTokenPool::row(int64_t slot) const {
  DSV4_ASSERT(is_live(slot), "row() of slot " + std::to_string(slot) + ", which is not live");
  return std::span<const int32_t>(table_).subspan(static_cast<size_t>(slot * max_seq_len_),
                                                  static_cast<size_t>(max_seq_len_));
}

std::span<const int32_t> ReqToTokenPool::null_row() const {
  return std::span<const int32_t>(table_).first(static_cast<size_t>(max_seq_len_));
}

}  // namespace dsv4::serving
