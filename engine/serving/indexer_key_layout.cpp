#include "engine/serving/indexer_key_layout.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "engine/serving/kv_cache_layout.h"

namespace dsv4::serving {

IndexerKeyLayout indexer_key_layout(const ModelConfig& model, int64_t page_entries) {
  if (model.indexer_quant != "fp8") {
    throw ContractError("indexer_key_layout", "model.indexer_quant",
                        "only the fp8 indexer-key layout (132 B) is implemented, got \"" + model.indexer_quant + "\"");
  }
  DSV4_ASSERT(model.index_head_dim >= 1, "validated: index_head_dim >= 1");
  DSV4_ASSERT(page_entries >= 1, "a page holds at least one key");
  IndexerKeyLayout l;
  l.dims = model.index_head_dim;
  l.value_bytes = model.index_head_dim;
  l.page_entries = page_entries;
  l.scales_offset_bytes = page_entries * l.value_bytes;
  l.page_bytes = page_entries * l.entry_bytes();
  return l;
}

namespace {

void expect_slot(const IndexerKeyLayout& l, size_t values_size, size_t scales_size, int64_t slot_in_page) {
  DSV4_ASSERT(slot_in_page >= 0, "negative slot");
  DSV4_ASSERT(slot_in_page < l.page_entries, "slot past the page");
  DSV4_ASSERT((slot_in_page + 1) * l.value_bytes <= static_cast<int64_t>(values_size), "slot past the page values");
  DSV4_ASSERT((slot_in_page + 1) * l.scale_bytes <= static_cast<int64_t>(scales_size), "slot past the page scales");
}

}  // namespace

void pack_indexer_key(const IndexerKeyLayout& l, const float* key, std::span<uint8_t> page_values,
                      std::span<uint8_t> page_scales, int64_t slot_in_page) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  float amax = 0.0f;
  for (int64_t d = 0; d < l.dims; ++d) amax = std::max(amax, std::fabs(key[d]));
  const float scale = e4m3_block_scale(amax);
  uint8_t* values = page_values.data() + slot_in_page * l.value_bytes;
  for (int64_t d = 0; d < l.dims; ++d) {
    values[d] = f32_to_e4m3fn(std::clamp(key[d] / scale, -kE4m3fnMaxF32, kE4m3fnMaxF32));
  }
  // fp32, little-endian like the device.
  std::memcpy(page_scales.data() + slot_in_page * l.scale_bytes, &scale, sizeof scale);
}

void unpack_indexer_key(const IndexerKeyLayout& l, std::span<const uint8_t> page_values,
                        std::span<const uint8_t> page_scales, int64_t slot_in_page, float* key) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  float scale = 0.0f;
  std::memcpy(&scale, page_scales.data() + slot_in_page * l.scale_bytes, sizeof scale);
  const uint8_t* values = page_values.data() + slot_in_page * l.value_bytes;
  for (int64_t d = 0; d < l.dims; ++d) key[d] = e4m3fn_to_f32(values[d]) * scale;
}

}  // namespace dsv4::serving
