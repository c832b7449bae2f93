#include "engine/serving/kv_cache_layout.h"

#include <algorithm>
#include <cmath>

#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4::serving {

KvEntryLayout kv_entry_layout(const ModelConfig& model) {
  KvEntryLayout l;
  l.nope_dims = model.nope_head_dim();
  l.rope_dims = model.rope_head_dim;
  l.block_dims = model.kv_block_size;
  DSV4_ASSERT(l.nope_dims >= 1, "validated: head_dim > rope_head_dim");
  DSV4_ASSERT(l.rope_dims >= 0, "validated: rope_head_dim >= 0");
  DSV4_ASSERT(l.block_dims >= 1, "validated: kv_block_size >= 1");
  DSV4_ASSERT(l.nope_dims % l.block_dims == 0, "the nope dims are whole scale blocks");
  l.scale_count = l.nope_dims / l.block_dims;
  l.value_bytes = l.nope_dims + 2 * l.rope_dims;
  l.scale_bytes = (l.scale_count + 7) / 8 * 8;
  DSV4_ASSERT(l.scale_bytes >= l.scale_count, "one byte per scale");
  DSV4_ASSERT(l.scale_bytes % 8 == 0, "scales padded to 8 bytes");
  return l;
}

KvPageLayout kv_page_layout(const ModelConfig& model, int64_t page_tokens) {
  DSV4_ASSERT(page_tokens >= 1, "a page holds at least one entry");
  KvPageLayout p;
  p.entry = kv_entry_layout(model);
  p.page_tokens = page_tokens;
  p.scales_offset_bytes = page_tokens * p.entry.value_bytes;
  const int64_t unpadded_bytes = p.scales_offset_bytes + page_tokens * p.entry.scale_bytes;
  p.page_bytes = (unpadded_bytes + p.entry.value_bytes - 1) / p.entry.value_bytes * p.entry.value_bytes;
  DSV4_ASSERT(p.page_bytes % p.entry.value_bytes == 0, "pages are a multiple of the value stride");
  DSV4_ASSERT(p.page_bytes - unpadded_bytes < p.entry.value_bytes, "padding is less than one value stride");
  return p;
}

namespace {

template <typename Byte>
KvPageSpans<Byte> split(const KvPageLayout& layout, std::span<Byte> page) {
  DSV4_ASSERT(static_cast<int64_t>(page.size()) == layout.page_bytes, "page span is one page");
  KvPageSpans<Byte> out;
  out.values = page.first(static_cast<size_t>(layout.scales_offset_bytes));
  out.scales = page.subspan(static_cast<size_t>(layout.scales_offset_bytes),
                            static_cast<size_t>(layout.page_tokens * layout.entry.scale_bytes));
  return out;
}

void expect_slot(const KvEntryLayout& l, size_t values_size, size_t scales_size, int64_t slot_in_page) {
  DSV4_ASSERT(slot_in_page >= 0, "negative slot");
  DSV4_ASSERT((slot_in_page + 1) * l.value_bytes <= static_cast<int64_t>(values_size), "slot past the page values");
  DSV4_ASSERT((slot_in_page + 1) * l.scale_bytes <= static_cast<int64_t>(scales_size), "slot past the page scales");
}

}  // namespace

KvPageSpans<uint8_t> split_kv_page(const KvPageLayout& layout, std::span<uint8_t> page) {
  return split(layout, page);
}

KvPageSpans<const uint8_t> view_kv_page(const KvPageLayout& layout, std::span<const uint8_t> page) {
  return split(layout, page);
}

float e4m3_block_scale(float amax) {
  const float clamped = std::max(amax, 1e-4f);
  // A multiply by the fp32 reciprocal, not a divide (dsv4-model §2.9).
  return round_ue8m0_ceil(clamped * (1.0f / kE4m3fnMaxF32));
}

void pack_kv_entry(const KvEntryLayout& l, const float* kv, std::span<uint8_t> page_values,
                   std::span<uint8_t> page_scales, int64_t slot_in_page) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  uint8_t* values = page_values.data() + slot_in_page * l.value_bytes;
  uint8_t* scales = page_scales.data() + slot_in_page * l.scale_bytes;
  for (int64_t b = 0; b < l.scale_count; ++b) {
    const float* block = kv + b * l.block_dims;
    float amax = 0.0f;
    for (int64_t i = 0; i < l.block_dims; ++i) amax = std::max(amax, std::fabs(block[i]));
    const float scale = e4m3_block_scale(amax);
    const uint8_t scale_code = f32_to_ue8m0_ceil(scale);
    DSV4_ASSERT(ue8m0_to_f32(scale_code) == scale, "the block scale is a power of two");
    scales[b] = scale_code;
    for (int64_t i = 0; i < l.block_dims; ++i) {
      values[b * l.block_dims + i] = f32_to_e4m3fn(std::clamp(block[i] / scale, -kE4m3fnMaxF32, kE4m3fnMaxF32));
    }
  }
  for (int64_t b = l.scale_count; b < l.scale_bytes; ++b) scales[b] = 0;
  uint8_t* rope = values + l.nope_dims;
  for (int64_t i = 0; i < l.rope_dims; ++i) {
    const uint16_t code = f32_to_bf16(kv[l.nope_dims + i]);
    rope[2 * i] = static_cast<uint8_t>(code & 0xFFu);
    rope[2 * i + 1] = static_cast<uint8_t>(code >> 8);
  }
}

void unpack_kv_entry(const KvEntryLayout& l, std::span<const uint8_t> page_values,
                     std::span<const uint8_t> page_scales, int64_t slot_in_page, float* kv) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  const uint8_t* values = page_values.data() + slot_in_page * l.value_bytes;
  const uint8_t* scales = page_scales.data() + slot_in_page * l.scale_bytes;
  for (int64_t b = 0; b < l.scale_count; ++b) {
    const float scale = ue8m0_to_f32(scales[b]);
    for (int64_t i = 0; i < l.block_dims; ++i) {
      const int64_t d = b * l.block_dims + i;
      kv[d] = e4m3fn_to_f32(values[d]) * scale;
    }
  }
  const uint8_t* rope = values + l.nope_dims;
  for (int64_t i = 0; i < l.rope_dims; ++i) {
    const uint16_t code = static_cast<uint16_t>(rope[2 * i] | (rope[2 * i + 1] << 8));
    kv[l.nope_dims + i] = bf16_to_f32(code);
  }
}

}  // namespace dsv4::serving
