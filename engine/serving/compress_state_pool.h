// The running state of one compressor (dsv4-model §5, sglang's CompressStatePool): one pool per
// ratio-4 layer for attention, one per ratio-4 layer for its indexer, one per ratio-128 layer.
// Each SWA page owns `ring` consecutive rows, and a token at SWA location s writes
//   row = (s / swa_page_size) * ring + s % ring
// (s % ring == pos % ring because ring | swa_page_size). The row count is padded to a multiple of
// the ratio so the buffer views as [-1, ratio, row], and the last row is kept clean (kv 0,
// score -inf) as the dummy that padded reads land on. Geometry only: the buffer itself comes from
// the runtime, and the row layout is a pure function over bytes.
#pragma once

#include "kernels/compressor.h"

#include <cstdint>
#include <span>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"

namespace dsv4::serving {

enum class CompressStateOwner { attention, indexer };

// One fp32 row: |kv A|kv B|score A|score B| for ratio 4 (A = the previous block, read by the
// overlap; B = the current one), |kv|score| otherwise. Each part is `dims` floats.
struct StateRowLayout {
  int64_t coff = 0;  // parts per row half: 2 for the overlapping ratio 4, 1 otherwise
  int64_t dims = 0;  // head_dim (attention) or index_head_dim (indexer)
  int64_t row_bytes = 0;

  int64_t part_bytes() const { return dims * 4; }
  int64_t kv_offset_bytes(int64_t part) const;     // part < coff
  int64_t score_offset_bytes(int64_t part) const;  // part < coff
  // The same geometry as the compressor kernels take it (kernels/compressor.h).
  kernels::CompressStateLayout kernel_layout() const;
};

StateRowLayout state_row_layout(int64_t ratio, int64_t dims);
// Writes the clean row: every kv float 0, every score float -inf.
void fill_clean_state_row(const StateRowLayout& layout, std::span<uint8_t> row);

class CompressStatePool {
 public:
  static constexpr int64_t kNoRow = -1;

  // layer_id must be a compressed layer (ratio 4 for the indexer). swa_page_count is the SWA
  // pool's, page 0 included. Throws InputError (from validate_runtime_options) for bad options,
  // e.g. swa_page_size 0 or a ring that does not divide it, before anything divides by them, and
  // ContractError for a layer without this state.
  CompressStatePool(const ModelConfig& model, const RuntimeOptions& options, int64_t layer_id,
                    CompressStateOwner owner, int64_t swa_page_count);

  // Total: any int64 gives a row in [0, used_row_count()) or -1 (negative or past the SWA pool).
  int64_t translate_swa_loc_to_state_row(int64_t swa_loc) const;

  int64_t ratio() const { return ratio_; }
  int64_t ring_size() const { return ring_size_; }
  int64_t swa_page_size() const { return swa_page_size_; }
  int64_t swa_page_count() const { return swa_page_count_; }
  int64_t used_row_count() const { return swa_page_count_ * ring_size_; }  // rows owned by SWA pages
  int64_t row_count() const { return row_count_; }                         // with padding and the clean row
  int64_t clean_row() const { return row_count_ - 1; }
  const StateRowLayout& row_layout() const { return row_layout_; }
  int64_t buffer_bytes() const { return row_count_ * row_layout_.row_bytes; }

 private:
  int64_t ratio_ = 0;
  int64_t ring_size_ = 0;
  int64_t swa_page_size_ = 0;
  int64_t swa_page_count_ = 0;
  int64_t row_count_ = 0;
  StateRowLayout row_layout_;
};

}  // namespace dsv4::serving
