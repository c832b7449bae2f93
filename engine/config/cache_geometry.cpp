#include "engine/config/cache_geometry.h"

namespace dsv4 {

CacheGeometry cache_geometry(const ModelConfig& m, const RuntimeOptions& o) {
  CacheGeometry g;
  const int64_t nope = m.nope_head_dim();
  const int64_t scales = nope / m.kv_block_size;
  g.kv_value_bytes = nope + 2 * m.rope_head_dim;
  g.kv_scale_bytes = (scales + 7) / 8 * 8;
  g.kv_entry_bytes = g.kv_value_bytes + g.kv_scale_bytes;
  const int64_t fp32_bytes = 4;
  g.indexer_key_bytes = (m.indexer_quant == "fp8" ? m.index_head_dim : m.index_head_dim / 2) + fp32_bytes;
  g.c4_state_row_bytes = 2 * 2 * m.head_dim * fp32_bytes;
  g.c128_state_row_bytes = 2 * 1 * m.head_dim * fp32_bytes;
  g.indexer_state_row_bytes = 2 * 2 * m.index_head_dim * fp32_bytes;
  g.c4_ring_size = o.effective_c4_ring_size();
  g.c128_ring_size = o.effective_c128_ring_size(m);
  g.c4_entries_per_page = o.page_size / 4;
  const int64_t c128 = m.c128_ratio();
  g.c128_entries_per_page = c128 > 0 ? o.page_size / c128 : 0;
  return g;
}

}  // namespace dsv4
