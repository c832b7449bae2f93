// Locations in the compressed pools (dsv4-model §5). A ratio-r layer caches one entry per block of
// r tokens at c_loc = full_loc / r: because page_size is a multiple of r, a block never straddles a
// full page, so the compressed pools need no allocator of their own; they are sized from the
// full-token capacity and have page_size / r entries per page. The ratio-4 indexer-key pool uses the
// c4 location. An entry is written when its block completes (the position with pos % r == r - 1).
#pragma once

#include <cstdint>
#include <span>

namespace dsv4::serving {

struct CompressedPoolGeometry {
  int64_t ratio = 0;
  int64_t entries_per_page = 0;  // page_size / ratio: 64 for c4 and 2 for c128 at page_size 256
  int64_t page_count = 0;        // the full namespace's, page 0 (the null page) included
  int64_t entry_count = 0;       // full capacity / ratio
};

// Asserts ratio >= 1 and page_size % ratio == 0 (validate_runtime_options guarantees both).
CompressedPoolGeometry compressed_pool_geometry(int64_t ratio, int64_t page_size, int64_t full_page_count);

// Total: full_loc / ratio, or -1 for a negative full_loc (ratio >= 1 is asserted).
int64_t compressed_loc(int64_t full_loc, int64_t ratio);
// The entry that the token at `position` completes, or -1 if its block is still open; a token at
// the null location 0 (a padding row) completes the null entry 0.
int64_t compressed_write_loc(int64_t full_loc, int64_t position, int64_t ratio);
// Complete entries of a request of seq_len tokens: seq_len / ratio.
int64_t compressed_entry_count(int64_t seq_len, int64_t ratio);
// The location of complete entry `entry` (< compressed_entry_count) of a request, from its
// req_to_token row: compressed_loc(row[entry * ratio], ratio).
int64_t compressed_entry_loc(std::span<const int32_t> row, int64_t seq_len, int64_t entry, int64_t ratio);

}  // namespace dsv4::serving
