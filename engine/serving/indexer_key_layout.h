// The ratio-4 indexer key cache entry (dsv4-model §5, sglang's FP8 default), as pure functions over
// bytes: index_head_dim e4m3 values and one fp32 scale per key (a power of two from the key's amax,
// one block over all dims), 128 + 4 = 132 B. Pages follow the c4 pool (page_size / 4 entries, 64 at
// page_size 256) and store every entry's values, then every entry's scales: 64 x 128 + 64 x 4 B.
// Only the FP8 variant exists here; the FP4 one (68 B) is refused, not guessed.
#pragma once

#include <cstdint>
#include <span>

#include "engine/config/model_config.h"

namespace dsv4::serving {

struct IndexerKeyLayout {
  int64_t dims = 0;          // index_head_dim
  int64_t value_bytes = 0;   // one e4m3 per dim
  int64_t scale_bytes = 4;   // fp32
  int64_t page_entries = 0;
  int64_t scales_offset_bytes = 0;  // page_entries * value_bytes
  int64_t page_bytes = 0;           // page_entries * (value_bytes + scale_bytes)

  int64_t entry_bytes() const { return value_bytes + scale_bytes; }
};

// ContractError unless model.indexer_quant == "fp8".
IndexerKeyLayout indexer_key_layout(const ModelConfig& model, int64_t page_entries);

// Writes key `slot_in_page` (dims floats); touches only its value and scale bytes.
void pack_indexer_key(const IndexerKeyLayout& layout, const float* key, std::span<uint8_t> page_values,
                      std::span<uint8_t> page_scales, int64_t slot_in_page);
void unpack_indexer_key(const IndexerKeyLayout& layout, std::span<const uint8_t> page_values,
                        std::span<const uint8_t> page_scales, int64_t slot_in_page, float* key);

}  // namespace dsv4::serving
