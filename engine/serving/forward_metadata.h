// The attention metadata of one batch (dsv4-model §6, sglang's DSV4Raw*Metadata and DSV4Metadata).
// It is built raw (per row: request slot, seq_len, extend_len; per token: out_cache_loc) and
// upgraded lazily, exactly once per batch, to the full form:
//   per token      position, SWA location (full_to_swa), the indexer's context length in the
//                  (N_total, 1) layout (bug-classes A3: one query row per token, never (B, next_n));
//   per compressed the entry the token completes (compressed_write_loc, -1 inside a block), the
//   layer          compress-state row it writes (translate_swa_loc_to_state_row) and how many
//                  compressed entries its query sees ((p + 1) / ratio).
// upgrade() again is a no-op; call it once on the main stream before any layer forks streams
// (bug-classes A2), and read upgraded() only after it.
// Frozen mode (a captured CUDA graph holds the storage): after freeze(), assign_from(raw) copies a
// new batch's raw values into the same storage, and the next upgrade() recomputes the full form in
// place. Nothing is ever reallocated or rebound: set_raw() and any shape change are ContractErrors,
// so replay can never read a stale buffer (bug-classes A3).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "engine/serving/compress_state_pool.h"
#include "engine/serving/forward_batch.h"
#include "engine/serving/swa_token_allocator.h"

namespace dsv4::serving {

struct RawForwardMetadata {
  std::vector<int64_t> req_slots;      // per row
  std::vector<int64_t> seq_lens;       // per row, after the step
  std::vector<int64_t> extend_lens;    // per row
  std::vector<int64_t> out_cache_loc;  // per token (sum of extend_lens)

  int64_t row_count() const { return static_cast<int64_t>(req_slots.size()); }
  int64_t token_count() const { return static_cast<int64_t>(out_cache_loc.size()); }
};

RawForwardMetadata raw_forward_metadata(const ForwardBatch& batch);

struct CompressedLayerMetadata {
  int64_t ratio = 0;
  std::vector<int64_t> write_loc;        // per token
  std::vector<int64_t> state_row;        // per token
  std::vector<int64_t> visible_entries;  // per token
};

struct UpgradedForwardMetadata {
  std::vector<int64_t> positions;             // per token
  std::vector<int64_t> swa_loc;               // per token
  std::vector<int64_t> indexer_context_lens;  // (N_total, 1): per token, (p + 1) / 4; empty without ratio-4 layers
  std::vector<CompressedLayerMetadata> layers;  // in the order of the pools given

  std::array<int64_t, 2> indexer_context_lens_shape() const {
    return {static_cast<int64_t>(indexer_context_lens.size()), 1};
  }
};

class ForwardMetadata {
 public:
  // The allocator and the pools (one per compressed layer, e.g. its attention CompressStatePool)
  // outlive the metadata; the upgrade reads them when it runs.
  ForwardMetadata(const SwaTokenAllocator& swa, std::vector<const CompressStatePool*> pools);

  // Binds a new batch's raw form (not upgraded). ContractError when frozen.
  void set_raw(RawForwardMetadata raw);
  // Copies a new batch's raw values into the existing storage; the upgraded form becomes due again.
  // Frozen: ContractError unless every size matches the frozen ones.
  void assign_from(const RawForwardMetadata& raw);
  // Builds the full form from the raw one, once per batch. Returns whether it ran.
  bool upgrade();
  // Fixes the storage: from now on only assign_from and upgrade, in place. Requires an upgraded batch.
  void freeze();

  bool is_upgraded() const { return upgraded_; }
  bool is_frozen() const { return frozen_; }
  int64_t upgrade_count() const { return upgrade_count_; }  // upgrades that ran, over every batch
  const RawForwardMetadata& raw() const { return raw_; }
  const UpgradedForwardMetadata& upgraded() const;  // asserts is_upgraded()

 private:
  void check_raw(const RawForwardMetadata& raw) const;

  const SwaTokenAllocator& swa_;
  std::vector<const CompressStatePool*> pools_;
  RawForwardMetadata raw_;
  UpgradedForwardMetadata full_;
  bool upgraded_ = false;
  bool frozen_ = false;
  int64_t upgrade_count_ = 0;
};

}  // namespace dsv4::serving
