// The FP8 "MODEL1" KV cache entry and page (dsv4-model §5; FlashMLA's sparse format), as pure
// functions over bytes. One entry: the nope dims as e4m3 with one ue8m0 scale per kv_block_size
// dims (scale from the block's amax, as the model's QAT does), the rope dims as bf16:
//   values: | nope e4m3 (nope B) | rope bf16 (2 * rope B) |       576 B on Flash
//   scales: | ue8m0 x nope/kv_block_size | 0-pad to 8 |            8 B on Flash
// A page of page_tokens entries stores every entry's values, then every entry's scales, and is
// padded to a multiple of the value stride: 256 x 576 + 256 x 8 -> 149760 B on Flash.
// The entry codec itself is the kernels' (kernels/norm_rope.h model1_pack_entry / model1_unpack_entry),
// so the serving layout and the cache kernels cannot drift apart.
#pragma once

#include <cstdint>
#include <span>

#include "engine/config/model_config.h"

namespace dsv4::serving {

struct KvEntryLayout {
  int64_t nope_dims = 0;
  int64_t rope_dims = 0;
  int64_t block_dims = 0;   // nope dims per scale (kv_block_size)
  int64_t scale_count = 0;  // nope_dims / block_dims
  int64_t value_bytes = 0;  // nope_dims + 2 * rope_dims
  int64_t scale_bytes = 0;  // scale_count rounded up to 8

  int64_t entry_bytes() const { return value_bytes + scale_bytes; }
  int64_t head_dim() const { return nope_dims + rope_dims; }
};

struct KvPageLayout {
  KvEntryLayout entry;
  int64_t page_tokens = 0;
  int64_t scales_offset_bytes = 0;  // page_tokens * value_bytes
  int64_t page_bytes = 0;           // values + scales, padded to a multiple of value_bytes
};

template <typename Byte>
struct KvPageSpans {
  std::span<Byte> values;
  std::span<Byte> scales;
};

KvEntryLayout kv_entry_layout(const ModelConfig& model);
KvPageLayout kv_page_layout(const ModelConfig& model, int64_t page_tokens);
// The value and scale regions of one page (page.size() == page_bytes), to write or to read.
KvPageSpans<uint8_t> split_kv_page(const KvPageLayout& layout, std::span<uint8_t> page);
KvPageSpans<const uint8_t> view_kv_page(const KvPageLayout& layout, std::span<const uint8_t> page);

// The power-of-two scale of an e4m3 block: 2^ceil(log2(max(amax, 1e-4) * fp32(1/448))).
float e4m3_block_scale(float amax);

// Writes entry `slot_in_page` from kv (head_dim floats: nope, then rope). Touches only that
// entry's value and scale bytes.
void pack_kv_entry(const KvEntryLayout& layout, const float* kv, std::span<uint8_t> page_values,
                   std::span<uint8_t> page_scales, int64_t slot_in_page);
// Dequantizes entry `slot_in_page` into kv (head_dim floats).
void unpack_kv_entry(const KvEntryLayout& layout, std::span<const uint8_t> page_values,
                     std::span<const uint8_t> page_scales, int64_t slot_in_page, float* kv);

}  // namespace dsv4::serving
