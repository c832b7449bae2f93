#include "engine/serving/kv_cache_layout.h"

#include "engine/core/error.h"
#include "kernels/norm_rope.h"

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

// The kernels' view of the same entry (kernels/norm_rope.h): one codec packs and unpacks both.
kernels::Model1Layout model1_of(const KvEntryLayout& l) {
  const kernels::Model1Layout m{l.head_dim(), l.rope_dims, l.block_dims};
  DSV4_ASSERT(m.scale_count() == l.scale_count, "the kernels' MODEL1 scale count matches");
  DSV4_ASSERT(m.value_bytes() == l.value_bytes, "the kernels' MODEL1 value bytes match");
  DSV4_ASSERT(m.scale_bytes() == l.scale_bytes, "the kernels' MODEL1 scale bytes match");
  return m;
}

}  // namespace

KvPageSpans<uint8_t> split_kv_page(const KvPageLayout& layout, std::span<uint8_t> page) {
  return split(layout, page);
}

KvPageSpans<const uint8_t> view_kv_page(const KvPageLayout& layout, std::span<const uint8_t> page) {
  return split(layout, page);
}

float e4m3_block_scale(float amax) { return kernels::e4m3_block_scale(amax); }

void pack_kv_entry(const KvEntryLayout& l, const float* kv, std::span<uint8_t> page_values,
                   std::span<uint8_t> page_scales, int64_t slot_in_page) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  kernels::model1_pack_entry(model1_of(l), kv, page_values.data() + slot_in_page * l.value_bytes,
                             page_scales.data() + slot_in_page * l.scale_bytes);
}

void unpack_kv_entry(const KvEntryLayout& l, std::span<const uint8_t> page_values,
                     std::span<const uint8_t> page_scales, int64_t slot_in_page, float* kv) {
  expect_slot(l, page_values.size(), page_scales.size(), slot_in_page);
  kernels::model1_unpack_entry(model1_of(l), page_values.data() + slot_in_page * l.value_bytes,
                               page_scales.data() + slot_in_page * l.scale_bytes, kv);
}

}  // namespace dsv4::serving
