// Byte sizes of the serving caches and compress-state pools (dsv4-model §5), derived from the model
// config and the runtime options in one place, so `info`, the pools and the tests agree.
#pragma once

#include <cstdint>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"

namespace dsv4 {

struct CacheGeometry {
  // One cached KV vector in the FP8 "MODEL1" layout: nope dims as e4m3, rope dims as bf16, one
  // ue8m0 scale per kv_block nope dims, padded to 8 scale bytes (448 + 128 + 7 + 1 = 584 on Flash).
  int64_t kv_entry_bytes = 0;
  int64_t kv_value_bytes = 0;  // nope + 2 * rope
  int64_t kv_scale_bytes = 0;  // scales + pad
  // One ratio-4 indexer key: index_head_dim e4m3 + an fp32 scale (132 B), or e2m1 pairs + scale (68 B).
  int64_t indexer_key_bytes = 0;
  // One compress-state row: [kv | score] in fp32 over coff * head dims.
  int64_t c4_state_row_bytes = 0;
  int64_t c128_state_row_bytes = 0;
  int64_t indexer_state_row_bytes = 0;
  int64_t c4_ring_size = 0;
  int64_t c128_ring_size = 0;
  // Entries per page of the compressed pools: page_size / ratio.
  int64_t c4_entries_per_page = 0;
  int64_t c128_entries_per_page = 0;
};

CacheGeometry cache_geometry(const ModelConfig& model, const RuntimeOptions& options);

}  // namespace dsv4
