#include "engine/serving/compressed_locations.h"

#include "engine/core/error.h"

namespace dsv4::serving {

CompressedPoolGeometry compressed_pool_geometry(int64_t ratio, int64_t page_size, int64_t full_page_count) {
  DSV4_ASSERT(ratio >= 1, "a compressed pool has a ratio >= 1");
  DSV4_ASSERT(page_size >= ratio, "a page holds at least one block");
  DSV4_ASSERT(page_size % ratio == 0, "blocks never straddle a page");
  DSV4_ASSERT(full_page_count >= 1, "the full namespace has at least the null page");
  CompressedPoolGeometry g;
  g.ratio = ratio;
  g.entries_per_page = page_size / ratio;
  g.page_count = full_page_count;
  g.entry_count = full_page_count * g.entries_per_page;
  return g;
}

int64_t compressed_loc(int64_t full_loc, int64_t ratio) {
  DSV4_ASSERT(ratio >= 1, "ratio must be >= 1");
  if (full_loc < 0) return -1;
  return full_loc / ratio;
}

int64_t compressed_write_loc(int64_t full_loc, int64_t position, int64_t ratio) {
  DSV4_ASSERT(ratio >= 1, "ratio must be >= 1");
  DSV4_ASSERT(position >= 0, "negative position");
  if (position % ratio != ratio - 1) return -1;
  // A padding row (every token at the null location, e.g. 1 + 3 drafts of a TARGET_VERIFY row)
  // completes the null entry.
  if (full_loc == 0) return 0;
  // Same page as the block's first token, so the same entry.
  DSV4_ASSERT(full_loc % ratio == ratio - 1, "a block's tokens are consecutive locations of one page");
  return compressed_loc(full_loc, ratio);
}

int64_t compressed_entry_count(int64_t seq_len, int64_t ratio) {
  DSV4_ASSERT(ratio >= 1, "ratio must be >= 1");
  DSV4_ASSERT(seq_len >= 0, "negative length");
  return seq_len / ratio;
}

int64_t compressed_entry_loc(std::span<const int32_t> row, int64_t seq_len, int64_t entry, int64_t ratio) {
  DSV4_ASSERT(entry >= 0, "negative entry");
  DSV4_ASSERT(entry < compressed_entry_count(seq_len, ratio), "entry of an incomplete block");
  DSV4_ASSERT(seq_len <= static_cast<int64_t>(row.size()), "row shorter than the request");
  const int64_t first_loc = row[static_cast<size_t>(entry * ratio)];
  DSV4_ASSERT(first_loc % ratio == 0, "a block starts on a multiple of the ratio");
  return compressed_loc(first_loc, ratio);
}

}  // namespace dsv4::serving
