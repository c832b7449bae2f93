#include "engine/serving/compress_state_pool.h"

#include <cstring>
#include <limits>
#include <string>

#include "engine/core/error.h"

namespace dsv4::serving {

int64_t StateRowLayout::kv_offset_bytes(int64_t part) const {
  DSV4_ASSERT(part >= 0, "negative part");
  DSV4_ASSERT(part < coff, "part past coff");
  return part * part_bytes();
}

int64_t StateRowLayout::score_offset_bytes(int64_t part) const {
  DSV4_ASSERT(part >= 0, "negative part");
  DSV4_ASSERT(part < coff, "part past coff");
  return (coff + part) * part_bytes();
}

kernels::CompressStateLayout StateRowLayout::kernel_layout() const {
  kernels::CompressStateLayout k;
  k.coff = coff;
  k.dims = dims;
  k.row_bytes = row_bytes;
  for (int64_t p = 0; p < coff; ++p) {
    k.kv_offset_bytes[p] = kv_offset_bytes(p);
    k.score_offset_bytes[p] = score_offset_bytes(p);
  }
  return k;
}

StateRowLayout state_row_layout(int64_t ratio, int64_t dims) {
  DSV4_ASSERT(ratio >= 1, "a compressed layer has a ratio >= 1");
  DSV4_ASSERT(dims >= 1, "dims must be >= 1");
  StateRowLayout l;
  l.coff = ratio == 4 ? 2 : 1;
  l.dims = dims;
  l.row_bytes = 2 * l.coff * l.part_bytes();
  return l;
}

void fill_clean_state_row(const StateRowLayout& layout, std::span<uint8_t> row) {
  DSV4_ASSERT(static_cast<int64_t>(row.size()) == layout.row_bytes, "row span is one row");
  const float zero = 0.0f;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (int64_t part = 0; part < layout.coff; ++part) {
    for (int64_t d = 0; d < layout.dims; ++d) {
      std::memcpy(row.data() + layout.kv_offset_bytes(part) + 4 * d, &zero, 4);
      std::memcpy(row.data() + layout.score_offset_bytes(part) + 4 * d, &minus_inf, 4);
    }
  }
}

namespace {

void expect_compressed_layer(const ModelConfig& model, int64_t layer_id, CompressStateOwner owner) {
  const int64_t layer_count = model.n_layers + model.n_mtp_layers;
  if (layer_id < 0 || layer_id >= layer_count) {
    throw ContractError("CompressStatePool", "layer_id",
                        "must be in [0, " + std::to_string(layer_count) + "), got " + std::to_string(layer_id));
  }
  const int64_t ratio = model.ratio(layer_id);
  if (ratio == 0) {
    throw ContractError("CompressStatePool", "layer_id",
                        "layer " + std::to_string(layer_id) + " attends its window only and has no compressor");
  }
  if (owner == CompressStateOwner::indexer && ratio != 4) {
    throw ContractError("CompressStatePool", "layer_id",
                        "layer " + std::to_string(layer_id) + " has ratio " + std::to_string(ratio) +
                            "; only ratio-4 layers have an indexer");
  }
}

}  // namespace

CompressStatePool::CompressStatePool(const ModelConfig& model, const RuntimeOptions& options, int64_t layer_id,
                                     CompressStateOwner owner, int64_t swa_page_count) {
  // The guard rule of dsv4-model §5, before any division by swa_page_size or a ring.
  validate_runtime_options(options, model);
  expect_compressed_layer(model, layer_id, owner);

  ratio_ = model.ratio(layer_id);
  ring_size_ = ratio_ == 4 ? options.effective_c4_ring_size() : options.effective_c128_ring_size(model);
  swa_page_size_ = options.swa_page_size;
  swa_page_count_ = swa_page_count;
  const int64_t dims = owner == CompressStateOwner::indexer ? model.index_head_dim : model.head_dim;
  row_layout_ = state_row_layout(ratio_, dims);

  DSV4_ASSERT(swa_page_size_ >= 1, "validated: swa_page_size >= 1");
  DSV4_ASSERT(ring_size_ >= 1, "validated: ring >= 1");
  DSV4_ASSERT(swa_page_size_ % ring_size_ == 0, "validated: the ring divides the SWA page");
  DSV4_ASSERT(ring_size_ % ratio_ == 0, "validated: the ring holds whole blocks");
  DSV4_ASSERT(swa_page_count >= 2, "the SWA pool has the null page and one more");
  DSV4_ASSERT(swa_page_count <= std::numeric_limits<int32_t>::max() / swa_page_size_, "SWA locations are int32");

  // Rows of the SWA pages, then the clean row, rounded up to whole blocks: the last row is clean.
  const int64_t rows_with_clean = used_row_count() + 1;
  row_count_ = (rows_with_clean + ratio_ - 1) / ratio_ * ratio_;
  DSV4_ASSERT(row_count_ % ratio_ == 0, "the buffer views as [-1, ratio, row]");
  DSV4_ASSERT(clean_row() >= used_row_count(), "the clean row is owned by no SWA page");
  DSV4_ASSERT(row_count_ - used_row_count() <= ratio_, "padding is less than one block");
}

int64_t CompressStatePool::translate_swa_loc_to_state_row(int64_t swa_loc) const {
  if (swa_loc < 0) return kNoRow;
  if (swa_loc >= swa_page_count_ * swa_page_size_) return kNoRow;
  const int64_t row = (swa_loc / swa_page_size_) * ring_size_ + swa_loc % ring_size_;
  DSV4_ASSERT(row >= 0, "row of a valid SWA location is >= 0");
  DSV4_ASSERT(row < used_row_count(), "row of a valid SWA location is owned by its SWA page");
  return row;
}

}  // namespace dsv4::serving
