#include "engine/serving/forward_metadata.h"

#include <algorithm>
#include <string>
#include <utility>

#include "engine/core/error.h"
#include "engine/serving/compressed_locations.h"

namespace dsv4::serving {

namespace {

constexpr int64_t kIndexerRatio = 4;

// Sizes a vector when the storage is not frozen; frozen storage must already have the size.
void fit(std::vector<int64_t>& v, int64_t size, bool frozen) {
  if (frozen) {
    DSV4_ASSERT(static_cast<int64_t>(v.size()) == size, "frozen storage keeps its shape");
  } else {
    v.resize(static_cast<size_t>(size));
  }
}

void copy_in_place(std::vector<int64_t>& to, const std::vector<int64_t>& from, const char* field) {
  if (to.size() != from.size()) {
    throw ContractError("ForwardMetadata::assign_from", field,
                        "frozen shape is " + std::to_string(to.size()) + ", the batch has " + std::to_string(from.size()));
  }
  std::copy(from.begin(), from.end(), to.begin());
}

}  // namespace

RawForwardMetadata raw_forward_metadata(const ForwardBatch& batch) {
  RawForwardMetadata raw;
  for (const ForwardRow& row : batch.rows) {
    raw.req_slots.push_back(row.req_slot);
    raw.seq_lens.push_back(row.seq_len_after);
    raw.extend_lens.push_back(row.extend_len());
  }
  raw.out_cache_loc = batch.out_cache_loc;
  return raw;
}

ForwardMetadata::ForwardMetadata(const SwaTokenAllocator& swa, std::vector<const CompressStatePool*> pools)
    : swa_(swa), pools_(std::move(pools)) {
  for (const CompressStatePool* pool : pools_) {
    DSV4_ASSERT(pool != nullptr, "a compressed layer has a pool");
    DSV4_ASSERT(pool->ratio() >= 1, "a compressed layer has a ratio");
    DSV4_ASSERT(pool->swa_page_size() == swa.swa_page_size(), "state rows follow this SWA namespace");
  }
  full_.layers.resize(pools_.size());
}

void ForwardMetadata::check_raw(const RawForwardMetadata& raw) const {
  const auto rows = static_cast<size_t>(raw.row_count());
  if (raw.seq_lens.size() != rows || raw.extend_lens.size() != rows) {
    throw ContractError("ForwardMetadata", "raw", "req_slots, seq_lens and extend_lens have one entry per row");
  }
  int64_t tokens = 0;
  for (size_t r = 0; r < rows; ++r) {
    if (raw.extend_lens[r] < 1 || raw.extend_lens[r] > raw.seq_lens[r] || raw.req_slots[r] < 0) {
      throw ContractError("ForwardMetadata", "raw", "row " + std::to_string(r) + ": need 1 <= extend_len <= seq_len, slot >= 0");
    }
    tokens += raw.extend_lens[r];
  }
  if (tokens != raw.token_count()) {
    throw ContractError("ForwardMetadata", "raw.out_cache_loc", "one location per new token");
  }
}

void ForwardMetadata::set_raw(RawForwardMetadata raw) {
  if (frozen_) {
    throw ContractError("ForwardMetadata::set_raw", "raw",
                        "frozen metadata is captured by a graph: copy with assign_from, never rebind");
  }
  check_raw(raw);
  raw_ = std::move(raw);
  upgraded_ = false;
}

void ForwardMetadata::assign_from(const RawForwardMetadata& raw) {
  check_raw(raw);
  if (!frozen_) {
    raw_.req_slots.resize(raw.req_slots.size());
    raw_.seq_lens.resize(raw.seq_lens.size());
    raw_.extend_lens.resize(raw.extend_lens.size());
    raw_.out_cache_loc.resize(raw.out_cache_loc.size());
  }
  copy_in_place(raw_.req_slots, raw.req_slots, "req_slots");
  copy_in_place(raw_.seq_lens, raw.seq_lens, "seq_lens");
  copy_in_place(raw_.extend_lens, raw.extend_lens, "extend_lens");
  copy_in_place(raw_.out_cache_loc, raw.out_cache_loc, "out_cache_loc");
  upgraded_ = false;
}

bool ForwardMetadata::upgrade() {
  if (upgraded_) return false;
  const int64_t tokens = raw_.token_count();
  fit(full_.positions, tokens, frozen_);
  fit(full_.swa_loc, tokens, frozen_);
  bool has_indexer = false;
  for (const CompressStatePool* pool : pools_) has_indexer = has_indexer || pool->ratio() == kIndexerRatio;
  fit(full_.indexer_context_lens, has_indexer ? tokens : 0, frozen_);
  DSV4_ASSERT(full_.layers.size() == pools_.size(), "one layer entry per pool");
  for (size_t l = 0; l < pools_.size(); ++l) {
    CompressedLayerMetadata& layer = full_.layers[l];
    layer.ratio = pools_[l]->ratio();
    fit(layer.write_loc, tokens, frozen_);
    fit(layer.state_row, tokens, frozen_);
    fit(layer.visible_entries, tokens, frozen_);
  }

  int64_t token = 0;
  for (int64_t r = 0; r < raw_.row_count(); ++r) {
    const int64_t seq_len = raw_.seq_lens[static_cast<size_t>(r)];
    const int64_t extend_len = raw_.extend_lens[static_cast<size_t>(r)];
    for (int64_t i = 0; i < extend_len; ++i, ++token) {
      DSV4_ASSERT(token < tokens, "the rows feed no more tokens than there are locations");
      const auto t = static_cast<size_t>(token);
      const int64_t position = seq_len - extend_len + i;
      const int64_t full_loc = raw_.out_cache_loc[t];
      const int64_t swa_loc = swa_.full_to_swa(full_loc);
      DSV4_ASSERT(swa_loc >= 0, "a scheduled token has a SWA location");
      full_.positions[t] = position;
      full_.swa_loc[t] = swa_loc;
      if (has_indexer) full_.indexer_context_lens[t] = (position + 1) / kIndexerRatio;
      for (size_t l = 0; l < pools_.size(); ++l) {
        CompressedLayerMetadata& layer = full_.layers[l];
        layer.write_loc[t] = compressed_write_loc(full_loc, position, layer.ratio);
        layer.state_row[t] = pools_[l]->translate_swa_loc_to_state_row(swa_loc);
        layer.visible_entries[t] = (position + 1) / layer.ratio;
      }
    }
  }
  DSV4_ASSERT(token == tokens, "every location belongs to a row");
  upgraded_ = true;
  ++upgrade_count_;
  return true;
}

void ForwardMetadata::freeze() {
  DSV4_ASSERT(upgraded_, "a graph captures metadata after the warmup upgrade");
  frozen_ = true;
}

const UpgradedForwardMetadata& ForwardMetadata::upgraded() const {
  DSV4_ASSERT(upgraded_, "read the upgraded metadata only after upgrade()");
  return full_;
}

}  // namespace dsv4::serving
